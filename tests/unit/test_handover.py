"""The same-node weight handover (tlcr_ray.rl.handover) up to the device boundary, and the choice of sync.

The CUDA IPC path itself needs a GPU; here: the flat layout both kinds share, the /dev/shm files (across a
real second process), the reused file for engines that copy on load, the push loop's one-bucket-at-a-time bound, the handle merge, the rebuild's device
argument against the installed torch, and which method each layout gets (ppo.weight_sync).
"""
from __future__ import annotations

import inspect
import io
import multiprocessing as mp
import os

import pytest
import torch

from tlcr_ray.config import ConfigError, load_config
from tlcr_ray.rl import handover
from tlcr_ray.rl.weight_sync import shares_learner_gpu, weight_sync_method


def _bucket(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(7, 3, generator=g),  # 84 bytes: the next offset must be re-aligned
            "b.half": torch.randn(5, generator=g).half(),
            "c.bf16": torch.randn(2, 9, generator=g).bfloat16(),
            "d.ids": torch.arange(11, dtype=torch.int64),
            "e.scalar": torch.tensor(3.25)}


def test_flat_layout_round_trips_every_dtype_exactly_with_aligned_offsets():
    bucket = _bucket()
    entries, total = handover.bucket_layout(bucket)
    flat = torch.zeros(total, dtype=torch.uint8)
    assert handover.flatten_bucket(bucket, flat) == entries
    assert all(offset % handover.ALIGN_BYTES == 0 for _, _, _, offset in entries)
    back = handover.unflatten_bucket(flat, entries)
    assert list(back) == list(bucket)
    for name, tensor in bucket.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor), name
    back["a.weight"][0, 0] = 99.0  # views of the buffer, not copies
    assert handover.unflatten_bucket(flat, entries)["a.weight"][0, 0] == 99.0


def test_flatten_refuses_a_short_buffer_and_unflatten_a_handle_past_its_end():
    bucket = _bucket()
    entries, total = handover.bucket_layout(bucket)
    with pytest.raises(ValueError, match=f"{total} bytes"):
        handover.flatten_bucket(bucket, torch.zeros(total - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="e.scalar ends at byte"):
        handover.unflatten_bucket(torch.zeros(total - 1, dtype=torch.uint8), entries)


def _read_in_child(handle: dict, out: mp.Queue) -> None:
    import io

    buf = io.BytesIO()  # plain bytes back: torch's queue pickling would share the tensors themselves
    torch.save({name: t.clone() for name, t in handover.open_handle(handle).items()}, buf)
    out.put(buf.getvalue())


def test_a_shm_bucket_is_read_by_another_process_and_its_file_is_gone_after_release(tmp_path):
    bucket = _bucket(1)
    handle = handover.pack_shm(bucket)
    try:
        assert handle["kind"] == "shm" and os.path.exists(handle["path"])
        assert os.path.dirname(handle["path"]) == handover.shm_dir()
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(handle, out))
        child.start()
        got = torch.load(io.BytesIO(out.get(timeout=120)))
        child.join(timeout=60)
        assert child.exitcode == 0
        assert all(torch.equal(got[n], bucket[n]) for n in bucket)
        kept = handover.open_shm(handle)  # an engine's mapping outlives the producer's unlink
    finally:
        handover.release(handle)
    assert not os.path.exists(handle["path"])
    assert torch.equal(kept["c.bf16"], bucket["c.bf16"])
    handover.release(handle)  # twice is harmless


def test_the_engine_side_cannot_write_through_to_the_producers_file():
    bucket = _bucket(2)
    handle = handover.pack_shm(bucket)
    try:
        handover.open_shm(handle)["a.weight"].zero_()  # copy-on-write mapping
        assert torch.equal(handover.open_shm(handle)["a.weight"], bucket["a.weight"])
    finally:
        handover.release(handle)


def _own_files() -> set[str]:
    prefix = f"{handover.SHM_PREFIX}{os.getpid()}-"
    return {f for f in os.listdir(handover.shm_dir()) if f.startswith(prefix)}


def test_push_hands_over_one_bucket_at_a_time_and_frees_each_after_the_ack():
    buckets = [_bucket(s) for s in range(4)]
    before = _own_files()
    received, live = {}, []

    def deliver(handle):  # an engine: copies the weights in, then returns (the ack)
        live.append(len(_own_files() - before))
        received.update({n: t.clone() for n, t in handover.open_handle(handle).items()})

    stream = [{f"{i}.{n}": t for n, t in b.items()} for i, b in enumerate(buckets)]
    assert handover.push_buckets(iter(stream), "shm", deliver) == 4
    assert live == [1, 1, 1, 1]
    assert _own_files() == before
    assert received.keys() == {n for b in stream for n in b}
    assert all(torch.equal(received[n], t) for b in stream for n, t in b.items())


def test_push_frees_the_bucket_when_the_engine_fails():
    before = _own_files()

    def deliver(handle):
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        handover.push_buckets(iter([_bucket()]), "shm", deliver)
    assert _own_files() == before


def test_a_reused_file_carries_every_bucket_and_one_engine_mapping_sees_each_rewrite():
    before = _own_files()
    producer, mappings = handover.ReusedShm(), handover.ShmMappings()
    first = handover.push_buckets(iter([_bucket(s) for s in range(3)]), "shm",
                                  lambda h: None, reused=producer)
    assert first == 3 and len(_own_files() - before) == 1  # one file, left for the next sync
    path, seen = producer.path, []

    def deliver(handle):  # an engine copying on load, mapping the file once
        assert handle["reused"] and handle["path"] == path
        seen.append({n: t.clone() for n, t in handover.open_handle(handle, "cpu", mappings).items()})

    stream = [_bucket(s) for s in (10, 11, 12)]
    handover.push_buckets(iter(stream), "shm", deliver, reused=producer)
    mapped = mappings.flat
    assert [set(b) for b in seen] == [set(b) for b in stream]
    assert all(torch.equal(got[n], sent[n]) for got, sent in zip(seen, stream) for n in sent)
    assert mappings.flat is mapped and _own_files() - before == {os.path.basename(path)}
    producer.close()
    assert _own_files() == before
    producer.close()  # twice is harmless


def test_a_reused_file_grows_under_a_new_name_and_goes_with_its_producer():
    before = _own_files()
    producer, mappings = handover.ReusedShm(), handover.ShmMappings()
    small, big = {"w": torch.arange(4.0)}, {"w": torch.arange(4096.0)}
    handover.open_handle(producer.pack(small), "cpu", mappings)
    small_path = producer.path
    got = handover.open_handle(producer.pack(big), "cpu", mappings)["w"]
    assert producer.path != small_path and not os.path.exists(small_path)
    assert torch.equal(got, big["w"]) and mappings.path == producer.path
    assert torch.equal(handover.open_handle(producer.pack(small), "cpu", mappings)["w"], small["w"])
    assert producer.path == mappings.path  # a smaller bucket fits the grown file
    del producer
    import gc

    gc.collect()
    assert _own_files() == before  # unlinked when the producer went


def test_an_engine_that_keeps_views_refuses_a_reused_file():
    producer = handover.ReusedShm()
    try:
        with pytest.raises(ValueError, match="copies_on_load"):
            handover.open_handle(producer.pack(_bucket()))
    finally:
        producer.close()


def test_ranks_other_than_zero_deliver_nothing_and_unknown_kinds_fail():
    delivered = []
    assert handover.push_buckets(iter([None, None]), "shm", delivered.append, rank=1) == 0
    assert delivered == []
    with pytest.raises(ValueError, match="unknown kind"):
        handover.push_buckets(iter([_bucket()]), "pigeon", delivered.append)
    with pytest.raises(ValueError, match="unknown handle kind"):
        handover.open_handle({"kind": "pigeon"})


def test_ipc_handles_of_every_rank_merge_into_one_per_gpu():
    entries = [("w", "float32", [2], 0)]
    merged = handover.merge_ipc_handles([{"kind": "cuda_ipc", "entries": entries, "ipc": {"GPU-a": "h0"}},
                                         {"kind": "cuda_ipc", "entries": entries, "ipc": {"GPU-b": "h1"}}])
    assert merged == {"kind": "cuda_ipc", "entries": entries, "ipc": {"GPU-a": "h0", "GPU-b": "h1"}}
    with pytest.raises(ValueError, match="different buckets"):
        handover.merge_ipc_handles([{"entries": entries, "ipc": {}}, {"entries": [], "ipc": {}}])
    with pytest.raises(ValueError, match="no learner rank"):
        handover.merge_ipc_handles([None])


def test_the_rebuild_puts_this_process_device_index_where_torch_reads_the_storage_device():
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    params = list(inspect.signature(rebuild_cuda_tensor).parameters)
    assert params[handover.STORAGE_DEVICE_ARG] == "storage_device"
    seen = []
    rebuilt = handover.rebuild_cuda_ipc((lambda *args: seen.append(args) or "buffer",
                                         tuple(range(len(params)))), device_index=3)
    assert rebuilt == "buffer"
    assert seen[0][handover.STORAGE_DEVICE_ARG] == 3
    assert [a for i, a in enumerate(seen[0]) if i != handover.STORAGE_DEVICE_ARG] == \
        [i for i in range(len(params)) if i != handover.STORAGE_DEVICE_ARG]


# ---- which sync each layout gets ---------------------------------------------------------------
def test_auto_picks_ipc_when_colocated_on_cuda_then_nccl_then_shm_then_the_object_store():
    auto = weight_sync_method
    assert auto("vllm", True, True, shares_gpu=True, same_node=True) == "cuda_ipc"
    assert auto("hf", True, True, shares_gpu=True, same_node=True) == "cuda_ipc"
    assert auto("vllm", True) == "nccl"
    assert auto("vllm", True, same_node=True) == "nccl"  # GPU to GPU beats a trip through host memory
    # NCCL cannot hold two ranks on one GPU: colocated engines off the learner's GPUs go through the host.
    assert auto("vllm", True, True, shares_gpu=False, same_node=True) == "shm"
    assert auto("vllm", True, True) == "object_store"
    assert auto("hf", True, same_node=True) == "shm"
    assert auto("hf", False, same_node=True) == "shm"
    assert auto("vllm", False, same_node=True) == "shm"
    assert auto("hf", False) == "object_store"
    assert auto("vllm", False, True) == "object_store"
    with pytest.raises(ValueError, match="rollout_backend"):
        auto("sglang", learner_on_cuda=True)


def test_an_explicit_sync_that_cannot_work_here_says_why():
    assert weight_sync_method("hf", False, requested="object_store", same_node=True) == "object_store"
    assert weight_sync_method("hf", False, requested="shm", same_node=True) == "shm"
    with pytest.raises(ValueError, match="learner rank 0's node"):
        weight_sync_method("hf", False, requested="shm", same_node=False)
    with pytest.raises(ValueError, match="CUDA learner"):
        weight_sync_method("hf", False, True, requested="cuda_ipc", same_node=True)
    with pytest.raises(ValueError, match="colocate none"):
        weight_sync_method("vllm", True, True, requested="nccl", shares_gpu=True)
    with pytest.raises(ValueError, match="expected one of"):
        weight_sync_method("hf", False, requested="carrier_pigeon")


def test_an_engine_shares_a_gpu_only_when_all_its_gpus_hold_a_learner_rank():
    learners = [("n1", ["0"]), ("n1", ["1"])]
    assert shares_learner_gpu(learners, [("n1", ["0"]), ("n1", ["1"])])
    assert shares_learner_gpu(learners, [("n1", ["0", "1"])])  # a TP engine whose actor holds both
    assert not shares_learner_gpu(learners, [("n1", ["2"])])
    assert not shares_learner_gpu(learners, [("n2", ["0"])])  # GPU 0 of another node
    assert not shares_learner_gpu(learners, [("n1", [])])  # no GPU (CPU, or a TP actor asking none)
    assert not shares_learner_gpu(learners, [])


def _cfg(tmp_path, *sets):
    return load_config(None, list(sets))


def test_config_rejects_a_weight_sync_the_layout_rules_out_at_load(tmp_path):
    assert _cfg(tmp_path).ppo.weight_sync == "auto"
    assert _cfg(tmp_path, "ppo.weight_sync=shm").ppo.weight_sync == "shm"
    with pytest.raises(ConfigError, match="ppo.weight_sync: 'ipc' is not allowed"):
        _cfg(tmp_path, "ppo.weight_sync=ipc")
    with pytest.raises(ConfigError, match="cuda_ipc .*ppo.learner.num_gpus > 0"):
        _cfg(tmp_path, "ppo.weight_sync=cuda_ipc", "ppo.colocate=all")
    with pytest.raises(ConfigError, match="ppo.colocate=all"):
        _cfg(tmp_path, "ppo.weight_sync=cuda_ipc", "ppo.learner.num_gpus=1")
    with pytest.raises(ConfigError, match="rollout_backend vllm"):
        _cfg(tmp_path, "ppo.weight_sync=nccl", "ppo.learner.num_gpus=1", "ppo.rollout_backend=hf")


def test_an_hf_engine_loads_handed_over_buckets_exactly_and_refuses_an_incomplete_set(tiny_model_dir):
    from tlcr_ray.rl.rollout.hf import HFRollout
    from tlcr_ray.training.gather import plan_buckets

    engine = HFRollout(tiny_model_dir)
    g = torch.Generator().manual_seed(5)
    target = {n: torch.randn(t.shape, generator=g).to(t.dtype) for n, t in engine.model.state_dict().items()}
    names = [[n for n, _ in b] for b in plan_buckets(engine.model, bucket_bytes=64 * 1024)]
    assert len(names) > 2
    delivered = []

    def deliver(handle):
        engine.load_weight_handle(handle)
        delivered.append(handle["path"])

    engine.begin_weight_load()
    handover.push_buckets(({n: target[n] for n in b} for b in names), "shm", deliver)
    engine.finish_weight_load()
    assert len(delivered) == len(names) and not any(os.path.exists(p) for p in delivered)
    state = engine.model.state_dict()
    # Tied embeddings: the last of the two names wins both.
    assert all(torch.equal(state[n], target[n]) for n in target if n not in ("model.embed_tokens.weight",))
    engine.begin_weight_load()
    handover.push_buckets(iter([{n: target[n] for n in names[0]}]), "shm", engine.load_weight_handle)
    with pytest.raises(KeyError, match="missing"):
        engine.finish_weight_load()
    # An engine copying on load takes the same buckets through one reused file, twice over.
    assert engine.copies_on_load
    producer = handover.ReusedShm()
    try:
        for seed in (6, 7):
            g.manual_seed(seed)
            target = {n: torch.randn(t.shape, generator=g).to(t.dtype) for n, t in engine.model.state_dict().items()}
            engine.begin_weight_load()
            handover.push_buckets(({n: target[n] for n in b} for b in names), "shm", engine.load_weight_handle,
                                  reused=producer)
            engine.finish_weight_load()
            state = engine.model.state_dict()
            assert all(torch.equal(state[n], target[n]) for n in target if n != "model.embed_tokens.weight")
    finally:
        producer.close()


def test_files_of_a_producer_that_died_are_swept_and_live_ones_kept(tmp_path):
    dead = tmp_path / f"{handover.SHM_PREFIX}4194305-abc"  # above Linux's largest pid_max: no such process
    live = tmp_path / f"{handover.SHM_PREFIX}{os.getpid()}-def"
    other = tmp_path / "someone-elses-file"
    for path in (dead, live, other):
        path.write_bytes(b"x")
    assert handover.sweep_stale_shm(str(tmp_path)) == [dead.name]
    assert not dead.exists() and live.exists() and other.exists()
