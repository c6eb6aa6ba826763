"""Lost actors mid-run: the controller recreates the groups and resumes from the last checkpoint."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _steps(path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _actor(ray, name: str, deadline: float):
    while time.time() < deadline:
        try:
            return ray.get_actor(name)
        except ValueError:
            time.sleep(0.5)
    raise TimeoutError(name)


def test_killed_learner_then_rollout_resume_from_checkpoint(tmp_path, ray_local, tiny_model_dir, head_models,
        tiny_ppo_config):
    from actors.controller import run

    ray = ray_local
    cfg = tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous", "ppo.steps=6",
                          "ppo.checkpoint_every=2", "ppo.max_failures=2")
    metrics = tmp_path / "ppo-continuous" / "metrics.jsonl"
    killed = []

    def killer():
        deadline = time.time() + 600
        # 1) SIGKILL learner rank 1's process once step 3 is logged (checkpoint 2 exists; step 4 running).
        while 3 not in _steps(metrics) and time.time() < deadline:
            time.sleep(0.2)
        pid = ray.get(_actor(ray, "tlcr-ppo-learner-a0-rank1", deadline).pid.remote())
        os.kill(pid, signal.SIGKILL)
        killed.append(("learner", _steps(metrics)[-1]))
        # 2) ray.kill the recreated rollout actor once the second attempt has logged step 5.
        rollout = _actor(ray, "tlcr-ppo-rollout-0-a1", deadline)
        while _steps(metrics).count(5) == 0 and time.time() < deadline:
            time.sleep(0.2)
        ray.kill(rollout, no_restart=True)
        killed.append(("rollout", _steps(metrics)[-1]))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run(cfg)
    thread.join(timeout=60)
    assert [k for k, _ in killed] == ["learner", "rollout"]
    assert summary["steps"] == 6
    assert summary["failures_recovered"] == 2
    steps = _steps(metrics)
    assert steps == [1, 2, 3, 4, 5, 6], steps  # no duplicated or missing step after two resumes
    # Each attempt checks its first weight sync (recreated engines), then every 10th step: 1, 3 and 5.
    checked = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "sync_logprob_err" in line]
    assert checked == [1, 3, 5], checked
    assert (tmp_path / "ppo-continuous" / "model" / "config.json").exists()


def test_failures_beyond_budget_raise(tmp_path, ray_local, tiny_model_dir, head_models,
        tiny_ppo_config):
    from actors.controller import run

    ray = ray_local
    cfg = tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous", "ppo.steps=50",
                          "ppo.max_failures=0")

    def killer():
        deadline = time.time() + 600
        rollout = _actor(ray, "tlcr-ppo-rollout-0-a0", deadline)
        while 1 not in _steps(tmp_path / "ppo-continuous" / "metrics.jsonl") and time.time() < deadline:
            time.sleep(0.2)
        ray.kill(rollout, no_restart=True)

    threading.Thread(target=killer, daemon=True).start()
    with pytest.raises(RuntimeError, match="max_failures=0"):
        run(cfg)
