"""A supervised stage on Ray Train + DeepSpeed (ZeRO-2, 2 gloo workers): checkpoints, a failure and the resume."""
from __future__ import annotations

import json

import pytest
import torch

from tlcr_ray import training as stages
from tlcr_ray.config import load_config
from tlcr_ray.labeling.labels import write_labels
from tlcr_ray.models import load_head_model


@torch.no_grad()
def accuracy(stage, model, examples, pad_id) -> float:
    model.eval()
    _, correct, counted = stages.compute_loss(stage, model, stages.collate(stage, examples, pad_id))
    return correct / counted


def test_torchtrainer_zero2_two_workers_checkpoints_and_resumes(ray_local, tiny_model_dir, tokenizer, tmp_path,
                                                               monkeypatch, planted_rows):
    from actors.supervised import FAIL_AT_STEP_ENV, run_disc

    run = tmp_path / "run"
    write_labels(run / "label" / "labels.jsonl", planted_rows(160, seed=1))
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={run}", f"model.base={tiny_model_dir}", "disc.num_workers=2", "disc.zero_stage=2",
        "disc.max_steps=24", "disc.checkpoint_every=8", "disc.keep_checkpoints=2", "disc.lr=0.003",
        "disc.lr_schedule=cosine", "disc.micro_batch_size=4", "disc.max_failures=1",
        "disc.keep_resume_state=true"])  # kept, so that the rerun below can restore it
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "12")  # crash after the step-8 checkpoint; Ray restarts the workers
    summary = run_disc(cfg)

    rows = [json.loads(line) for line in (run / "disc" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "step" in r]
    assert steps == list(range(1, 12)) + list(range(9, 25))  # steps 9-11 redone after restoring step 8
    assert {"event": "resumed", "from_step": 8}.items() <= next(r for r in rows if "event" in r).items()
    by_step = {r["step"]: r for r in rows if "step" in r}
    assert by_step[9]["lr"] == pytest.approx(3e-3 * stages.lr_factor(8, 24, 0, "cosine"))
    kept = sorted(p.name for p in (run / "disc" / "ray").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_000016", "step_000024"]

    assert summary["resumed_from"] == 8 and summary["eval_accuracy"] >= 0.95
    model = load_head_model(run / "disc" / "model")
    heldout = stages.disc_examples(planted_rows(32, seed=2), max_len=64)
    assert accuracy("disc", model, heldout, tokenizer.pad_token_id) >= 0.95

    # A rerun (e.g. after the driver died) restores the last checkpoint instead of starting over.
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    again = run_disc(cfg)
    assert again["resumed_from"] == 24


