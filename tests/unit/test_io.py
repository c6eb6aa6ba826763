"""Durable file I/O (tlcr_ray.io): atomic writes, JSONL reading with file:line errors, and the
append-only keyed cache that the reviser, the judge and the benchmark answers share."""
from __future__ import annotations

import json
import os

import pytest

from tlcr_ray.io import (
    JsonlError,
    KeyedJsonl,
    atomic_folder,
    iter_jsonl,
    read_json,
    write_json_atomic,
    write_jsonl_atomic,
)


@pytest.mark.parametrize("group_commit", [False, True])
def test_keyed_cache_survives_a_torn_last_line_and_names_a_corrupt_one(tmp_path, group_commit):
    path = tmp_path / "judgments.jsonl"
    with KeyedJsonl(path, group_commit=group_commit) as cache:
        cache.add({"key": "a", "status": "error"})
        cache.add({"key": "a", "status": "ok"})  # the last row of a key wins
    with path.open("a") as fh:
        fh.write('{"key": "b", "sta')  # killed mid-write
    with KeyedJsonl(path, group_commit=group_commit) as again:
        assert again.rows == {"a": {"key": "a", "status": "ok"}} and "a" in again and "b" not in again
        again.add({"key": "b", "status": "ok"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "a", "b"]
    assert set(KeyedJsonl(path).rows) == {"a", "b"}
    path.write_text('{"key": "a"}\nnot json\n{"key": "c"}\n')
    with pytest.raises(ValueError, match="judgments.jsonl:2"):
        KeyedJsonl(path)


def test_iter_jsonl_names_file_and_line_or_skips_or_yields(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(JsonlError, match=r"rows.jsonl:3: invalid JSON"):
        list(iter_jsonl(path))
    assert list(iter_jsonl(path, on_invalid="skip")) == [(1, {"a": 1}), (4, {"a": 3})]
    yielded = list(iter_jsonl(path, on_invalid="yield"))
    assert [n for n, _ in yielded] == [1, 3, 4] and isinstance(yielded[1][1], JsonlError)


def test_atomic_writes_leave_no_temp_files(tmp_path):
    write_json_atomic(tmp_path / "sub" / "a.json", {"x": 1})
    write_jsonl_atomic(tmp_path / "b.jsonl", [{"y": 1}, {"y": 2}])
    assert read_json(tmp_path / "sub" / "a.json") == {"x": 1}
    assert [r for _, r in iter_jsonl(tmp_path / "b.jsonl")] == [{"y": 1}, {"y": 2}]
    with atomic_folder(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("new")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "model" / "weights").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["b.jsonl", "model", "sub"]
