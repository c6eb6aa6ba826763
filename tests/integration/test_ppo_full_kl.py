"""ppo.kl_estimator=full through the PPO controller: a config error before Ray starts, and a 2-step Ray run."""
from __future__ import annotations

import json

import pytest

from tlcr_ray.config import ConfigError


def test_unknown_kl_estimator_is_a_config_error(tmp_path, tiny_model_dir, head_models,
        tiny_ppo_config):
    # Refused as the config is read (tests/unit/test_config.py covers every enum-like key).
    with pytest.raises(ConfigError, match="ppo.kl_estimator"):
        tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous", "ppo.kl_estimator=k2")


@pytest.mark.ray
@pytest.mark.slow
def test_two_step_run_with_full_kl(tmp_path, ray_local, tiny_model_dir, head_models,
        tiny_ppo_config):
    from actors.controller import run

    # lr 1e-3: one update moves the policy enough for a KL well above float32 noise.
    cfg = tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous", "ppo.kl_estimator=full",
                          "ppo.steps=2", "ppo.checkpoint_every=2", "ppo.learner.num_actors=1", "ppo.actor_lr=1.0e-3")
    assert run(cfg)["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "ppo-continuous" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # Step 1 scores the initial policy against itself; after one update the exact KL is positive and is
    # not the sampled-token estimate (which the loop also logs as kl_k1).
    assert abs(rows[0]["kl"]) < 1e-5
    assert rows[1]["kl"] > 1e-6 and rows[1]["kl"] != rows[1]["kl_k1"]
    assert rows[0]["sync_logprob_err"] < 1e-4  # an attempt's first sync is always checked
    assert "sync_logprob_err" not in rows[1]  # ... and then every ppo.sync_check_every (10) steps
