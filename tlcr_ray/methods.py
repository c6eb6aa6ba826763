"""The methods one pipeline compares (`pipeline.methods`): which stage trains each, where its model lands,
and the name the report gives it. Pure Python: the config checks `pipeline.methods` with it.

    METHODS["remax"].model(layout)      # runs/demo/ppo-remax/model
    resolve_methods(cfg.pipeline)       # -> ["sft", "dpo", "ppo-seq", ...]  (ppo_modes folded in)

Every method starts from the same SFT model (`<output_dir>/sft/model`, docs/algorithm.md §10).
"""
from __future__ import annotations

from dataclasses import dataclass

from tlcr_ray.choices import DEFAULT_METHODS, METHODS as METHOD_NAMES


@dataclass(frozen=True)
class Method:
    name: str
    """The `pipeline.methods` value."""
    label: str
    """The report's row name (the paper's)."""
    stage: str | None = None
    """The supervised stage that trains it (`sft`, `dpo`, `figa`); None: a PPO run."""
    mode: str | None = None
    """reward.mode of the PPO run."""
    algorithm: str = "ppo"
    """ppo.algorithm of the PPO run (`remax`: ReMax)."""

    @property
    def run_name(self) -> str:
        """The run folder under output_dir: the stage's, or `ppo-<mode>` / `ppo-remax` (RunLayout.ppo_run_name)."""
        if self.stage:
            return self.stage
        return "ppo-" + ("remax" if self.algorithm == "remax" else self.mode)

    def model(self, layout):
        """The method's final model folder in `layout` (a RunLayout)."""
        if self.stage:
            return layout.stage(self.stage).model
        return layout.ppo(self.run_name.removeprefix("ppo-")).model


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", "SFT", stage="sft"),
    Method("dpo", "DPO", stage="dpo"),
    Method("ppo-seq", "PPO-seq", mode="sequence"),
    Method("remax", "ReMax", mode="sequence", algorithm="remax"),
    Method("figa", "FIGA", stage="figa"),
    Method("tlcr-fixed", "TLCR-fixed", mode="fixed"),
    Method("tlcr", "TLCR", mode="continuous"),
    Method("tlcr-no-negative", "TLCR w/o negative", mode="no_negative"),
    Method("tlcr-no-positive", "TLCR w/o positive", mode="no_positive"),
)}
assert tuple(METHODS) == METHOD_NAMES
METHOD_OF_MODE = {m.mode: name for name, m in METHODS.items() if m.mode and m.algorithm == "ppo"}
"""reward.mode -> the method of a plain PPO run with it (`pipeline.ppo_modes`, the older spelling)."""


def ppo_modes_of(methods: list[str]) -> list[str]:
    """The reward modes of the plain-PPO methods among `methods`, in order (what `ppo_modes` meant)."""
    return [METHODS[m].mode for m in methods if METHODS[m].mode and METHODS[m].algorithm == "ppo"]


def resolve_methods(pipeline) -> list[str]:
    """`pipeline.methods` with the older `pipeline.ppo_modes` folded in; ValueError when the two disagree.

    Neither set: the default seven. Only ppo_modes (an older config): SFT plus one PPO run per mode, as
    before. Both: the PPO runs of `methods` must be exactly `ppo_modes`.
    """
    methods, modes = pipeline.methods, pipeline.ppo_modes
    if methods is None:
        return list(DEFAULT_METHODS) if modes is None else ["sft"] + [METHOD_OF_MODE[m] for m in modes]
    if len(set(methods)) != len(methods):
        raise ValueError(f"pipeline.methods {methods} names a method twice")
    if modes is not None and sorted(ppo_modes_of(methods)) != sorted(modes):
        raise ValueError(f"pipeline.methods {methods} runs PPO with reward modes {ppo_modes_of(methods)}, but "
                         f"pipeline.ppo_modes is {modes}; set pipeline.methods only (ppo_modes is its older "
                         f"spelling: sequence = ppo-seq, fixed = tlcr-fixed, continuous = tlcr)")
    return list(methods)
