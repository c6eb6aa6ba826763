"""Typed configuration for every tlcr stage, loaded from one YAML file.

    cfg = load_config("configs/demo.yaml", overrides=["ppo.steps=3", "reviser.kind=openai"])

Each stage reads its own section (the dataclasses of `tlcr_ray.config_sections`, re-exported here);
`output_dir` is the run folder every stage writes into.
Unknown keys and wrongly typed values are errors that name the file and the dotted key. So are values
outside a field's allowed set (`choice`: the tuples of `tlcr_ray.choices`; aliases such as `bf16` are
normalised to the one spelling, `bfloat16`, as the file is read) or its bounds (`bounded`, e.g.
ppo.temperature > 0): every such mistake stops `tlcr` with exit code 2 before Ray or a model starts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tlcr_ray.choices import GPUS
from tlcr_ray.methods import ppo_modes_of, resolve_methods
from tlcr_ray.config_ppo import GroupResources, PPOConfig  # noqa: F401
from tlcr_ray.config_sections import (  # noqa: F401
    EMBEDDED_MODEL,
    ConfigError,
    DataConfig,
    DPOConfig,
    EvalConfig,
    FIGAConfig,
    ModelConfig,
    PipelineConfig,
    ReviserConfig,
    RewardConfig,
    ServeConfig,
    TrainConfig,
    bounded,
    choice,
)


@dataclass
class Config:
    output_dir: str = "runs/demo"
    """Run folder: every stage writes into its own subfolder here (`tlcr_ray/layout.py`)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reviser: ReviserConfig = field(default_factory=ReviserConfig)
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5))
    disc: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, weight_decay=0.1))
    rm: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5))
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(lr=1e-6))
    """The DPO baseline; lr 1e-6 as the DPO paper (docs/algorithm.md §10)."""
    figa: FIGAConfig = field(default_factory=lambda: FIGAConfig(lr=1e-5))
    """The FIGA baseline; lr 1e-5 as the released FIGA script (docs/algorithm.md §10)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gpu: str | None = field(default=None, metadata={"choices": GPUS, "aliases": {}})
    """GPU kind of the cluster's workers (a100-40gb, a100-80gb, h100-80gb, h200-141gb), for the memory plan
    that `tlcr ppo|sft|train-disc|train-rm` check before starting when they ask for GPUs (`tlcr_ray/plan.py`).
    A driver that sees CUDA uses its own cuda:0 instead; None on a driver without CUDA: no check."""


def rollout_dtype(cfg: "Config") -> str:
    """The rollout engines' weight dtype: ppo.rollout_dtype, model.dtype for auto."""
    return cfg.model.dtype if cfg.ppo.rollout_dtype == "auto" else cfg.ppo.rollout_dtype


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, raw: dict, where: str, base: Any = None) -> Any:
    """Overlay `raw` on `base` (default: `cls()`), so a section keeps its own defaults for unset keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where_txt = where or "top level"
        raise ConfigError(f"{where_txt}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    base = cls() if base is None else base
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else key
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            setattr(base, key, _build(type(current), value, dotted, current))
        else:
            setattr(base, key, _check_field(_coerce(value, hints[key], dotted), fields[key].metadata, dotted))
    return base


def _check_field(value: Any, meta, where: str) -> Any:
    """Normalise an alias and check `choice` / `bounded` metadata; a list is checked item by item."""
    if isinstance(value, list):
        return [_check_field(v, meta, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None:
        return value
    if "choices" in meta:
        value = meta["aliases"].get(value, value)
        if value not in meta["choices"]:
            aliases = "".join(f", {a} (= {c})" for a, c in meta["aliases"].items())
            raise ConfigError(f"{where}: {value!r} is not allowed; expected one of {', '.join(meta['choices'])}"
                              f"{aliases}")
    for name, ok, words in (("gt", lambda v, b: v > b, "> "), ("ge", lambda v, b: v >= b, ">= "),
                            ("le", lambda v, b: v <= b, "<= ")):
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{where}: must be {words}{bound}, got {value!r}")
    return value


def _check_across(cfg: "Config") -> None:
    """Rules that involve more than one key."""
    reward = cfg.reward
    if not reward.fixed_neg_threshold < reward.fixed_pos_threshold:
        raise ConfigError(f"reward.fixed_neg_threshold ({reward.fixed_neg_threshold}) must be below "
                          f"reward.fixed_pos_threshold ({reward.fixed_pos_threshold})")
    try:
        cfg.pipeline.methods = resolve_methods(cfg.pipeline)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfg.pipeline.ppo_modes = ppo_modes_of(cfg.pipeline.methods)
    for section in ("sft", "disc", "rm", "dpo", "figa", "ppo"):
        zero = getattr(cfg, section).zero_stage
        if getattr(cfg, section).offload_params and zero != 3:
            raise ConfigError(f"{section}.offload_params: DeepSpeed offloads parameters under ZeRO-3 only; set "
                              f"{section}.zero_stage=3 (now {zero}) or {section}.offload_params=false")
        if getattr(cfg, section).offload_optimizer and zero == 0:
            raise ConfigError(f"{section}.offload_optimizer: DeepSpeed offloads the optimizer under ZeRO 1-3; "
                              f"set {section}.zero_stage >= 1")
        part = getattr(cfg, section)
        if part.export_rounding == "stochastic" and part.export_dtype != "bfloat16":
            raise ConfigError(f"{section}.export_rounding=stochastic rounds fp32 weights into a bfloat16 export: "
                              f"set {section}.export_dtype=bfloat16 (now {part.export_dtype})")
    _check_weight_sync(cfg.ppo)
    _check_old_logprobs(cfg)
    if cfg.ppo.algorithm == "remax" and reward.mode != "sequence":
        raise ConfigError(f"ppo.algorithm=remax scores whole responses with the sequence RM: set "
                          f"reward.mode=sequence (not {reward.mode!r})")
    if cfg.ppo.algorithm == "remax" and cfg.ppo.critic == "shared":
        raise ConfigError("ppo.critic: 'shared' puts a value head on the policy, but ppo.algorithm=remax has no "
                          "critic (its baseline is the greedy response's reward): set ppo.critic=separate "
                          "(the default; ReMax then builds none) or ppo.algorithm=ppo")


def _check_old_logprobs(cfg: "Config") -> None:
    """ppo.old_logprobs=rollout only where the engine's log-probs are the learner's (HF generate, same dtype)."""
    ppo = cfg.ppo
    if ppo.old_logprobs != "rollout":
        return
    problems = []
    if ppo.rollout_backend != "hf":  # auto may mean vLLM, whose kernels give other numbers
        problems.append(f"ppo.rollout_backend={ppo.rollout_backend} (needs hf)")
    if rollout_dtype(cfg) != cfg.model.dtype:
        problems.append(f"ppo.rollout_dtype={ppo.rollout_dtype} (the engine must run model.dtype, {cfg.model.dtype})")
    if ppo.kl_estimator == "full":
        problems.append("ppo.kl_estimator=full (the exact KL needs the learner's logits)")
    if problems:
        raise ConfigError("ppo.old_logprobs=rollout takes the engine's sampling log-probs for the learner's: "
                          + "; ".join(problems) + "; or set ppo.old_logprobs=learner")


def _check_weight_sync(ppo) -> None:
    """An explicit ppo.weight_sync the layout rules out (`tlcr_ray.rl.weight_sync` re-checks at start, with
    where the actors landed: shm's same-node rule and cuda_ipc's shared GPUs can only be seen then)."""
    on_gpu = ppo.learner.num_gpus > 0
    if ppo.weight_sync == "cuda_ipc" and not (on_gpu and ppo.colocate == "all"):
        raise ConfigError("ppo.weight_sync=cuda_ipc hands CUDA buffers to engines on the learner's GPUs: it "
                          f"needs ppo.learner.num_gpus > 0 (now {ppo.learner.num_gpus:g}) and ppo.colocate=all "
                          f"(now {ppo.colocate})")
    if ppo.weight_sync == "nccl" and not (on_gpu and ppo.rollout_backend != "hf" and ppo.colocate == "none"):
        raise ConfigError("ppo.weight_sync=nccl broadcasts into vLLM workers on other GPUs: it needs "
                          f"ppo.learner.num_gpus > 0 (now {ppo.learner.num_gpus:g}), ppo.rollout_backend vllm "
                          f"or auto (now {ppo.rollout_backend}) and ppo.colocate=none (now {ppo.colocate})")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        # A copy: a YAML alias (`rm: *train`) shares one mapping between sections, and an override of
        # one section must not change the other.
        node[key] = node = dict(child)
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None: all defaults) and apply `key=value` overrides (values parse as YAML)."""
    raw: dict = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text else "")
    try:
        cfg = _build(Config, raw, "")
        _check_across(cfg)
        return cfg
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0].split("[", 1)[0]
        if key in {item.split("=", 1)[0].strip() for item in overrides or []}:
            raise ConfigError(f"{source}: --set {exc}") from None
        raise ConfigError(f"{source}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
