"""`tlcr dpo` on Ray Train + DeepSpeed (2 gloo workers): the reference log-probs are computed once (sharded
over the ranks, gathered, cached), a crash and a rerun read the cache, and the first step's loss is log 2."""
from __future__ import annotations

import json
import math

import pytest

from tlcr_ray.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_dpo_reference_logps_once_across_a_crash_and_a_rerun(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    from actors.supervised import FAIL_AT_STEP_ENV, run_dpo

    run = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={run}", f"model.base={tiny_model_dir}", "dpo.num_workers=2", "dpo.max_pairs=16",
        "dpo.max_steps=6", "dpo.checkpoint_every=2", "dpo.micro_batch_size=2", "dpo.max_failures=1",
        "dpo.keep_resume_state=true"])  # the rerun below restores the finished checkpoint
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")  # crash after the step-4 checkpoint; Ray restarts both workers
    summary = run_dpo(cfg)

    cache = run / "dpo" / "reference_logps.json"
    cached = json.loads(cache.read_text())
    assert cached["pairs"] == summary["train_examples"] + summary["heldout_examples"] == len(cached["logps"])
    rows = [json.loads(line) for line in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "step" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the crash came before step 5 was logged
    # Step 1: the policy is the reference, so every margin is 0 and the loss is log 2 (the gathered shards
    # are attached to the right pairs on both ranks).
    first = next(r for r in rows if "step" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    resumed = next(r for r in rows if r.get("event") == "resumed")
    computed = [r["computed"] for r in rows if r.get("event") == "reference_logps"]
    assert computed == [True, False]  # the restarted workers read the cache
    assert resumed["from_step"] == 4
    # Written once, before step 1: the restarted workers read it instead of computing it again.
    written = cache.stat().st_mtime_ns
    assert written / 1e9 < first["time"] < resumed["time"]
    assert summary["resumed_from"] == 4 and (run / "dpo" / "model" / "config.json").exists()

    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    again = run_dpo(cfg)  # a rerun restores the finished checkpoint; the cache is read, not rewritten
    assert again["resumed_from"] == 6
    assert cache.stat().st_mtime_ns == written
