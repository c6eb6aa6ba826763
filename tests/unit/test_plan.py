"""`tlcr plan`: model shapes, ZeRO model states against DeepSpeed's own estimators, the JSON of every
shipped config, a config that cannot fit, the CLI's exit codes and the pre-start check."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tlcr_ray.cli import main
from tlcr_ray.config import ConfigError, load_config
from tlcr_ray.plan import GIB, engine_states, format_table, gpu_bytes, model_states, plan, require_fit
from tlcr_ray.plan_models import TABLE, model_shape, shape_from_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["demo.yaml", "tiny.yaml", "a100-7b.yaml", "a100-7b-2node.yaml"]
PER_GPU = {"model_states", "activations", "kv_cache", "buffers", "peak"}


@pytest.mark.parametrize("base, params", [
    ("meta-llama/Llama-2-7b-hf", 6_738_415_616), ("meta-llama/Llama-2-13b-chat-hf", 13_015_864_320),
    ("meta-llama/Meta-Llama-3-8B", 8_030_261_248), ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512), ("embedded:smollm2-135m-instruct", 134_515_008),
])
def test_table_shapes_give_the_published_parameter_counts(base, params):
    assert model_shape(base).params == params


def test_a_config_json_gives_the_same_shape_as_the_table(tmp_path):
    smol = TABLE[0][1]
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
        "head_dim": 64}))
    shape = model_shape(str(tmp_path))
    assert (shape.params, shape.backbone_params, shape.source) == (smol.params, smol.backbone_params,
                                                                   str(tmp_path / "config.json"))
    with pytest.raises(ConfigError, match="intermediate_size"):
        shape_from_config({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 9},
                          "x", "x/config.json")


def test_an_unknown_model_without_config_json_is_a_config_error():
    with pytest.raises(ConfigError, match="acme/mystery-7b.*shape table"):
        model_shape("acme/mystery-7b")


# --- model states against DeepSpeed 0.19.8's estimators ----------------------------------------

def _zero(shape, stage: int, gpus: int) -> int:
    return model_states(engine_states(shape.params, shape.largest_module, 2, stage, gpus, on_gpu=True))


@pytest.mark.parametrize("gpus_per_node, nodes", [(1, 1), (4, 1), (8, 1), (8, 2)])
def test_bf16_model_states_agree_with_deepspeeds_estimators(gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape, gpus = model_shape("meta-llama/Llama-2-7b-hf"), gpus_per_node * nodes
    _, z2 = estimate_zero2_model_states_mem_needs(shape.params, gpus_per_node, nodes, cpu_offload=False)
    assert _zero(shape, 2, gpus) == pytest.approx(z2, rel=0.01)  # both 2P + 18P/N
    _, z3, largest = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_module, gpus_per_node, nodes,
                                                           cpu_offload=False, cpu_offload_params=False, zero_init=True)
    ours = _zero(shape, 3, gpus)
    # DeepSpeed's ZeRO-3 estimate counts 18 bytes/param/N; the 0.19.8 stage-3 optimizer also keeps the 16-bit
    # grad partition (grad_partitions_flat_buffer) while it makes the fp32 grads at the step: 20P/N, where
    # the fp32 grads are those of one sub-group (sub_group_size 1e9 elements) when a rank holds more.
    assert largest == 4 * shape.largest_module
    assert ours == pytest.approx(z3, rel=0.12)
    fp32_grads = 4 * min(shape.params // gpus, 10**9)
    assert ours - largest == pytest.approx(16 * shape.params / gpus + fp32_grads, rel=0.01)


def test_seen_before_llama2_7b_on_8_gpus():
    shape = model_shape("meta-llama/Llama-2-7b-hf")
    assert _zero(shape, 2, 8) / GIB == pytest.approx(26.7, abs=0.1)
    assert _zero(shape, 3, 8) / GIB == pytest.approx(16.2, abs=0.1)  # DeepSpeed's estimator: 14.6


def test_zero3_per_gpu_model_states_are_about_one_nth_of_zero0():
    cfg = load_config(REPO / "configs" / "a100-7b.yaml")
    mem = gpu_bytes("h200-141gb")
    for n in (8, 16, 32):  # a rank's share under sub_group_size (1e9): its fp32 grads are all its own
        states = {z: plan(_set(cfg, {"sft.zero_stage": z, "sft.num_workers": n}), mem, groups=("sft",), knobs=False)
                  ["groups"]["sft"]["per_gpu"]["model_states"] for z in (0, 1, 2, 3)}
        assert states[3] == pytest.approx(states[0] / n, rel=0.005 * n)  # + 4 bytes per param of the largest module
        assert states[0] > states[1] > states[2] > states[3]


def _set(cfg, changes: dict):
    from tlcr_ray.plan import _with

    return _with(cfg, changes)


# --- the JSON of every shipped config ------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_plan_json_schema_for_every_shipped_config(name, capsys):
    assert main(["plan", "--config", str(REPO / "configs" / name), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report["gpu_memory_bytes"], int) and report["gpu_memory_bytes"] > 0
    assert isinstance(report["fits"], bool)
    assert set(report["groups"]) == {"sft", "disc", "rm", "dpo", "figa", "ppo.rollout", "ppo.reward", "ppo.reference",
                                     "ppo.learner"}
    for group in report["groups"].values():
        assert isinstance(group["gpus"], int) and isinstance(group["fits"], bool)
        assert set(group["per_gpu"]) == PER_GPU
        assert all(isinstance(v, int) and v >= 0 for v in group["per_gpu"].values())
        per = group["per_gpu"]
        assert per["activations"] <= per["peak"] <= per["model_states"] + per["activations"] + per["kv_cache"] \
            + per["buffers"]
        assert group["per_gpu"]["peak"] == max(group["phases"].values())
        assert group.get("cpu", False) == (group["gpus"] == 0)
    if not name.startswith("a100-7b"):  # CPU configs: planned as host processes
        assert all(g["cpu"] and g["host_bytes"] > 0 for g in report["groups"].values())
    else:
        assert report["fits"] and report["gpu"] == "a100-80gb"  # the config's own `gpu`


def test_a100_7b_plan_numbers():
    # The separate-pools layout (one vLLM engine per GPU); the colocated one: tests/unit/test_placement.py.
    report = plan(load_config(REPO / "configs" / "a100-7b-2node.yaml"), gpu_bytes("a100-80gb"))
    learner = report["groups"]["ppo.learner"]
    # The sync streams: one bucket (ppo.bucket_mib) + the largest parameter gathered, not the whole policy.
    m = report["model"]
    assert learner["breakdown"]["sync_gathered"] == 256 * 2**20 + 2 * m["vocab"] * m["hidden"] < 2 * m["params"]
    assert learner["peak_phase"] != "sync"
    rollout = report["groups"]["ppo.rollout"]
    assert rollout["per_gpu"]["peak"] == int(0.85 * gpu_bytes("a100-80gb")) + 2 * GIB
    # 512 prompts: vLLM runs them in waves of what its KV cache holds (over a hundred full-length sequences).
    assert rollout["inputs"]["kv_tokens"] > 100 * rollout["inputs"]["max_model_len"]
    assert rollout["inputs"]["kv_tokens_needed"] == 256 * rollout["inputs"]["max_model_len"]
    assert learner["inputs"]["micro_rows"] == 4 and learner["inputs"]["accumulation"] == 4
    assert learner["inputs"]["eval_rows"] == 16 and learner["inputs"]["gradient_checkpointing"]
    # The paper's 16 x 512 micro-batch without gradient checkpointing would leave under 10% of an 80 GB GPU.
    paper = plan(load_config(REPO / "configs" / "a100-7b.yaml", ["sft.gradient_checkpointing=false",
                                                                  "rm.gradient_checkpointing=false",
                                                                  "rm.micro_batch_size=16", "rm.grad_accum=1"]),
                 gpu_bytes("a100-80gb"))["groups"]
    assert paper["sft"]["margin"] < 0.1 * gpu_bytes("a100-80gb")
    assert not paper["rm"]["fits"] and paper["rm"]["knobs"][0] == "rm.gradient_checkpointing false → true"
    assert report["groups"]["sft"]["per_gpu"]["activations"] < paper["sft"]["per_gpu"]["activations"] / 3


def test_cpu_groups_are_planned_against_host_ram():
    report = plan(load_config(REPO / "configs" / "demo.yaml"), gpu_bytes("a100-80gb"), host_memory_bytes=2 * GIB)
    assert not report["fits"] and not report["groups"]["ppo.learner"]["fits"]
    assert report["cpu_ppo_total_bytes"] == sum(report["groups"][g]["host_bytes"] for g in report["groups"]
                                                if g.startswith("ppo."))


# --- a config that cannot fit ---------------------------------------------------------------------

IMPOSSIBLE = ["--set", "sft.micro_batch_size=64", "--set", "sft.max_len=4096"]


def test_an_impossible_config_does_not_fit_and_gets_knobs(capsys):
    config = str(REPO / "configs" / "a100-7b.yaml")
    assert main(["plan", "--config", config, "--gpu", "a100-40gb", "--json", *IMPOSSIBLE]) == 0
    sft = json.loads(capsys.readouterr().out)["groups"]["sft"]
    assert not sft["fits"] and sft["margin"] < 0
    assert any("sft.micro_batch_size 64 → " in k for k in sft["knobs"])
    assert not any("gradient_checkpointing" in k for k in sft["knobs"])  # already on in a100-7b.yaml
    assert main(["plan", "--config", config, "--gpu-memory-gib", "40", *IMPOSSIBLE]) == 0
    table = capsys.readouterr().out
    assert "DOES NOT FIT" in table and "to fit sft: " in table and "sft.micro_batch_size 64 → " in table
    assert "GPU: 40.0 GiB per GPU" in table


def test_plan_cli_exit_codes(capsys):
    assert main(["plan", "--config", str(REPO / "configs" / "a100-7b.yaml"), "--gpu", "h100-80gb"]) == 0
    assert "Everything fits." in capsys.readouterr().out
    assert main(["plan", "--config", str(REPO / "configs" / "a100-7b.yaml"), "--set", "model.base=acme/mystery-7b"]) == 2
    assert "model.base 'acme/mystery-7b'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--config", str(REPO / "configs" / "demo.yaml"), "--gpu", "v100"])
    assert exc.value.code == 2


# --- the check the stages run before starting ----------------------------------------------------

def test_require_fit_refuses_naming_the_group_estimate_and_knobs(monkeypatch):
    monkeypatch.setattr("tlcr_ray.plan.local_cuda_memory", lambda: None)  # as on a CPU-only head node
    cfg = load_config(REPO / "configs" / "a100-7b.yaml", [a for a in IMPOSSIBLE if a != "--set"] + ["gpu=a100-40gb"])
    with pytest.raises(ConfigError, match=r"sft does not fit a100-40gb: about \d+\.\d GiB per GPU .* the GPU has "
                                          r"39\.4 GiB\. To fit: .*sft\.micro_batch_size 64 → "):
        require_fit(cfg, ["sft"], "sft")
    assert require_fit(load_config(REPO / "configs" / "a100-7b.yaml"), ["sft", "ppo.learner"], "x")["fits"]
    no_gpu = load_config(REPO / "configs" / "a100-7b.yaml", ["gpu=null", "sft.micro_batch_size=64"])
    assert require_fit(no_gpu, ["sft"], "sft") is None  # no CUDA here and no `gpu`: nothing to check against
    assert require_fit(cfg, [], "ppo") is None  # a CPU config asks for no GPU group


def test_the_table_names_every_group_and_the_verdict():
    report = plan(load_config(REPO / "configs" / "a100-7b.yaml"), gpu_bytes("a100-80gb"), gpu="a100-80gb")
    table = format_table(report, "configs/a100-7b.yaml")
    for name in report["groups"]:
        assert f"\n{name} " in table
    assert "GPU: a100-80gb, 79.1 GiB per GPU" in table and "Everything fits." in table


# --- the memory mechanics: checkpointing, micro-batches, offload ------------------------------------

@pytest.mark.parametrize("gpus_per_node, nodes", [(8, 1), (8, 2)])
def test_offloaded_model_states_agree_with_deepspeeds_estimators(gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape, gpus = model_shape("meta-llama/Llama-2-7b-hf"), gpus_per_node * nodes
    states = lambda z, opt, par: engine_states(shape.params, shape.largest_module, 2, z, gpus, True, opt, par)  # noqa
    _, z2 = estimate_zero2_model_states_mem_needs(shape.params, gpus_per_node, nodes, cpu_offload=True)
    assert model_states(states(2, True, False)) == pytest.approx(z2, rel=0.01)  # 2P: the 16-bit weights only
    for params in (False, True):
        _, z3, largest = estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_module, gpus_per_node, nodes, cpu_offload=True, cpu_offload_params=params,
            zero_init=True)
        assert model_states(states(3, True, params)) == pytest.approx(z3, rel=0.01)
    full = states(3, False, False)
    moved = states(3, True, True)
    assert moved["offloaded"] == sum(full[k] for k in ("weights", "grads", "master", "adam", "fp32_grads", "adam_temp"))


def test_gradient_checkpointing_and_micro_batches_shrink_the_learners_activations():
    cfg = load_config(REPO / "configs" / "a100-7b.yaml")
    learner = lambda *sets: plan(_set(cfg, dict(sets)), gpu_bytes("a100-80gb"), groups=("ppo.learner",),  # noqa
                                 knobs=False)["groups"]["ppo.learner"]
    base = learner()
    off = learner(("ppo.gradient_checkpointing", False))
    assert base["inputs"]["gradient_checkpointing"] and off["phases"]["train"] > base["phases"]["train"] + 4 * GIB
    # ppo.micro_batch_size rows per micro-step: halving it halves the train activations' row-dependent part.
    small, big = learner(("ppo.micro_batch_size", 2)), learner(("ppo.micro_batch_size", 8))
    assert small["phases"]["train"] < base["phases"]["train"] < big["phases"]["train"]
    assert (small["inputs"]["accumulation"], big["inputs"]["accumulation"]) == (8, 2)
    # Unset: the rank's share of a mini-batch in one micro-step (128 / 8 ranks).
    assert learner(("ppo.micro_batch_size", None))["inputs"]["micro_rows"] == 16
    # No-grad forwards of ppo.forward_micro_batch_size rows, whatever prompts_per_step.
    assert learner(("ppo.prompts_per_step", 4096))["phases"]["evaluate"] == base["phases"]["evaluate"]
    assert learner(("ppo.forward_micro_batch_size", 64))["phases"]["evaluate"] > base["phases"]["evaluate"]


def test_a_one_pass_update_holds_the_critics_activations_through_the_actors_backward():
    cfg = load_config(REPO / "configs" / "demo.yaml")  # one rank, 1 epoch x 1 mini-batch: fused
    learner = lambda *sets: plan(_set(cfg, dict(sets)), gpu_bytes("a100-80gb"), host_memory_bytes=24 * GIB,  # noqa
                                 groups=("ppo.learner",), knobs=False)["groups"]["ppo.learner"]
    fused, off = learner(), learner(("ppo.fuse_evaluation", "off"))
    assert fused["phases"]["train"] > off["phases"]["train"]
    assert fused["phases"]["evaluate"] == off["phases"]["evaluate"]
    shared = (("ppo.critic", "shared"),)  # one graph: nothing more is held
    assert learner(*shared)["phases"]["train"] == learner(*shared, ("ppo.fuse_evaluation", "off"))["phases"]["train"]


def test_full_kl_puts_a_reference_copy_on_the_learner_and_offload_moves_states_to_host():
    cfg = load_config(REPO / "configs" / "a100-7b.yaml")
    groups = lambda *sets: plan(_set(cfg, dict(sets)), gpu_bytes("a100-80gb"), knobs=False)["groups"]  # noqa
    base, full = groups()["ppo.learner"], groups(("ppo.kl_estimator", "full"))["ppo.learner"]
    params = model_shape(cfg.model.base).params
    assert full["breakdown"]["reference_copy"] == 2 * params // 8  # bf16, ZeRO-3 over 8 ranks
    assert full["phases"]["evaluate"] > base["phases"]["evaluate"] + full["breakdown"]["reference_copy"]
    offload = groups(("ppo.offload_optimizer", True))["ppo.learner"]
    moved = base["per_gpu"]["model_states"] - offload["per_gpu"]["model_states"]
    assert moved > 0 and offload["offloaded_host_bytes"] >= moved
    assert offload["phases"]["step"] < base["phases"]["step"]
    # ppo.offload_reference / offload_reward: the forward's peak stays; between steps no weights on the GPU.
    scorers = groups(("ppo.offload_reference", True), ("ppo.offload_reward", True))
    for name in ("ppo.reference", "ppo.reward"):
        before, after = groups()[name], scorers[name]
        assert after["phases"]["forward"] == before["phases"]["forward"]
        assert after["phases"]["idle"] == GIB < before["phases"]["idle"]
        assert after["offloaded_host_bytes"] == before["per_gpu"]["model_states"]
    report = plan(_set(cfg, {"ppo.offload_reference": True}), gpu_bytes("a100-80gb"))
    # a100-7b is colocated: the learner's own offload between phases is named after the configured knobs.
    assert report["offload"] == ("ppo.offload_reference, PPO learner optimizer states while the engines "
                                 "generate (ppo.colocate all)")
    assert "offload: ppo.offload_reference" in format_table(report)


def test_a_learner_that_does_not_fit_is_offered_the_new_knobs():
    cfg = load_config(REPO / "configs" / "a100-7b.yaml", ["ppo.gradient_checkpointing=false", "ppo.micro_batch_size=16",
                                                          "ppo.zero_stage=2"])
    learner = plan(cfg, gpu_bytes("a100-40gb"))["groups"]["ppo.learner"]
    assert not learner["fits"]
    assert learner["knobs"][0].startswith("together: ppo.gradient_checkpointing false → true; ppo.micro_batch_size")
    stage = plan(load_config(REPO / "configs" / "a100-7b.yaml", ["sft.gradient_checkpointing=false",
                                                                 "sft.micro_batch_size=32"]),
                 gpu_bytes("a100-80gb"))["groups"]["sft"]
    assert not stage["fits"] and stage["knobs"][0] == "sft.gradient_checkpointing false → true"


def test_remax_learner_has_no_critic_states():
    """ReMax trains the policy alone: the learner's plan drops the critic's weights, grads and Adam."""
    base = load_config(REPO / "configs" / "a100-7b-2node.yaml")
    remax = load_config(REPO / "configs" / "a100-7b-2node.yaml", ["ppo.algorithm=remax", "reward.mode=sequence"])
    ppo_learner = plan(base, gpu_bytes("a100-80gb"))["groups"]["ppo.learner"]
    remax_learner = plan(remax, gpu_bytes("a100-80gb"))["groups"]["ppo.learner"]
    assert remax_learner["breakdown"]["critic"]["weights"] == 0
    # The critic is a backbone + value head: roughly half of the two engines' states.
    ratio = remax_learner["per_gpu"]["model_states"] / ppo_learner["per_gpu"]["model_states"]
    assert 0.4 < ratio < 0.6


def test_a_shared_critic_learner_has_no_critic_engine_only_the_head(capsys):
    """ppo.critic shared: the value head inside the actor's engine (h + 1 params); no critic engine states,
    activations or checkpoint; `tlcr plan` prints fewer learner bytes than the separate critic."""
    demo = REPO / "configs" / "demo.yaml"
    separate, shared = load_config(demo), load_config(demo, ["ppo.critic=shared"])
    m = model_shape(separate.model.base)
    sep, sha = (plan(c, gpu_bytes("a100-80gb")) for c in (separate, shared))
    a, b = sep["groups"]["ppo.learner"], sha["groups"]["ppo.learner"]
    assert b["breakdown"]["critic"]["weights"] == 0 and b["breakdown"]["critic"]["adam"] == 0
    assert b["breakdown"]["actor"]["weights"] == 4 * (m.params + m.hidden + 1)  # demo: fp32, world 1
    assert b["breakdown"]["actor"]["weights"] - a["breakdown"]["actor"]["weights"] == 4 * (m.hidden + 1)
    assert b["per_gpu"]["model_states"] < 0.6 * a["per_gpu"]["model_states"]
    assert b["per_gpu"]["peak"] < a["per_gpu"]["peak"]
    assert b["per_gpu"]["activations"] <= a["per_gpu"]["activations"]
    # The checkpoint: the actor with its head + the policy's HF folder, no critic engine (the demo's one
    # learner rank runs ZeRO-0: 4P weights + 8P Adam per engine).
    e, p, h = 4, m.params, m.hidden + 1
    assert sha["checkpoints"]["ppo"]["resumable_bytes"] == 12 * (p + h) + e * p
    assert sep["checkpoints"]["ppo"]["resumable_bytes"] == 12 * p + 12 * m.backbone_params + e * p
    # ReMax has no critic either way: shared changes nothing there.
    remax = ["ppo.algorithm=remax", "reward.mode=sequence"]
    assert plan(load_config(demo, remax), gpu_bytes("a100-80gb"))["groups"]["ppo.learner"]["breakdown"]["actor"][
        "weights"] == 4 * p
    # The CLI's table: the learner's host bytes and peak, separate vs shared.
    rows = {}
    for label, extra in (("separate", []), ("shared", ["--set", "ppo.critic=shared"])):
        assert main(["plan", "--config", str(demo), "--json", *extra]) == 0
        rows[label] = json.loads(capsys.readouterr().out)["groups"]["ppo.learner"]
    assert rows["shared"]["per_gpu"]["peak"] < rows["separate"]["per_gpu"]["peak"]
    assert main(["plan", "--config", str(demo), "--set", "ppo.critic=shared"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("ppo.learner"))
    assert f"{rows['shared']['per_gpu']['peak'] / GIB:.1f}" in line


def test_checkpoint_sizes_per_stage_and_what_a_finished_pipeline_leaves():
    from tlcr_ray.plan_checkpoints import checkpoint_sizes

    cfg = load_config(REPO / "configs" / "demo.yaml")
    report = plan(cfg, gpu_bytes("a100-80gb"))
    sizes, p = report["checkpoints"], report["model"]["params"]
    # fp32 ZeRO-2: weights 4P + fp32 master 4P + Adam 8P; the demo's supervised exports are bf16 (2P).
    assert sizes["sft"]["resumable_bytes"] == 16 * p and sizes["sft"]["export_bytes"] == 2 * p
    # PPO (one learner rank, ZeRO-0: the torch AdamW holds the fp32 weights themselves, 4P + Adam 8P):
    # actor + critic engines + the policy's HF folder (fp32, for an exact resume); the final export in bf16.
    assert sizes["ppo"]["resumable_bytes"] == 12 * p + 12 * report["model"]["backbone_params"] + 4 * p
    assert sizes["ppo"]["after_finish_bytes"] == 2 * p  # ppo.export_dtype bfloat16
    kept = checkpoint_sizes(load_config(REPO / "configs" / "demo.yaml", ["ppo.keep_resume_state=true"]),
                            model_shape(cfg.model.base))["ppo"]
    assert kept["after_finish_bytes"] == 2 * p + kept["resumable_bytes"] * kept["keep_checkpoints"]
    # SmolLM2-135M: what `make demo` leaves: nine bf16 exports (sft, disc, rm, DPO, FIGA and the four PPO
    # policies, the last six stochastically rounded from fp32: 9 x 0.27 GB).
    assert report["ppo_runs"] == 4 and sizes["dpo"]["export_bytes"] == sizes["figa"]["export_bytes"] == 2 * p
    total = sum(sizes[s]["after_finish_bytes"] for s in ("sft", "disc", "rm", "dpo", "figa")) \
        + 4 * sizes["ppo"]["after_finish_bytes"]
    assert 2.3e9 < total < 2.5e9
    assert "left after the pipeline (4 PPO runs): 2.4" in format_table(report)


def test_the_plan_counts_the_sync_path_a_run_would_take():
    gpu = gpu_bytes("a100-80gb")
    colocated = plan(load_config(REPO / "configs" / "a100-7b.yaml"), gpu)["groups"]
    separate = plan(load_config(REPO / "configs" / "a100-7b-2node.yaml"), gpu)["groups"]
    assert colocated["ppo.learner"]["inputs"]["weight_sync"] == "cuda_ipc"
    assert colocated["ppo.rollout"]["inputs"]["weight_sync"] == "cuda_ipc"
    assert separate["ppo.learner"]["inputs"]["weight_sync"] == "nccl"
    assert colocated["ppo.learner"]["breakdown"]["sync_host"] == 0  # the IPC handover never leaves the GPU
    # Colocated, the engines read the learner's buffers: no NCCL receive buffers during the sync.
    assert colocated["ppo.rollout"]["phases"]["sync"] == colocated["ppo.rollout"]["phases"]["generate"]
    # On CPU, auto plans the object store's whole-policy copy (shm's same-node rule is only known at start);
    # asked for, shm holds one bucket.
    store, shm = (plan(load_config(REPO / "configs" / "demo.yaml", [f"ppo.weight_sync={w}"]), gpu)["groups"]
                  for w in ("auto", "shm"))
    assert store["ppo.learner"]["inputs"]["weight_sync"] == "object_store"
    assert shm["ppo.learner"]["breakdown"]["sync_host"] < store["ppo.learner"]["breakdown"]["sync_host"]
    assert shm["ppo.rollout"]["phases"]["sync"] < store["ppo.rollout"]["phases"]["sync"]
