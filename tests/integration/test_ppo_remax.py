"""ReMax (ppo.algorithm remax) through the real actors: greedy baseline, no critic, resumable."""
from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_remax_run_has_a_greedy_baseline_and_no_critic(tmp_path, ray_local, tiny_model_dir, head_models,
                                                         tiny_ppo_config):
    from actors.controller import run

    cfg = tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "sequence", "ppo.algorithm=remax",
                          "ppo.steps=2", "ppo.checkpoint_every=1", "ppo.keep_checkpoints=1", "ppo.keep_resume_state=true")
    summary = run(cfg)
    run_dir = tmp_path / "ppo-remax"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("reward_baseline", "reward_minus_baseline", "response_len_greedy", "policy_loss", "kl"):
            assert key in row and row[key] == row[key], key
        # The sequence reward sits on the last token: its per-row sum minus the greedy one's.
        assert row["reward_minus_baseline"] == pytest.approx(row["reward_seq_sum"] - row["reward_baseline"], abs=1e-5)
        assert "value_loss" not in row and "critic_lr" not in row and row["value_mean"] == 0.0
    # Two different responses per prompt: sampled and greedy rewards are not all equal.
    assert any(r["reward_minus_baseline"] != 0.0 for r in rows)
    (ckpt,) = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert (ckpt / "actor").is_dir() and not (ckpt / "critic").exists()
    assert (run_dir / "model" / "config.json").exists()
    assert not (tmp_path / "ppo-sequence").exists()

    # A finished run resumes to "nothing to do" from its actor-only checkpoint.
    again = run(tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "sequence", "ppo.algorithm=remax",
                                "ppo.steps=3", "ppo.checkpoint_every=1", "ppo.keep_checkpoints=1", "ppo.keep_resume_state=true"))
    assert again["steps"] == 3
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
