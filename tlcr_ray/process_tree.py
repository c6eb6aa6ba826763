"""The processes a command started, read from /proc (Linux; elsewhere every function finds nothing).

    procs = descendants(os.getpid())     # pid -> (start time, name), e.g. raylet, ray::DashboardAgent
    kill(procs, signal.SIGTERM)
    left = [pid for pid, (start, _) in procs.items() if alive(pid, start)]

A start time travels with each pid, so a pid the kernel reused for an unrelated process is never hit.
"""
from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> tuple[str, int, int, str] | None:
    """(state, ppid, session id, start time) of a process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2:].split()  # the name in (...) may hold spaces
        return fields[0], int(fields[1]), int(fields[3]), fields[19]
    except (OSError, ValueError, IndexError):
        return None


def _live() -> dict[int, tuple[str, int, int, str]]:
    """Every process that is not a zombie: pid -> its `_stat`."""
    pids = (int(e) for e in os.listdir("/proc") if e.isdigit()) if os.path.isdir("/proc") else ()
    return {pid: st for pid in pids if (st := _stat(pid)) is not None and st[0] != "Z"}


def alive(pid: int, start: str) -> bool:
    """The process `pid` that started at `start` still runs (a zombie does not)."""
    return (st := _stat(pid)) is not None and st[0] != "Z" and st[3] == start


def name(pid: int) -> str:
    """Ray retitles its Python processes (`ray::DashboardAgent`, `ray::IDLE`); others by their script."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    return os.path.basename(next((a for a in argv[1:] if a.endswith(".py")), argv[0]))


def descendants(root: int) -> dict[int, tuple[str, str]]:
    """Live descendants of `root`: pid -> (start time, name)."""
    live = _live()
    children: dict[int, list[int]] = {}
    for pid, st in live.items():
        children.setdefault(st[1], []).append(pid)
    out, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            out[pid] = (live[pid][3], name(pid))
            todo.append(pid)
    return out


def in_session(sid: int) -> dict[int, tuple[str, str]]:
    """Live processes of session `sid` (a command started with start_new_session): pid -> (start, name)."""
    return {pid: (st[3], name(pid)) for pid, st in _live().items() if st[2] == sid}


def kill(procs: dict[int, tuple[str, str]], sig: int) -> None:
    for pid, (start, _) in procs.items():
        if alive(pid, start):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def reap() -> None:
    """Collect exited children (ours and adopted orphans) so they do not linger as zombies."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
