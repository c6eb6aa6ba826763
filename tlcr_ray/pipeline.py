"""`tlcr pipeline`: label → SFT → discriminator → RM → eval → PPO per mode → report, from one config.

    tlcr pipeline --config configs/demo.yaml [--force]

Every stage writes an atomic output (a folder or file renamed into place); when that output exists
the stage is skipped, so a killed pipeline resumes at the first unfinished stage. Wall times go to
`<output_dir>/pipeline.json` (kept across reruns) and into the report.

The stage functions themselves are handed in by the CLI face (`run_stage`), which keeps this module
free of Ray: it only decides what runs, in which order, with which config.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from tlcr_ray.config import Config, to_dict

RunStage = Callable[[str, Config], dict | None]


@dataclass
class Stage:
    name: str
    """Name shown in logs and pipeline.json (e.g. `ppo-continuous`)."""
    command: str
    """CLI subcommand that runs it (`label`, `sft`, `ppo`, `eval-disc`, `report`, ...)."""
    output: Path
    """Written atomically at the end of the stage; its presence means the stage is done."""
    cfg: Config


def plan(cfg: Config) -> list[Stage]:
    """The stages of a full run, in order."""
    out = Path(cfg.output_dir)
    stages = [
        Stage("label", "label", out / "label" / "labels.jsonl", cfg),
        Stage("sft", "sft", out / "sft" / "model", cfg),
        Stage("train-disc", "train-disc", out / "disc" / "model", cfg),
        Stage("eval-disc", "eval-disc", out / "disc" / "eval.json", cfg),
    ]
    if "sequence" in cfg.pipeline.ppo_modes:
        stages.append(Stage("train-rm", "train-rm", out / "rm" / "model", cfg))
        stages.append(Stage("eval-rm", "eval-rm", out / "rm" / "eval.json", cfg))
    for mode in cfg.pipeline.ppo_modes:
        mode_cfg = copy.deepcopy(cfg)
        mode_cfg.reward.mode = mode
        stages.append(Stage(f"ppo-{mode}", "ppo", out / f"ppo-{mode}" / "model", mode_cfg))
    stages.append(Stage("report", "report", out / "report" / "report.md", cfg))
    return stages


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def run(cfg: Config, run_stage: RunStage, force: bool = False) -> dict:
    """Run every unfinished stage of `plan(cfg)`; returns the timing summary written to pipeline.json."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    record_path = out / "pipeline.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"stages": {}}
    stages = plan(cfg)
    started = time.time()
    for i, stage in enumerate(stages, 1):
        if stage.output.exists() and not force:
            print(f"[pipeline {i}/{len(stages)}] {stage.name}: done already ({stage.output}), skipping", flush=True)
            record["stages"].setdefault(stage.name, {})["skipped_last_run"] = True
            continue
        print(f"[pipeline {i}/{len(stages)}] {stage.name} ...", flush=True)
        t0 = time.time()
        run_stage(stage.command, stage.cfg)
        if not stage.output.exists():
            raise RuntimeError(f"stage {stage.name} finished without writing {stage.output}")
        seconds = round(time.time() - t0, 1)
        record["stages"][stage.name] = {"seconds": seconds, "skipped_last_run": False}
        print(f"[pipeline {i}/{len(stages)}] {stage.name}: {seconds} s", flush=True)
        _write_json_atomic(record_path, record)
    record["last_run_seconds"] = round(time.time() - started, 1)
    _write_json_atomic(record_path, record)
    return record
