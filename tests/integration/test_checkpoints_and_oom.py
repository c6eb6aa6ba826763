"""Checkpoints sized sanely and out-of-memory errors (issue: memory at 7B, items 7 and 9), on a real tiny
PPO run and a real tiny supervised stage (Ray, DeepSpeed on CPU):

* a real allocator failure (the TLCR_TEST_OOM hook asks for 1 PiB) at step 2 ends the run with ONE
  `OutOfMemory` naming the group, the plan's estimate and the knobs, and the step-1 checkpoint is intact;
* keep_checkpoints=1 leaves one checkpoint; export_every writes `<run>/export` at its interval;
* the resumed run finishes; a finished run deletes its resumable state unless keep_resume_state, and a
  rerun of a finished run only reports it.

    .venv/bin/python -m pytest tests/integration/test_checkpoints_and_oom.py -q
"""
from __future__ import annotations

import json

import pytest

from tlcr_ray.oom import TEST_OOM_ENV, OutOfMemory

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _export_step(folder) -> int:
    return json.loads((folder / "tlcr_export.json").read_text())["step"]


def test_ppo_oom_message_checkpoint_resume_and_resume_state(tmp_path, ray_local, tiny_model_dir, head_models,
                                                            tiny_ppo_config, monkeypatch):
    from actors.controller import run

    sets = ["ppo.steps=3", "ppo.checkpoint_every=1", "ppo.keep_checkpoints=1", "ppo.export_every=1",
            "ppo.sync_check=false"]
    run_dir = tmp_path / "ppo-continuous"
    monkeypatch.setenv(TEST_OOM_ENV, "ppo.learner:2")
    with pytest.raises(OutOfMemory) as caught:
        run(tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous", *sets))
    message = str(caught.value)
    assert caught.value.group == "ppo.learner"
    assert message.startswith("ppo.learner ran out of memory during step 2: ")
    assert "can't allocate memory" in message and "tlcr plan estimates" in message
    assert "ppo.mini_batch_size (now 4)" in message and "ppo.learner.num_actors (now 2)" in message
    assert str(run_dir / "checkpoints" / "step-000001") in message
    assert "RayTaskError" not in message.splitlines()[0]
    # keep_checkpoints=1: one checkpoint, the one before the failure, complete; the step-1 export too.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001"]
    assert {"actor", "critic", "hf", "controller.json"} <= {p.name for p in (run_dir / "checkpoints" / "step-000001").iterdir()}
    assert _export_step(run_dir / "export") == 1
    assert not (run_dir / "model").exists()

    monkeypatch.delenv(TEST_OOM_ENV)
    kept = run(tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous", *sets, "ppo.keep_resume_state=true"))
    assert kept["steps"] == 3 and kept["resume_state"] != "deleted"
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000003"]
    assert _export_step(run_dir / "model") == 3 and not (run_dir / "export").exists()

    done = run(tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous", *sets))  # keep_resume_state false
    assert done["resume_state"] == "deleted" and not (run_dir / "checkpoints").exists()
    assert _export_step(run_dir / "model") == 3
    again = run(tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous", *sets))
    assert again["steps"] == 3 and again["wall_s"] == 0.0  # reported, not retrained


def test_supervised_oom_message_checkpoint_resume_and_resume_state(tmp_path, ray_local, tiny_model_dir, monkeypatch):
    from actors.supervised import run_sft
    from tlcr_ray.config import load_config

    run = tmp_path / "run"
    sets = [f"output_dir={run}", f"model.base={tiny_model_dir}", "data.max_pairs=16", "sft.max_steps=4",
            "sft.checkpoint_every=1", "sft.keep_checkpoints=1", "sft.export_every=1", "sft.max_failures=0"]
    stage = run / "sft"
    monkeypatch.setenv(TEST_OOM_ENV, "sft:3")
    with pytest.raises(OutOfMemory) as caught:
        run_sft(load_config("configs/tiny.yaml", sets))
    message = str(caught.value)
    assert message.startswith("sft ran out of memory: ") and "can't allocate memory" in message
    assert "tlcr plan estimates" in message and "sft.micro_batch_size (now 4; raise sft.grad_accum" in message
    ckpts = sorted(p for p in (stage / "ray").rglob("step_*") if p.is_dir())
    assert [p.name for p in ckpts] == ["step_000002"] and str(ckpts[0]) in message
    assert _export_step(stage / "export") == 2 and not (stage / "model").exists()

    monkeypatch.delenv(TEST_OOM_ENV)
    kept = run_sft(load_config("configs/tiny.yaml", sets + ["sft.keep_resume_state=true"]))
    assert kept["resumed_from"] == 2 and kept["resume_state"] != "deleted"
    assert [p.name for p in (stage / "ray").rglob("step_*") if p.is_dir()] == ["step_000004"]
    assert _export_step(stage / "model") == 4 and not (stage / "export").exists()

    done = run_sft(load_config("configs/tiny.yaml", sets))
    assert done["resume_state"] == "deleted" and not (stage / "ray").exists()
    again = run_sft(load_config("configs/tiny.yaml", sets))
    assert again["steps"] == 4 and again["resume_state"] == "deleted"  # the summary, not a retrain
