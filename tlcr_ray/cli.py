"""The `tlcr` command: one subcommand per stage, each reading a YAML config.

    tlcr label      --config configs/demo.yaml [--set reviser.kind=openai ...]
    tlcr sft        --config configs/demo.yaml
    tlcr train-disc --config configs/demo.yaml
    tlcr train-rm   --config configs/demo.yaml
    tlcr dpo        --config configs/demo.yaml          # baselines: DPO and FIGA from the SFT model
    tlcr figa       --config configs/demo.yaml
    tlcr ppo        --config configs/demo.yaml          # also: python -m tlcr_ray.cli ppo ... (ray job submit)
    tlcr ppo        --config configs/a100-7b.yaml --dry-run   # placement + memory plan on the cluster, no model
    tlcr eval       disc|rm|dpo|mt-bench|alpaca-eval|judge-table --config ...
    tlcr serve      --checkpoint runs/demo/disc/model [--host 127.0.0.1 --port 8000]
    tlcr score      --checkpoint runs/demo/disc/model --input pairs.jsonl --output scores.jsonl
    tlcr pipeline   --config configs/demo.yaml [--force]
    tlcr plan       --config configs/a100-7b.yaml [--gpu a100-80gb | --gpu-memory-gib 80] [--json]
    tlcr report     runs/demo
    tlcr make-planted --output planted.jsonl [--source data/hh-rlhf/harmless-base/test.jsonl.gz --seed 0]

This is the only module of `tlcr_ray` that reaches into the Ray layers (`actors`, `serve`), and only
inside the subcommands that need them, so `tlcr label` never loads Ray. Evaluation (`eval ...`, `report`)
reaches them only when there is a cluster to ask (`eval_runner`): on a machine without one it runs here.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from tlcr_ray.choices import GPUS
from tlcr_ray.config import Config, ConfigError, load_config
from tlcr_ray.oom import EXIT_CODE as OOM_EXIT_CODE
from tlcr_ray.oom import OutOfMemory
from tlcr_ray.data.pairs import DataError
from tlcr_ray.eval.score_file import add_arguments as add_score_arguments
from tlcr_ray.local_ray import set_process_defaults, stop_on_signals

# Config-driven subcommand -> (module, function, help). Functions take (cfg, args) and return a
# JSON-able summary; `eval-<target>` and `report` are the pipeline's names for `eval` and `report`.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "label": ("tlcr_ray.labeling.stage", "run", "revise rejected responses and write Levenshtein token labels"),
    "sft": ("actors.supervised", "run_sft", "supervised fine-tuning on chosen responses (Ray Train + DeepSpeed)"),
    "train-disc": ("actors.supervised", "run_disc", "train the token-level discriminator on the labels"),
    "train-rm": ("actors.supervised", "run_rm", "train the sequence-level Bradley-Terry reward model (baseline)"),
    "dpo": ("actors.supervised", "run_dpo", "DPO baseline on the reward pairs, the SFT model as reference"),
    "figa": ("actors.supervised", "run_figa", "FIGA baseline: fine-grained weighted SFT on the token labels"),
    "ppo": ("actors.controller", "run", "PPO with token-level rewards on Ray actor groups (or ReMax)"),
}
EVAL_TARGETS = {"disc": "tlcr_ray.eval.heldout", "rm": "tlcr_ray.eval.heldout", "dpo": "tlcr_ray.eval.heldout",
                "mt-bench": "tlcr_ray.eval.benchmarks", "alpaca-eval": "tlcr_ray.eval.benchmarks",
                "judge-table": "tlcr_ray.eval.judge_table"}


def _resolve(spec: tuple[str, str, str]) -> Callable:
    module, func, _ = spec
    return getattr(importlib.import_module(module), func)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (default: all defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set ppo.steps=3 (repeatable; values parse as YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlcr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec[2])
        _add_config_args(p)
        if name != "label":
            p.add_argument("--dry-run", action="store_true",
                           help="create the run's placement groups on the cluster (RAY_ADDRESS or local), print where "
                                "every actor would go and the memory plan per GPU, release them; exit 2 if it does "
                                "not fit. No model is loaded")
    p = sub.add_parser("pipeline", help="every stage from one config, skipping finished ones")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rerun stages whose output exists")
    p = sub.add_parser("eval", help="evaluate: disc, rm, dpo, mt-bench, alpaca-eval or judge-table (every method)")
    p.add_argument("target", choices=list(EVAL_TARGETS))
    _add_config_args(p)
    p.add_argument("--model", help="model folder to evaluate (mt-bench / alpaca-eval)")
    p.add_argument("--judge-base-url", help="OpenAI-compatible judge endpoint")
    p.add_argument("--judge-model", help="judge model name")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions")
    p = sub.add_parser("serve", help="serve the discriminator as an HTTP token-reward API (Ray Serve)")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="discriminator folder (default: <output_dir>/disc/model)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p = sub.add_parser("score", help="token rewards of a JSONL/parquet file with a discriminator, offline (no Ray)")
    _add_config_args(p)
    add_score_arguments(p)
    p = sub.add_parser("plan", help="will it fit? per-GPU memory of every stage and PPO group vs the GPU")
    _add_config_args(p)
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", choices=GPUS, help="GPU kind (default: the config's gpu, else this machine's, else a100-80gb)")
    gpu.add_argument("--gpu-memory-gib", type=float, metavar="N", help="GPU memory in GiB, instead of a kind")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p = sub.add_parser("report", help="plots, token heat-map and report.md for a run folder")
    p.add_argument("run_dir")
    p = sub.add_parser("make-planted", help="write the known-truth planted-phrase preference set (tlcr_ray.data.planted)")
    p.add_argument("--source", default="data/hh-rlhf/harmless-base/test.jsonl.gz", help="HH-format pairs to plant into")
    p.add_argument("--output", required=True, help="JSONL to write (usable as data.path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--substitute", type=float, default=0.2, help="share of pairs with a word made worse instead")
    return parser


def eval_runner(cfg: Config):
    """Where evaluation runs (`tlcr_ray.eval.runner`): Ray workers when the connected cluster has GPUs
    (`actors.evaluation`, eval.on_workers), else here; no Ray is started or imported to find that out
    when no cluster is named and none runs."""
    from tlcr_ray.eval.runner import LocalRunner, needs_cluster

    ray = sys.modules.get("ray")
    if not needs_cluster(cfg.eval.on_workers, os.environ.get("RAY_ADDRESS"), bool(ray and ray.is_initialized())):
        return LocalRunner()
    from actors.evaluation import eval_runner as cluster_runner

    return cluster_runner(cfg)


def _report(run_dir: str) -> dict:
    from tlcr_ray.eval.report import load_run_config, write_report

    return write_report(run_dir, eval_runner(load_run_config(Path(run_dir))))


def _evaluate(cfg: Config, args: argparse.Namespace) -> dict:
    return importlib.import_module(EVAL_TARGETS[args.target]).run_cli(cfg, args, eval_runner(cfg))


def run_stage(command: str, cfg: Config, args: argparse.Namespace | None = None) -> dict | None:
    """Run one stage by its CLI name; `eval-<target>` and `report` are the pipeline's extra names."""
    args = args or argparse.Namespace(target=None, model=None, judge_base_url=None, judge_model=None, limit=None)
    if command in COMMANDS:
        return _resolve(COMMANDS[command])(cfg, args)
    if command.startswith("eval-") and command.removeprefix("eval-") in EVAL_TARGETS:
        args.target = command.removeprefix("eval-")
        return _evaluate(cfg, args)
    if command == "report":
        return _report(cfg.output_dir)
    raise ValueError(f"unknown stage {command!r}")


def dispatch(args: argparse.Namespace) -> dict | None:
    """Run the parsed subcommand; -> its JSON-able summary."""
    if args.command == "report":
        if not Path(args.run_dir).is_dir():
            raise FileNotFoundError(f"{args.run_dir}: no such run folder")
        return _report(args.run_dir)
    if args.command == "make-planted":
        from tlcr_ray.data.planted import write_planted

        return write_planted(args.source, args.output, seed=args.seed, substitute=args.substitute)
    cfg = load_config(args.config, args.overrides)
    if args.command == "eval":
        return _evaluate(cfg, args)
    if args.command == "serve":
        from serve.app import run_cli

        return run_cli(cfg, args)
    if args.command == "score":
        from tlcr_ray.eval.score_file import run_cli as run_score

        return run_score(cfg, args)
    if args.command == "plan":
        from tlcr_ray.plan import run_cli as run_plan

        return run_plan(cfg, args)
    if args.command == "pipeline":
        from tlcr_ray.pipeline import run as run_pipeline

        return run_pipeline(cfg, run_stage, force=args.force)
    return run_stage(args.command, cfg, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_process_defaults()
    try:
        # SIGINT/SIGTERM unwind like Ctrl-C, then every process a local Ray started is stopped.
        with stop_on_signals():
            summary = dispatch(args)
    except ConfigError as exc:
        print(f"tlcr: config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError) as exc:
        print(f"tlcr: {exc}", file=sys.stderr)
        return 2
    except OutOfMemory as exc:  # one message: the group, the plan's estimate, the knobs (tlcr_ray/oom.py)
        print(f"tlcr: {exc}", file=sys.stderr)
        return OOM_EXIT_CODE
    except KeyboardInterrupt as exc:
        print("tlcr: interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)  # 130 for SIGINT, 143 for SIGTERM
    if summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
