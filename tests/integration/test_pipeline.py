"""The whole pipeline on configs/tiny.yaml (tiny model, a few dozen pairs, a few steps per stage) with every
method of the paper's Table 1, then a rerun that skips every finished stage."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Seven methods, twice (the rerun only skips): well past the suite's 900 s default on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(5400)]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# pipeline.methods -> the report's row.
METHOD_ROWS = {"sft": "SFT", "dpo": "DPO", "ppo-seq": "PPO-seq", "remax": "ReMax", "figa": "FIGA",
               "tlcr-fixed": "TLCR-fixed", "tlcr": "TLCR"}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _pipeline(run_dir: Path, model_dir: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tlcr_ray.cli", "pipeline", "--config", str(REPO / "configs" / "tiny.yaml"),
           "--set", f"output_dir={run_dir}", "--set", f"model.base={model_dir}",
           "--set", f"pipeline.methods=[{', '.join(METHOD_ROWS)}]", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2700)  # seven methods


def test_pipeline_end_to_end_then_rerun_skips(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    first = _pipeline(run_dir, tiny_model_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    report = run_dir / "report"
    md = (report / "report.md").read_text()
    for name in ("reward", "kl", "length", "perplexity", "entropy"):
        width, height = _png_size(report / f"{name}.png")
        assert width > 100 and height > 100
        assert f"({name}.png)" in md
    for policy in METHOD_ROWS.values():
        assert f"| {policy} |" in md, md
    heatmap = (report / "heatmap.html").read_text()
    assert "Held-out labelled pairs" in heatmap and "<span title=\"r=" in heatmap
    table = json.loads((report / "reward_table.json").read_text())
    assert set(table["rows"]) == set(METHOD_ROWS.values())
    timings = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert {"label", "sft", "train-disc", "dpo", "eval-dpo", "figa", "ppo-continuous", "ppo-sequence", "ppo-remax",
            "ppo-fixed", "report"} <= set(timings)
    dpo_eval = json.loads((run_dir / "dpo" / "eval.json").read_text())
    assert dpo_eval["pairs"] > 0 and 0.0 <= dpo_eval["pairwise_accuracy"] <= 1.0
    reference = json.loads((run_dir / "dpo" / "reference_logps.json").read_text())
    assert reference["pairs"] == json.loads((run_dir / "dpo" / "summary.json").read_text())["train_examples"] \
        + json.loads((run_dir / "dpo" / "summary.json").read_text())["heldout_examples"]
    assert "## DPO (held-out pairs)" in md

    before = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/model/config.json")}
    second = _pipeline(run_dir, tiny_model_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done already") == len(timings), second.stdout
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.glob("*/model/config.json")}
