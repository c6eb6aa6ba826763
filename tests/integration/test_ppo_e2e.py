"""A 3-step PPO run per reward mode on a local Ray: hf rollout, 2 DeepSpeed learner ranks (ZeRO-2, gloo)."""
from __future__ import annotations

import json

import pytest

from tlcr_ray.rl.rewards import MODES

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.parametrize("mode", MODES)
def test_three_step_run(mode, tmp_path, ray_local, tiny_model_dir, head_models, tiny_ppo_config):
    from actors.controller import run

    # One mode takes the old log-probs from the HF engine's sampling (ppo.old_logprobs rollout).
    from_rollout = mode == "fixed"
    cfg = tiny_ppo_config(tmp_path, tiny_model_dir, head_models, mode, "ppo.sync_check_every=2",
                          *(["ppo.old_logprobs=rollout"] if from_rollout else []))
    summary = run(cfg)
    run_dir = tmp_path / f"ppo-{mode}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert summary["steps"] == 3 and summary["failures_recovered"] == 0
    for row in rows:
        for key in ("reward_token_mean", "reward_seq_sum", "kl", "response_len", "perplexity", "entropy",
                    "policy_loss", "value_loss", "clip_frac", "time_generate", "time_score", "time_reference",
                    "time_train", "time_sync", "tokens_per_s", "stop_frac", "truncated_frac"):
            assert key in row and row[key] == row[key], key  # present and not NaN
        assert 1 <= row["response_len"] <= 12
    # The sync check runs on the first sync, then every 2nd step; the rollout engine's weights are the learner's.
    assert [r["step"] for r in rows if "sync_logprob_err" in r] == [1, 2]
    assert all(r["sync_logprob_err"] < 1e-4 for r in rows[:2])
    if from_rollout:  # one epoch of one mini-batch: the update's ratio is 1 when the engine's log-probs are the learner's
        assert all(r["approx_kl"] < 1e-9 for r in rows), [r["approx_kl"] for r in rows]
    # The policy moved (lr 1e-4), so KL against the frozen reference is no longer exactly zero.
    assert rows[-1]["kl"] != 0.0
    assert (run_dir / "model" / "config.json").exists()
    # Finished: the resumable state is gone (ppo.keep_resume_state false), the final export says so.
    assert not (run_dir / "checkpoints").exists() and summary["resume_state"] == "deleted"
    assert json.loads((run_dir / "model" / "tlcr_export.json").read_text())["final"] is True
    if mode == "sequence":
        assert any(r["reward_token_mean"] != 0 for r in rows)


def test_a_run_with_a_shared_critic(tmp_path, ray_local, tiny_model_dir, head_models, tiny_ppo_config):
    """ppo.critic shared through the Ray layer: 2 learner ranks (ZeRO-2, gloo), one engine each with the
    value head; the value loss is logged, the checkpoint holds no critic engine, the rollout engine's weights
    are the learner's and the final HF folder is the policy alone."""
    from safetensors import safe_open

    from actors.controller import run

    cfg = tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous", "ppo.critic=shared", "ppo.steps=1",
                          "ppo.keep_resume_state=true")
    assert run(cfg)["steps"] == 1
    run_dir = tmp_path / "ppo-continuous"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["value_loss"] > 0 and rows[0]["policy_loss"] == rows[0]["policy_loss"]
    assert rows[0]["sync_logprob_err"] < 1e-4  # the rollout engine got the learner's policy
    checkpoint, = (run_dir / "checkpoints").glob("step-*")
    assert sorted(p.name for p in checkpoint.iterdir()) == ["actor", "controller.json", "hf"]  # no critic
    names = set()
    for shard in (run_dir / "model").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names.update(f.keys())
    assert names and not any("value_head" in n or n.startswith("policy.") for n in names)
