"""Durable file I/O: atomic writes (file or folder renamed into place) and append-only JSONL.

    write_json_atomic(path, {"a": 1})           # temp file + rename: readers never see half a file
    with atomic_folder("runs/x/model") as tmp:  # temp folder beside it, one rename on success
        ...
    for line_no, row in iter_jsonl(path): ...   # file:line in every error
    cache = KeyedJsonl(path)                    # append-only, keyed by row["key"], resumable

Every stage writes through these, so "what happens if the process is killed here" has one answer:
a finished output is complete or absent, and an append-only log loses at most its torn last line.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, default=str, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> Path:
    """The whole file at once (a derived output such as labels.jsonl, rebuilt from its inputs)."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n"
                                           for r in rows))


def read_json(path: str | Path) -> Any:
    """A JSON file's value; a missing or unparsable file is an error naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class JsonlError(ValueError):
    """An unreadable JSONL line; the message starts with `file:line:`."""


def iter_jsonl(path: str | Path, on_invalid: str = "raise") -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a .jsonl or .jsonl.gz file.

    on_invalid: `raise` (JsonlError naming file:line), `skip` (e.g. a metrics log's torn last line),
    or `yield` (the JsonlError in place of the value, for callers that count bad rows).
    """
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                error = JsonlError(f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})")
                if on_invalid == "raise":
                    raise error from None
                if on_invalid == "yield":
                    yield line_no, error


def cut_torn_tail(path: Path) -> None:
    """A writer killed mid-line leaves a last line without its newline: drop it so appends start clean."""
    if not path.exists():
        return
    with path.open("r+b") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)
            os.fsync(fh.fileno())


def read_keyed_jsonl(path: str | Path) -> dict[str, dict]:
    """Rows of an append-only JSONL cache by their `key` (the last row of a key wins); a torn last line
    is cut off; any other unreadable line is an error naming file and line."""
    path = Path(path)
    cut_torn_tail(path)
    if not path.exists():
        return {}
    rows: dict[str, dict] = {}
    for line_no, row in iter_jsonl(path, on_invalid="yield"):
        if isinstance(row, JsonlError) or not isinstance(row, dict) or "key" not in row:
            raise JsonlError(f"{path}:{line_no}: corrupt cache row; delete the line to redo that request")
        rows[row["key"]] = row
    return rows


class KeyedJsonl:
    """Append-only JSONL keyed by `row["key"]`: each row is flushed as it is added, so a SIGKILL loses
    nothing added before it, and a rerun finds every finished row in `rows`.

    `group_commit=True` fsyncs from a background thread (an asyncio caller never waits on the disk);
    otherwise every `add` fsyncs before it returns. `close()` fsyncs the rest.
    """

    def __init__(self, path: str | Path, group_commit: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_keyed_jsonl(self.path)
        self._fh = self.path.open("a", encoding="utf-8")
        self._group = group_commit
        self._dirty = threading.Event()
        self._closed = False
        if group_commit:
            self._syncer = threading.Thread(target=self._sync_loop, name="jsonl-fsync", daemon=True)
            self._syncer.start()

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: dict) -> None:
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        if self._group:
            self._dirty.set()
        else:
            os.fsync(self._fh.fileno())
        self.rows[row["key"]] = row

    def _sync_loop(self) -> None:
        while True:
            self._dirty.wait()
            if self._closed:
                return
            self._dirty.clear()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._group:
            self._dirty.set()
            self._syncer.join()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def __enter__(self) -> "KeyedJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
