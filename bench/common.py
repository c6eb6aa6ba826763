"""Shared by the benchmarks: print a figure and append a dated row to BENCHMARKS.md."""
from __future__ import annotations

import datetime as _dt
import platform
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "| date | bench | figure | value | goal | details | command |\n|---|---|---|---|---|---|---|\n"


def record(bench: str, figure: str, value: str, goal: str = "", details: str = "") -> None:
    """Print one measured figure and append it as a row of BENCHMARKS.md (never rewrites old rows)."""
    command = "python " + " ".join(sys.argv)
    print(f"[{bench}] {figure}: {value}  (goal {goal or '-'})  {details}")
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# Benchmarks\n\nAppended by `bench/*.py`; each row is one run on "
                                 "the machine named in it. Ratios are measured within one run.\n\n" + HEADER)
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    details = f"{details}; {platform.node() and platform.machine()} {_cpu_count()} cpu".strip("; ")
    with BENCHMARKS_MD.open("a") as fh:
        fh.write(f"| {date} | {bench} | {figure} | {value} | {goal} | {details} | `{command}` |\n")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
