"""CheckpointDir: atomic step folders, keep_checkpoints honoured, a failed or dead writer leaves the last one intact."""
from __future__ import annotations

import pytest

from tlcr_ray.tracking import CheckpointDir


def _write(ckpts: CheckpointDir, step: int) -> None:
    with ckpts.writing(step) as tmp:
        (tmp / "controller.json").write_text("{}")
        (tmp / "weights.bin").write_bytes(b"x" * 10)


def test_keep_one_leaves_exactly_the_newest(tmp_path):
    ckpts = CheckpointDir(tmp_path / "c", keep=1)
    for step in (1, 2, 3):
        _write(ckpts, step)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["step-000003"]
    assert ckpts.latest() == tmp_path / "c" / "step-000003"


def test_a_failed_save_and_a_dead_writers_leftovers_leave_the_last_checkpoint(tmp_path):
    ckpts = CheckpointDir(tmp_path / "c", keep=2)
    _write(ckpts, 1)
    with pytest.raises(MemoryError):
        with ckpts.writing(2) as tmp:
            (tmp / "controller.json").write_text("{}")
            raise MemoryError("out of memory while saving")
    (tmp_path / "c" / ".tmp-step-000002-99999").mkdir()  # a writer killed mid-save
    assert [s for s, _ in ckpts.complete()] == [1]
    _write(ckpts, 2)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["step-000001", "step-000002"]
