"""tlcr_ray.placement: the layouts, vLLM's TP>1 arguments and the shortfall message, checked without Ray or a GPU."""
from __future__ import annotations

from pathlib import Path

import pytest

from tlcr_ray.config import ConfigError, load_config
from tlcr_ray.placement import bundle_groups, ppo_placement, shortfall, strategy_for, vllm_engine_settings
from tlcr_ray.plan import GIB, plan
from tlcr_ray.plan_models import gpu_bytes

REPO = Path(__file__).resolve().parents[2]
NODE = {"CPU": 96.0, "GPU": 8.0}


def cfg_of(name: str, *sets: str):
    return load_config(REPO / "configs" / name, list(sets))


def two_node_cfg(*sets: str):
    return cfg_of("a100-7b-2node.yaml", *sets)


def test_vllm_tp1_needs_no_executor_settings():
    assert vllm_engine_settings(1, [0], 1.0, sleep=False, on_gpu=True) == ({}, {})


def test_vllm_tp2_gets_the_ray_executor_its_bundles_and_worker_share():
    env, kwargs = vllm_engine_settings(2, [4, 5], 0.25, sleep=True, on_gpu=True)
    assert env == {"VLLM_RAY_BUNDLE_INDICES": "4,5", "VLLM_RAY_PER_WORKER_GPUS": "0.25"}
    assert kwargs == {"distributed_executor_backend": "ray", "enable_sleep_mode": True}
    with pytest.raises(ValueError):
        vllm_engine_settings(2, [4], 1.0, sleep=False, on_gpu=True)


def test_sleep_mode_is_asked_only_on_gpu():
    assert vllm_engine_settings(1, [0], 0.0, sleep=True, on_gpu=False) == ({}, {})


def test_separate_layout_learner_first_and_strict_pack_when_one_node_holds_it():
    layout = ppo_placement(two_node_cfg().ppo, "vllm", nodes=[NODE, NODE])
    assert [g.name for g in layout.groups][0] == "tlcr-ppo-learner"
    learner = layout.groups[0]
    assert learner.strategy == "STRICT_PACK" and len(learner.bundles) == 8
    assert all(b["GPU"] == 1.0 for b in learner.bundles)
    # Nodes of 4 GPUs cannot hold 8 learner ranks: PACK (spread over nodes) instead of never placing.
    assert ppo_placement(two_node_cfg().ppo, "vllm", nodes=[{"CPU": 96, "GPU": 4}] * 3).groups[0].strategy == "PACK"
    # Unknown cluster, or a cold autoscaling one with only a CPU head up: ask for one node.
    assert strategy_for(learner.bundles, None) == "STRICT_PACK"
    assert strategy_for(learner.bundles, [{"CPU": 16.0}]) == "STRICT_PACK"


def test_tp2_engines_get_one_gpu_bundle_per_rank_and_a_zero_gpu_actor():
    cfg = two_node_cfg("ppo.vllm_tensor_parallel=2", "ppo.rollout.num_gpus=2")
    layout = ppo_placement(cfg.ppo, "vllm", nodes=[NODE, NODE])
    engines = layout.of("rollout")
    assert len(engines) == 2
    for i, a in enumerate(engines):
        pg = next(g for g in layout.groups if g.name == a.placement_group)
        assert pg.name == f"tlcr-ppo-rollout-{i}" and pg.strategy == "STRICT_PACK"
        # vLLM's Ray executor refuses bundles of more than one GPU: one 1-GPU bundle per TP rank.
        assert [b["GPU"] for b in pg.bundles] == [1.0, 1.0]
        assert a.num_gpus == 0.0 and a.bundle == 0 and a.worker_bundles == (0, 1) and a.worker_gpus == 1.0
        assert a.env_vars == {"VLLM_RAY_BUNDLE_INDICES": "0,1", "VLLM_RAY_PER_WORKER_GPUS": "1"}
        assert a.engine_kwargs == {"distributed_executor_backend": "ray"}
        assert pg.bundles[0]["CPU"] == cfg.ppo.rollout.num_cpus and "CPU" not in pg.bundles[1]
    # The NCCL weight-sync group keeps its layout: learner rank 0 + every TP worker.
    assert 1 + len(engines) * cfg.ppo.vllm_tensor_parallel == 5


def test_tp2_with_the_hf_backend_is_plain_tp1():
    cfg = two_node_cfg("ppo.vllm_tensor_parallel=2", "ppo.rollout.num_gpus=1")
    assert all(a.num_gpus == 1.0 and not a.env_vars for a in ppo_placement(cfg.ppo, "hf").of("rollout"))


def test_tp2_with_more_than_a_gpu_per_worker_is_refused():
    with pytest.raises(ConfigError, match="more than one GPU"):
        ppo_placement(two_node_cfg("ppo.vllm_tensor_parallel=2", "ppo.rollout.num_gpus=4").ppo, "vllm")


def test_colocated_layout_on_eight_bundles():
    cfg = cfg_of("a100-7b.yaml")
    layout = ppo_placement(cfg.ppo, "vllm", nodes=[NODE])
    (pg,) = layout.groups
    assert layout.colocate == "all" and len(pg.bundles) == 8 and pg.strategy == "STRICT_PACK"
    assert all(b["GPU"] == 1.0 for b in pg.bundles)
    assert [a.bundle for a in layout.of("learner")] == list(range(8))
    on = bundle_groups(layout)
    assert on[0] == ["learner", "rollout"]  # rank 0 (the sync clone) carries no scorer
    assert "reference" in on[7] and "reward" in on[5]
    assert all(a.engine_kwargs.get("enable_sleep_mode") for a in layout.of("rollout"))
    shares = [sum(a.num_gpus for a in layout.actors if a.bundle == i) for i in range(8)]
    assert max(shares) <= 1.0
    # Every bundle's CPUs are the sum of what sits on it.
    assert pg.bundles[0]["CPU"] == cfg.ppo.learner.num_cpus + cfg.ppo.rollout.num_cpus


def test_colocated_tp2_workers_share_bundles_with_the_learner():
    cfg = cfg_of("a100-7b.yaml", "ppo.vllm_tensor_parallel=2", "ppo.rollout.num_actors=4")
    layout = ppo_placement(cfg.ppo, "vllm", nodes=[NODE])
    engines = layout.of("rollout")
    assert [a.worker_bundles for a in engines] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert engines[1].env_vars["VLLM_RAY_BUNDLE_INDICES"] == "2,3"
    assert engines[1].env_vars["VLLM_RAY_PER_WORKER_GPUS"] == f"{cfg.ppo.rollout.num_gpus:g}"
    assert all(a.num_gpus == 0.0 for a in engines)


def test_colocated_refusals_name_the_field():
    with pytest.raises(ConfigError, match="ppo.rollout: 9 engines"):
        ppo_placement(cfg_of("a100-7b.yaml", "ppo.rollout.num_actors=9").ppo, "vllm")
    with pytest.raises(ConfigError, match="add up to"):
        ppo_placement(cfg_of("a100-7b.yaml", "ppo.learner.num_gpus=0.9").ppo, "vllm")
    with pytest.raises(ConfigError, match="share of one"):
        ppo_placement(cfg_of("a100-7b.yaml", "ppo.learner.num_gpus=2").ppo, "vllm")


def test_colocated_on_cpu_is_one_cpu_bundle_per_learner_rank():
    cfg = cfg_of("tiny.yaml", "ppo.colocate=all")
    layout = ppo_placement(cfg.ppo, "hf")
    (pg,) = layout.groups
    assert len(pg.bundles) == cfg.ppo.learner.num_actors and all("GPU" not in b for b in pg.bundles)
    assert sum(b["CPU"] for b in pg.bundles) == pytest.approx(sum(
        getattr(cfg.ppo, g).num_cpus * getattr(cfg.ppo, g).num_actors for g in ("learner", "rollout", "reward", "reference")))


def test_shortfall_names_what_is_missing_and_autoscaling():
    layout = ppo_placement(two_node_cfg().ppo, "vllm", nodes=None)
    msg = shortfall(layout.groups[0], {"CPU": 20.0, "GPU": 3.0}, {"CPU": 20.0, "GPU": 4.0}, 5)
    assert "tlcr-ppo-learner" in msg and "GPU 5 more" in msg and "CPU 60 more" in msg
    assert "{CPU: 80, GPU: 8}" in msg and "autoscales" in msg and "ppo.placement_wait_s" in msg
    msg = shortfall(layout.groups[0], {"CPU": 200.0, "GPU": 16.0}, {"CPU": 200.0, "GPU": 16.0}, 5)
    assert "no node holds the bundles as STRICT_PACK asks" in msg


def test_plan_adds_up_the_colocated_groups_per_gpu():
    cfg = cfg_of("a100-7b.yaml")
    report = plan(cfg, gpu_bytes("a100-80gb"))
    col = report["colocated"]
    assert col["bundles"] == 8 and col["fits"] and report["fits"]
    rollout = report["groups"]["ppo.rollout"]["phases"]
    # While the engines generate the learner keeps only its 16-bit weights: less than its train peak.
    learner = report["groups"]["ppo.learner"]["phases"]
    b0 = col["per_bundle"][0]
    assert b0["groups"] == ["learner", "rollout"]
    assert b0["phases"]["generate"] < rollout["generate"] + learner["train"]
    assert b0["phases"]["train"] < rollout["generate"] + learner["train"]  # the engine sleeps in train
    # Too big a vLLM share on a shared GPU does not fit, and the plan says so.
    big = plan(cfg_of("a100-7b.yaml", "ppo.vllm_memory_utilization=0.9"), gpu_bytes("a100-80gb"))
    assert not big["colocated"]["fits"] and not big["fits"]
    assert big["colocated"]["peak"] > 79 * GIB
