"""`tlcr pipeline`: label → SFT → discriminator → RM → eval → every method of `pipeline.methods` (DPO,
FIGA, one PPO or ReMax run per PPO method) → [judge table] → report, from one config.

    tlcr pipeline --config configs/demo.yaml [--force]

Every stage writes an atomic output (a folder or file renamed into place); when that output exists
the stage is skipped, so a killed pipeline resumes at the first unfinished stage. Wall times go to
`<output_dir>/pipeline.json` (kept across reruns) and into the report.

The stage functions themselves are handed in by the CLI face (`run_stage`), which keeps this module
free of Ray: it only decides what runs, in which order, with which config.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from tlcr_ray.config import Config, to_dict
from tlcr_ray.io import read_json, write_json_atomic, write_text_atomic
from tlcr_ray.layout import RunLayout
from tlcr_ray.methods import METHODS, Method, resolve_methods

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


def pipeline_stages(cfg: Config) -> list[Stage]:
    """The stages of a full run, in order."""
    layout = RunLayout(Path(cfg.output_dir))  # the pipeline's own folders: overrides point elsewhere
    methods = [METHODS[m] for m in resolve_methods(cfg.pipeline)]
    stages = [
        Stage("label", "label", layout.label_output, cfg),
        Stage("sft", "sft", layout.sft_model, cfg),
        Stage("train-disc", "train-disc", layout.stage("disc").model, cfg),
        Stage("eval-disc", "eval-disc", layout.stage("disc").eval, cfg),
    ]
    if any(m.mode == "sequence" for m in methods):  # PPO-seq and ReMax score with the sequence RM
        stages.append(Stage("train-rm", "train-rm", layout.stage("rm").model, cfg))
        stages.append(Stage("eval-rm", "eval-rm", layout.stage("rm").eval, cfg))
    stages += method_stages(cfg, layout, methods)
    if cfg.eval.judge_base_url:  # Table 1: every method's MT-Bench and TLCR's AlpacaEval win rates
        stages.append(Stage("judge-table", "eval-judge-table", layout.judge_table.result, cfg))
    stages.append(Stage("report", "report", layout.report, cfg))
    return stages


def method_stages(cfg: Config, layout: RunLayout, methods: list[Method]) -> list[Stage]:
    """The stages that train each method from the SFT model: the supervised baselines first (DPO with its
    held-out evaluation, FIGA), then one PPO run per PPO method, in `pipeline.methods` order."""
    stages = []
    for m in (m for m in methods if m.stage and m.stage != "sft"):
        stages.append(Stage(m.stage, m.stage, m.model(layout), cfg))
        if m.stage == "dpo":
            stages.append(Stage("eval-dpo", "eval-dpo", layout.stage("dpo").eval, cfg))
    for m in (m for m in methods if m.mode):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.reward.mode, run_cfg.ppo.algorithm = m.mode, m.algorithm
        stages.append(Stage(m.run_name, "ppo", m.model(layout), run_cfg))
    return stages


def run(cfg: Config, run_stage: RunStage, force: bool = False) -> dict:
    """Run every unfinished stage of `pipeline_stages(cfg)`; returns the timing summary (pipeline.json)."""
    from tlcr_ray.data.pairs import load_split, rl_prompt_pools

    # Before any training: PPO and the report must both find prompts in the RL partition.
    rl_prompt_pools(load_split(cfg.data, "rl")[0], cfg.pipeline.eval_prompts)
    layout = RunLayout(Path(cfg.output_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(layout.saved_config, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    record_path = layout.pipeline_record
    record = read_json(record_path) if record_path.exists() else {"stages": {}}
    stages = pipeline_stages(cfg)
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
        write_json_atomic(record_path, record)
    record["last_run_seconds"] = round(time.time() - started, 1)
    write_json_atomic(record_path, record)
    return record
