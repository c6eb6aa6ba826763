"""Shared by the benchmarks: print a figure and append a dated row to BENCHMARKS.md."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
SWITCHES = ("TLCR_MALLOC",)
HEADER = "| date | bench | figure | value | goal | details | command |\n|---|---|---|---|---|---|---|\n"


def record(bench: str, figure: str, value: str, goal: str = "", details: str = "") -> None:
    """Print one measured figure and append it as a row of BENCHMARKS.md (never rewrites old rows)."""
    # Environment switches that change what runs: the command names those it ran under (never other
    # TLCR_* variables: TLCR_API_KEY is a secret).
    env = " ".join(f"{k}={os.environ[k]}" for k in SWITCHES if k in os.environ)
    command = (env + " " if env else "") + "python " + " ".join(sys.argv)
    print(f"[{bench}] {figure}: {value}  (goal {goal or '-'})  {details}")
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# Benchmarks\n\nAppended by `bench/*.py`; each row is one run on "
                                 "the machine named in it. Ratios are measured within one run.\n\n" + HEADER)
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    details = f"{details}; {platform.node() and platform.machine()} {_cpu_count()} cpu".strip("; ")
    with BENCHMARKS_MD.open("a") as fh:
        fh.write(f"| {date} | {bench} | {figure} | {value} | {goal} | {details} | `{command}` |\n")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
