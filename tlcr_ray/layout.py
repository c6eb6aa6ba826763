"""The run folder: every path a stage reads or writes under `output_dir`, and the config keys that
override them. One file answers "what does stage X read and write".

    layout = RunLayout.of(cfg)
    layout.labels            # runs/demo/label/labels.jsonl  (disc.labels_path overrides)
    layout.discriminator     # runs/demo/disc/model          (reward.discriminator overrides)
    layout.ppo_dir("sequence")

    <output_dir>/
      config.yaml  pipeline.json                       the pipeline's saved config and stage times
      label/       revisions.jsonl quarantine.jsonl labels.jsonl summary.json
      sft/ disc/ rm/                                   supervised stages: model/ metrics.jsonl tb/ ray/ summary.json
      disc/eval.json  rm/eval.json                     held-out evaluation
      ppo-<mode>/  metrics.jsonl tb/ checkpoints/step-N/ model/
      eval/<bench>.json eval/<bench>/{answers,judgments}.jsonl     MT-Bench / AlpacaEval
      report/      report.md reward_table.json heatmap.html *.png
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SUPERVISED_STAGES = ("sft", "disc", "rm")
REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout: shipped data (data/) and the Ray layers (actors/, serve/) live beside tlcr_ray/."""


@dataclass(frozen=True)
class RunLayout:
    root: Path
    labels_override: str | None = None
    discriminator_override: str | None = None
    reward_model_override: str | None = None
    policy_override: str | None = None

    @classmethod
    def of(cls, cfg) -> "RunLayout":
        return cls(Path(cfg.output_dir), cfg.disc.labels_path, cfg.reward.discriminator, cfg.reward.reward_model,
                   cfg.ppo.policy)

    # ---- the pipeline
    @property
    def saved_config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def pipeline_record(self) -> Path:
        return self.root / "pipeline.json"

    # ---- label
    @property
    def label_dir(self) -> Path:
        return self.root / "label"

    @property
    def revisions(self) -> Path:
        return self.label_dir / "revisions.jsonl"

    @property
    def quarantine(self) -> Path:
        return self.label_dir / "quarantine.jsonl"

    @property
    def label_output(self) -> Path:
        """What `tlcr label` writes."""
        return self.label_dir / "labels.jsonl"

    @property
    def label_summary(self) -> Path:
        return self.label_dir / "summary.json"

    @property
    def labels(self) -> Path:
        """What the discriminator trains on: disc.labels_path, else the label stage's output."""
        return Path(self.labels_override) if self.labels_override else self.label_output

    # ---- supervised stages (sft, disc, rm)
    def stage_dir(self, stage: str) -> Path:
        if stage not in SUPERVISED_STAGES + ("label", "report", "eval"):
            raise ValueError(f"unknown stage folder {stage!r}")
        return self.root / stage

    def stage_model(self, stage: str) -> Path:
        return self.stage_dir(stage) / "model"

    def heldout_eval(self, stage: str) -> Path:
        """disc/eval.json or rm/eval.json."""
        return self.stage_dir(stage) / "eval.json"

    @property
    def sft_model(self) -> Path:
        return self.stage_model("sft")

    @property
    def discriminator(self) -> Path:
        return Path(self.discriminator_override) if self.discriminator_override else self.stage_model("disc")

    @property
    def reward_model(self) -> Path:
        return Path(self.reward_model_override) if self.reward_model_override else self.stage_model("rm")

    @property
    def initial_policy(self) -> str:
        """ppo.policy, else the SFT model (a string: ppo.policy may be a hub id or `embedded:`)."""
        return self.policy_override or str(self.sft_model)

    # ---- PPO
    def ppo_dir(self, mode: str) -> Path:
        return self.root / f"ppo-{mode}"

    def ppo_model(self, mode: str) -> Path:
        return self.ppo_dir(mode) / "model"

    def ppo_checkpoints(self, mode: str) -> Path:
        return self.ppo_dir(mode) / "checkpoints"

    def ppo_metrics(self) -> dict[str, Path]:
        """{mode: metrics.jsonl} of every PPO run in the folder."""
        return {p.parent.name.removeprefix("ppo-"): p for p in sorted(self.root.glob("ppo-*/metrics.jsonl"))}

    # ---- benchmarks and report
    def bench_dir(self, bench: str) -> Path:
        return self.root / "eval" / bench

    def bench_result(self, bench: str) -> Path:
        return self.root / "eval" / f"{bench}.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report(self) -> Path:
        return self.report_dir / "report.md"

    @property
    def reward_table(self) -> Path:
        return self.report_dir / "reward_table.json"
