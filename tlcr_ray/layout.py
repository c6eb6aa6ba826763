"""The run folder: every path a stage reads or writes under `output_dir`, and the config keys that
override them. One file answers "what does stage X read and write".

    layout = RunLayout.of(cfg)
    layout.labels                  # runs/demo/label/labels.jsonl  (disc.labels_path overrides)
    layout.discriminator           # runs/demo/disc/model          (reward.discriminator overrides)
    layout.stage("rm").eval        # runs/demo/rm/eval.json
    layout.ppo("sequence").model   # runs/demo/ppo-sequence/model

    <output_dir>/
      config.yaml  pipeline.json                       the pipeline's saved config and stage times
      label/       revisions.jsonl quarantine.jsonl labels.jsonl summary.json
      sft/ disc/ rm/ dpo/ figa/                        supervised stages: model/ metrics.jsonl tb/ ray/ summary.json
                                                       (+ eval.json for disc, rm and dpo: held-out evaluation;
                                                       dpo/reference_logps.json: the reference's log-probs)
      ppo-<mode>/ ppo-remax/  metrics.jsonl tb/ checkpoints/step-N/ model/
      eval/        <bench>.json <bench>/{answers,judgments}.jsonl      MT-Bench / AlpacaEval
                   judge-table.json judge-table/                       Table 1: every method, one judge
      report/      report.md reward_table.json heatmap.html *.png
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

SUPERVISED_STAGES = ("sft", "disc", "rm", "dpo", "figa")
POLICY_STAGES = ("sft", "dpo", "figa")
"""The supervised stages that train the causal LM itself (the others train a head on its backbone)."""
REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout: shipped data (data/) and the Ray layers (actors/, serve/) live beside tlcr_ray/."""


class StagePaths(NamedTuple):
    """A supervised stage's folder: the final model, Ray Train storage, metrics and evaluation."""

    dir: Path
    model: Path
    ray_storage: Path
    metrics: Path
    summary: Path
    eval: Path
    export: Path
    """The latest `export_every` HF export (removed once `model` is final)."""


class PPOPaths(NamedTuple):
    dir: Path
    model: Path
    checkpoints: Path
    metrics: Path
    export: Path
    """The latest ppo.export_every HF export (removed once `model` is final)."""


class BenchPaths(NamedTuple):
    """An MT-Bench / AlpacaEval run: its caches folder and its result file."""

    dir: Path
    result: Path


class RunLayout:
    def __init__(self, root: str | Path, *, labels: str | None = None, discriminator: str | None = None,
                 reward_model: str | None = None, policy: str | None = None):
        """`root` is output_dir; the keywords are the config's overrides (None: the run folder's own)."""
        self.root = root = Path(root)
        self.saved_config, self.pipeline_record = root / "config.yaml", root / "pipeline.json"

        self.label_dir = label = root / "label"
        self.revisions, self.quarantine = label / "revisions.jsonl", label / "quarantine.jsonl"
        self.label_output, self.label_summary = label / "labels.jsonl", label / "summary.json"
        # What the discriminator trains on: disc.labels_path, else what `tlcr label` wrote.
        self.labels = Path(labels) if labels else self.label_output

        self.sft_model = self.stage("sft").model
        self.discriminator = Path(discriminator) if discriminator else self.stage("disc").model
        self.reward_model = Path(reward_model) if reward_model else self.stage("rm").model
        # A string: ppo.policy may be a hub id or `embedded:...`.
        self.initial_policy = policy or str(self.sft_model)

        # DPO's reference: the SFT model's summed response log-probs, computed once per run (docs/algorithm.md §10).
        self.dpo_reference_logps = self.stage("dpo").dir / "reference_logps.json"
        self.judge_table = self.bench("judge-table")

        self.report_dir = report = root / "report"
        self.report, self.reward_table = report / "report.md", report / "reward_table.json"

    @classmethod
    def of(cls, cfg) -> "RunLayout":
        return cls(cfg.output_dir, labels=cfg.disc.labels_path, discriminator=cfg.reward.discriminator,
                   reward_model=cfg.reward.reward_model, policy=cfg.ppo.policy)

    def stage(self, stage: str) -> StagePaths:
        if stage not in SUPERVISED_STAGES:
            raise ValueError(f"unknown supervised stage {stage!r}; expected one of {', '.join(SUPERVISED_STAGES)}")
        d = self.root / stage
        return StagePaths(d, d / "model", d / "ray", d / "metrics.jsonl", d / "summary.json", d / "eval.json", d / "export")

    @staticmethod
    def ppo_run_name(cfg) -> str:
        """The name of a PPO run's folder (`ppo-<name>`): the reward mode, or `remax` for ReMax."""
        return "remax" if cfg.ppo.algorithm == "remax" else cfg.reward.mode

    def ppo(self, mode: str) -> PPOPaths:
        d = self.root / f"ppo-{mode}"
        return PPOPaths(d, d / "model", d / "checkpoints", d / "metrics.jsonl", d / "export")

    def ppo_runs(self) -> dict[str, Path]:
        """{mode: metrics.jsonl} of every PPO run in the folder."""
        return {p.parent.name.removeprefix("ppo-"): p for p in sorted(self.root.glob("ppo-*/metrics.jsonl"))}

    def bench(self, bench: str) -> BenchPaths:
        return BenchPaths(self.root / "eval" / bench, self.root / "eval" / f"{bench}.json")
