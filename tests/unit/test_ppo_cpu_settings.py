"""`ppo.rollout_dtype`: the engines keep their own weight dtype (bf16 under an fp32 learner), every sync
casts into it, evaluation still generates in model.dtype, and `tlcr plan` counts the engine's bytes;
and the OpenMP wait policy and thread count each PPO group's actors start with (`actors.groups.group_env`).

    .venv/bin/python -m pytest tests/unit/test_ppo_cpu_settings.py -q
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tlcr_ray.config import load_config, rollout_dtype

REPO = Path(__file__).resolve().parents[2]


def test_auto_is_the_model_dtype_and_evaluation_keeps_it():
    from tlcr_ray.eval.answers import eval_engine_kwargs
    from tlcr_ray.rl.rollout import engine_kwargs_of

    assert rollout_dtype(load_config(REPO / "configs" / "demo.yaml")) == "float32"
    cfg = load_config(REPO / "configs" / "demo.yaml", ["ppo.rollout_dtype=bf16"])
    assert cfg.ppo.rollout_dtype == "bfloat16" and rollout_dtype(cfg) == "bfloat16"
    assert engine_kwargs_of(cfg)["dtype"] == "bfloat16"
    assert eval_engine_kwargs(cfg, None)["dtype"] == "float32"  # every method is judged as it trained


def test_a_bf16_engine_takes_fp32_weights_cast_into_its_own_dtype(tiny_model_dir):
    from tlcr_ray.models import load_policy
    from tlcr_ray.rl.rollout import make_engine

    engine = make_engine("hf", tiny_model_dir, dtype="bfloat16")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    learner = load_policy(tiny_model_dir, dtype="float32")
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.01 * torch.randn_like(p))  # an update the engine has not seen
    state = {k: v for k, v in learner.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    engine.load_weight_stream([{k: state[k] for k in names[:3]}, {k: state[k] for k in names[3:]}])
    held = engine.model.state_dict()
    assert all(held[k].dtype == torch.bfloat16 and torch.equal(held[k], v.to(torch.bfloat16)) for k, v in state.items())
    batch = engine.generate([[3000, 3001, 3002]], max_new_tokens=4, temperature=1.0, top_p=1.0, seed=0)
    assert len(batch.response_ids[0]) >= 1


def test_the_plan_counts_the_engines_own_bytes():
    from tlcr_ray.plan import gpu_bytes, plan

    fp32, bf16 = (plan(load_config(REPO / "configs" / "demo.yaml", over), gpu_bytes("a100-80gb"))["groups"]["ppo.rollout"]
                  for over in ([], ["ppo.rollout_dtype=bfloat16"]))
    assert bf16["per_gpu"]["model_states"] * 2 == fp32["per_gpu"]["model_states"]
    assert bf16["per_gpu"]["kv_cache"] * 2 == fp32["per_gpu"]["kv_cache"]
    assert bf16["inputs"]["dtype"] == "bfloat16" and fp32["inputs"]["dtype"] == "float32"


@pytest.mark.parametrize("group, fields, expected", [
    ("rollout", {}, {}), ("reward", {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("reference", {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("learner", {}, {}),  # a one-pass update evaluates nothing beside the scorers
    ("learner", {"fuse_evaluation": "off"}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("learner", {"ppo_epochs": 2}, {"OMP_WAIT_POLICY": "PASSIVE"})])
def test_the_groups_that_compute_alone_keep_openmps_own_wait_policy(monkeypatch, group, fields, expected):
    pytest.importorskip("ray")
    from actors.groups import wait_policy
    from tlcr_ray.config import PPOConfig

    ppo = PPOConfig(**{"prompts_per_step": 4, "mini_batch_size": 4, "ppo_epochs": 1, **fields})
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert wait_policy(ppo, group) == expected
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice applies to every group
    assert wait_policy(ppo, group) == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_a_groups_own_thread_count_overrides_threads_per_actor(monkeypatch):
    pytest.importorskip("ray")
    from actors.groups import group_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cfg = load_config(REPO / "configs" / "demo.yaml", ["ppo.reward.threads=1"])
    assert group_env(cfg.ppo, "reward") == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    assert group_env(cfg.ppo, "reference") == {"OMP_WAIT_POLICY": "PASSIVE"}  # ppo.threads_per_actor's (2) applies
    assert group_env(cfg.ppo, "rollout") == {}
