"""The optimizer side shared by every DeepSpeed engine: lr schedule, weight-decay groups, and the
one DeepSpeed config builder (supervised stages and the PPO learner).

    ds = deepspeed_config(micro_batch_size=4, grad_accum=1, world_size=2, zero_stage=2, precision="bf16",
                          max_grad_norm=1.0)
"""
from __future__ import annotations

import math

from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
WEIGHT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""The dtype the weights are loaded in for each DeepSpeed precision (DeepSpeed keeps fp32 masters)."""
PRECISION_OF_DTYPE = {dtype: precision for precision, dtype in WEIGHT_DTYPES.items()}
"""The DeepSpeed precision that matches weights loaded in `model.dtype` (the PPO learner)."""


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step `step`: linear warm-up, then constant or cosine to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr_schedule {schedule!r}; expected constant or cosine")


def deepspeed_config(*, micro_batch_size: int, grad_accum: int, zero_stage: int, precision: str,
                     max_grad_norm: float, world_size: int | None = None) -> dict:
    """A DeepSpeed engine config (the optimizer and lr schedule are passed in as torch objects).
    `world_size` pins train_batch_size (the PPO learner); None lets DeepSpeed derive it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # A plain torch AdamW: DeepSpeed's own Adam JIT-compiles for a minute or more on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if world_size is not None:
        config["train_batch_size"] = micro_batch_size * grad_accum * world_size
    return config


def stage_deepspeed_config(train_cfg) -> dict:
    """The DeepSpeed config of one supervised stage (a `TrainConfig`)."""
    return deepspeed_config(micro_batch_size=train_cfg.micro_batch_size, grad_accum=train_cfg.grad_accum,
                            zero_stage=train_cfg.zero_stage, precision=train_cfg.precision,
                            max_grad_norm=train_cfg.max_grad_norm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the head bias are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
