"""Tracking for long jobs: atomic checkpoint folders and the one metrics log (JSONL + TensorBoard).

    ckpts = CheckpointDir("runs/demo/ppo-continuous/checkpoints", keep=2)
    with ckpts.writing(step=5) as tmp:        # a temp folder, renamed to step-000005 on success
        ...write into tmp...
    latest = ckpts.latest()                   # Path of the newest complete checkpoint, or None

    metrics = MetricsLog("runs/demo/ppo-continuous", resume_step=latest_step)
    metrics.write(step, {"reward_token_mean": 0.1, ...})

A resumed run first drops metrics rows past the checkpoint it resumes from, so each step appears
once in metrics.jsonl even when steps after the last checkpoint were computed twice.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from tlcr_ray.io import iter_jsonl, write_jsonl_atomic

PREFIX = "step-"


class CheckpointDir:
    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, keep)

    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every finished checkpoint, oldest first (temp folders are ignored)."""
        if not self.root.exists():
            return []
        found = []
        for path in self.root.iterdir():
            if path.is_dir() and path.name.startswith(PREFIX) and (path / "controller.json").exists():
                found.append((int(path.name[len(PREFIX):]), path))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    @contextlib.contextmanager
    def writing(self, step: int) -> Iterator[Path]:
        """Yield a temp folder; on success rename it to step-NNNNNN (atomic) and prune all but the newest
        `keep`. Temp folders left by a writer that died are removed first."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{PREFIX}{step:06d}"
        tmp = self.root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
        for stale in self.root.glob(f".tmp-{PREFIX}*"):  # a writer that died mid-save (GBs each): one writer per run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class MetricsLog:
    """The one metrics log of a run: append-only metrics.jsonl (a row per step, plus event rows such as
    `{"event": "resumed"}` or `{"eval_step": N, ...}`) mirrored to TensorBoard under <run_dir>/tb.

    Every PPO run and every supervised stage (its rank 0) writes through it.
    """

    def __init__(self, run_dir: str | Path, resume_step: int = 0, drop_after_resume: bool = True):
        """`drop_after_resume`: drop rows past `resume_step` (PPO: each step once); False keeps the
        history of every attempt (supervised stages: redone steps appear again after a resume row)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if drop_after_resume:
            self.truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1)

    def truncate_after(self, step: int) -> None:
        """Keep only rows with step <= `step` (and drop a torn last line from a killed writer)."""
        if not self.path.exists():
            return
        kept = [row for _, row in iter_jsonl(self.path, on_invalid="skip") if row.get("step", 0) <= step]
        write_jsonl_atomic(self.path, kept)

    def _append(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")

    def write(self, step: int, metrics: dict) -> None:
        self._append({"step": step, "time": round(time.time(), 3), **metrics})
        self._scalars(step, metrics)

    def event(self, **fields) -> None:
        """A row that is not a step (no `step` key, so a resume never drops it); an `eval_step` field
        puts its numbers on TensorBoard at that step."""
        self._append({"time": round(time.time(), 3), **fields})
        if "eval_step" in fields:
            self._scalars(fields["eval_step"], {k: v for k, v in fields.items() if k != "eval_step"})

    def _scalars(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def rows(self) -> list[dict]:
        return [row for _, row in iter_jsonl(self.path, on_invalid="skip")]

    def close(self) -> None:
        self.tb.close()


def read_step_rows(path: str | Path) -> list[dict]:
    """The step rows of a metrics.jsonl, last row per step winning (a resumed run may repeat a step)."""
    by_step: dict[int, dict] = {}
    for _, row in iter_jsonl(path, on_invalid="skip"):
        if "step" in row:
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]
