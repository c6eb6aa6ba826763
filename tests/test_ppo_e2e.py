"""A 3-step PPO run per reward mode on a local Ray: hf rollout, 2 DeepSpeed learner ranks (ZeRO-2, gloo)."""
from __future__ import annotations

import json

import pytest
import torch

from tlcr_ray.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
MODES = ["continuous", "fixed", "no_negative", "no_positive", "sequence"]


@pytest.fixture(scope="session")
def head_models(tmp_path_factory, tiny_model_dir, tokenizer):
    """A tiny token discriminator and a tiny sequence RM over the tiny backbone."""
    from tlcr_ray.models import SequenceRewardModel, TokenDiscriminator, save_head_model

    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    disc = save_head_model(TokenDiscriminator.from_pretrained(tiny_model_dir, seed=1), root / "disc", tokenizer)
    rm = save_head_model(SequenceRewardModel.from_pretrained(tiny_model_dir, seed=2), root / "rm", tokenizer)
    return {"disc": str(disc), "rm": str(rm)}


def tiny_ppo_config(out_dir, tiny_model_dir, head_models, mode, *extra):
    return load_config("configs/tiny.yaml", [
        f"output_dir={out_dir}", f"ppo.policy={tiny_model_dir}", f"reward.mode={mode}",
        f"reward.discriminator={head_models['disc']}", f"reward.reward_model={head_models['rm']}",
        "model.max_response_len=12", "data.max_pairs=16", *extra])


@pytest.mark.parametrize("mode", MODES)
def test_three_step_run(mode, tmp_path, ray_local, tiny_model_dir, head_models):
    from actors.controller import run

    cfg = tiny_ppo_config(tmp_path, tiny_model_dir, head_models, mode, "ppo.sync_check_every=2")
    summary = run(cfg)
    run_dir = tmp_path / f"ppo-{mode}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert summary["steps"] == 3 and summary["failures_recovered"] == 0
    for row in rows:
        for key in ("reward_token_mean", "reward_seq_sum", "kl", "response_len", "perplexity", "entropy",
                    "policy_loss", "value_loss", "clip_frac", "time_generate", "time_score", "time_reference",
                    "time_train", "time_sync", "tokens_per_s"):
            assert key in row and row[key] == row[key], key  # present and not NaN
        assert 1 <= row["response_len"] <= 12
    # The sync check runs on the first sync, then every 2nd step; the rollout engine's weights are the learner's.
    assert [r["step"] for r in rows if "sync_logprob_err" in r] == [1, 2]
    assert all(r["sync_logprob_err"] < 1e-4 for r in rows[:2])
    # The policy moved (lr 1e-4), so KL against the frozen reference is no longer exactly zero.
    assert rows[-1]["kl"] != 0.0
    assert (run_dir / "model" / "config.json").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-000002", "step-000003"] or \
        sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    if mode == "sequence":
        assert any(r["reward_token_mean"] != 0 for r in rows)
