"""The optimizer side shared by every DeepSpeed engine: lr schedule, weight-decay groups, and the
one DeepSpeed config builder (supervised stages and the PPO learner).

    ds = deepspeed_config(micro_batch_size=4, grad_accum=1, world_size=2, zero_stage=2, precision="bf16",
                          max_grad_norm=1.0)
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

# The precision <-> weight dtype tables live with the config's choices (one definition, no torch there).
from tlcr_ray.choices import LR_SCHEDULES, PRECISION_OF_DTYPE, PRECISIONS, WEIGHT_DTYPES  # noqa: F401


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step `step`: linear warm-up, then constant or cosine to 0."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lr_scheduler(optimizer, *, total: int, warmup: int, schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a torch scheduler, stepped once per optimizer step (DeepSpeed steps it and keeps its
    state in the engine's checkpoints when it is passed to `deepspeed.initialize`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total, warmup=warmup, schedule=schedule))


def deepspeed_config(*, micro_batch_size: int, grad_accum: int, zero_stage: int, precision: str,
                     max_grad_norm: float, world_size: int | None = None, offload_optimizer: bool = False,
                     offload_params: bool = False) -> dict:
    """A DeepSpeed engine config (the optimizer and lr schedule are passed in as torch objects).
    `world_size` pins train_batch_size (the PPO learner); None lets DeepSpeed derive it.
    `offload_optimizer` (ZeRO >= 1) keeps the fp32 master weights, their gradients and Adam's states in
    host RAM and steps there; `offload_params` (ZeRO-3 only) keeps the parameters there too."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if offload_params and zero_stage != 3:
        raise ValueError(f"offload_params needs ZeRO stage 3, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3, got 0")
    zero: dict = {"stage": zero_stage}
    pin = torch.cuda.is_available()  # pinned host buffers speed up the copies; nothing to pin for on CPU
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # fp16 weights need loss scaling: loss_scale 0 is DeepSpeed's dynamic scaler.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},
        # A plain torch AdamW: DeepSpeed's own Adam JIT-compiles for a minute or more on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if offload_optimizer:
        # The torch AdamW steps the host partition (DeepSpeedCPUAdam is faster but JIT-compiles first).
        config["zero_force_ds_cpu_optimizer"] = False
    if world_size is not None:
        config["train_batch_size"] = micro_batch_size * grad_accum * world_size
    return config


def stage_deepspeed_config(train_cfg) -> dict:
    """The DeepSpeed config of one supervised stage (a `TrainConfig`)."""
    return deepspeed_config(micro_batch_size=train_cfg.micro_batch_size, grad_accum=train_cfg.grad_accum,
                            zero_stage=train_cfg.zero_stage, precision=train_cfg.precision,
                            max_grad_norm=train_cfg.max_grad_norm, offload_optimizer=train_cfg.offload_optimizer,
                            offload_params=train_cfg.offload_params)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the head bias are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
