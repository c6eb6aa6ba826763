"""The planted-phrase benchmark end to end on the tiny model: configs/planted.yaml through label, SFT, the
discriminator, its held-out evaluation, PPO (TLCR) with the per-step held-out probe, and the report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tlcr_ray.tracking import read_step_rows

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_planted_pipeline_discriminator_separates_planted_tokens(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    overrides = [f"output_dir={run_dir}", f"model.base={tiny_model_dir}", "data.max_pairs=160",
                 "sft.epochs=1", "disc.epochs=3", "disc.lr=3.0e-3", "pipeline.ppo_modes=[continuous]",
                 "pipeline.eval_prompts=8", "pipeline.heatmap_samples=2", "ppo.steps=2", "ppo.prompts_per_step=8",
                 "ppo.mini_batch_size=8", "ppo.ppo_epochs=1", "ppo.heldout_every=1"]
    cmd = [sys.executable, "-m", "tlcr_ray.cli", "pipeline", "--config", str(REPO / "configs" / "planted.yaml"),
           *[x for kv in overrides for x in ("--set", kv)]]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    labels = json.loads((run_dir / "label" / "summary.json").read_text())
    assert labels["revised"] == labels["pairs"] == 160 and labels["token_labels"]["0"] > 0
    # The labels are the known truth, so a discriminator that learned them ranks planted tokens (label 0)
    # below the others on held-out pairs; with shuffled labels this AUC sits at ~0.5.
    disc = json.loads((run_dir / "disc" / "eval.json").read_text())
    assert disc["negative_tokens"] > 50, disc
    assert disc["negative_vs_neutral_auc"] > 0.8, disc
    assert disc["mean_reward_chosen"] > disc["mean_reward_rejected"], disc

    rows = read_step_rows(run_dir / "ppo-continuous" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert 0.0 <= row["heldout_planted_share"] <= 1.0 and len(row["heldout_replies"]) == 8
    assert "kl" in rows[-1] and "kl" not in rows[0]  # step 0 is the SFT policy's probe only
    report = run_dir / "report"
    assert (report / "planted.png").exists()
    assert "(planted.png)" in (report / "report.md").read_text()
