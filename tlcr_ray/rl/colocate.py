"""The learner's side of a colocated step (ppo.colocate all): its optimizer states leave the GPU while the
rollout engines generate on it, and come back before the update.

    offload_learner(learner)   # after train: Adam m/v, fp32 masters, grads -> host (DeepSpeed offload_states)
    reload_learner(learner)    # before train

The 16-bit weights stay: the evaluate forwards and the weight sync's gather need them. DeepSpeed 0.19.8's
`engine.offload_states(include=...)` / `engine.reload_states()` do the moving; they exist for ZeRO-1/2/3
optimizers on an accelerator only, so on CPU (or ZeRO-0, or an optimizer DeepSpeed already offloads)
each call is a no-op that says why. Every call returns {"applied": bool, "reason": str} for the phase log.
"""
from __future__ import annotations

import time


def _why_not(learner) -> str | None:
    if learner.device.type != "cuda":
        return "learner on cpu: its states already live in host memory"
    if learner.cfg.zero_stage < 1:
        return "ZeRO-0 has no ZeRO optimizer to offload"
    offload = learner.actor.zero_offload_optimizer()
    if offload is not None and str(getattr(offload, "device", "none")).endswith("cpu"):
        return "DeepSpeed already keeps the optimizer on the host (offload_optimizer)"
    return None


def _engines(learner):
    return tuple(learner.engines.values())  # actor and critic (ReMax: the actor alone)


def offload_learner(learner) -> dict:
    """Optimizer states, fp32 masters and gradient buffers of both engines to pinned host memory."""
    reason = _why_not(learner)
    if reason:
        return {"applied": False, "reason": reason}
    import torch
    from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as S

    start = time.perf_counter()
    before = torch.cuda.memory_allocated()
    keep = {S.lp_params}  # the weights: evaluate and the sync read them
    include = [s for s in S if s not in keep and (s != S.contiguous_grad_buffer or learner.cfg.zero_stage == 3)]
    for engine in _engines(learner):
        engine.offload_states(include=include, non_blocking=False)
    torch.cuda.empty_cache()
    return {"applied": True, "reason": f"DeepSpeed offload_states ({', '.join(s.value for s in include)})",
            "freed_bytes": before - torch.cuda.memory_allocated(), "seconds": time.perf_counter() - start}


def reload_learner(learner) -> dict:
    reason = _why_not(learner)
    if reason:
        return {"applied": False, "reason": reason}
    import torch

    start = time.perf_counter()
    for engine in _engines(learner):
        engine.reload_states(non_blocking=False)
    torch.cuda.synchronize()
    return {"applied": True, "reason": "DeepSpeed reload_states", "seconds": time.perf_counter() - start}
