"""Run bookkeeping for long jobs: step metrics (JSONL + TensorBoard) and atomic checkpoint folders.

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
from pathlib import Path
from typing import Iterator

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
        """Yield a temp folder; on success rename it to step-NNNNNN (atomic) and prune old ones."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{PREFIX}{step:06d}"
        tmp = self.root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
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


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


class MetricsLog:
    """Append-only metrics.jsonl (one row per step) mirrored to TensorBoard under <run_dir>/tb."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1)

    def truncate_after(self, step: int) -> None:
        """Keep only rows with step <= `step` (and drop a torn last line from a killed writer)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        self.tb.close()
