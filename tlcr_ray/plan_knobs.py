"""The knobs `tlcr plan` suggests for a group that does not fit: each tried on a copy of the config and
re-planned (`plan._group`); the first setting of each knob that fits is reported, else all together.

    suggest(cfg, "ppo.learner", model_shape(cfg.model.base), gpu_bytes("a100-40gb"), None)
    # ['ppo.gradient_checkpointing false → true', 'ppo.micro_batch_size 4 → 2', ...]
"""
from __future__ import annotations

from tlcr_ray.plan import _backend, _group, _with
from tlcr_ray.plan_models import ModelShape


def _halvings(value: int):
    return (value // 2**j for j in range(1, value.bit_length()) if value % 2**j == 0)


def _stage_candidates(cfg, name: str):
    t = getattr(cfg, name)
    mb, ga = t.micro_batch_size, t.grad_accum
    if not t.gradient_checkpointing:
        yield f"{name}.gradient_checkpointing false → true", {f"{name}.gradient_checkpointing": True}
    for small in _halvings(mb):
        yield (f"{name}.micro_batch_size {mb} → {small} ({name}.grad_accum {ga} → {ga * mb // small} keeps the "
               f"batch)", {f"{name}.micro_batch_size": small, f"{name}.grad_accum": ga * mb // small})
    if t.zero_stage < 3:
        yield f"{name}.zero_stage {t.zero_stage} → 3", {f"{name}.zero_stage": 3}
    if not t.offload_optimizer and t.zero_stage >= 1:
        yield f"{name}.offload_optimizer false → true", {f"{name}.offload_optimizer": True}
    if t.precision == "fp32":
        yield f"{name}.precision fp32 → bf16", {f"{name}.precision": "bf16"}
    for k in (2, 4):
        yield f"{name}.num_workers {t.num_workers} → {t.num_workers * k}", {f"{name}.num_workers": t.num_workers * k}


def _candidates(cfg, name: str):
    """(description, config changes) to try, smallest change first within each knob."""
    if not name.startswith("ppo."):
        yield from _stage_candidates(cfg, name)
        return
    g = name.split(".", 1)[1]
    res, ppo = getattr(cfg.ppo, g), cfg.ppo
    if g == "learner":
        if not ppo.gradient_checkpointing:
            yield "ppo.gradient_checkpointing false → true", {"ppo.gradient_checkpointing": True}
        micro = ppo.micro_batch_size or -(-ppo.mini_batch_size // res.num_actors)
        for small in _halvings(micro):
            yield (f"ppo.micro_batch_size {micro} → {small} (gradient accumulation keeps the mini-batch)",
                   {"ppo.micro_batch_size": small})
        if ppo.zero_stage < 3:
            yield f"ppo.zero_stage {ppo.zero_stage} → 3", {"ppo.zero_stage": 3}
        if not ppo.offload_optimizer and ppo.zero_stage >= 1:
            yield "ppo.offload_optimizer false → true", {"ppo.offload_optimizer": True}
    if g in ("learner", "reward", "reference"):
        for small in _halvings(ppo.forward_micro_batch_size):
            yield (f"ppo.forward_micro_batch_size {ppo.forward_micro_batch_size} → {small}",
                   {"ppo.forward_micro_batch_size": small})
    for k in (2, 4):
        yield (f"ppo.{g}.num_actors {res.num_actors} → {res.num_actors * k}", {f"ppo.{g}.num_actors": res.num_actors * k})
    if g == "rollout" and _backend(cfg) == "vllm":
        for util in (0.8, 0.7, 0.6, 0.5):
            if util < ppo.vllm_memory_utilization:
                yield (f"ppo.vllm_memory_utilization {ppo.vllm_memory_utilization} → {util}",
                       {"ppo.vllm_memory_utilization": util})
        tp = ppo.vllm_tensor_parallel
        yield (f"ppo.vllm_tensor_parallel {tp} → {tp * 2} (ppo.rollout.num_gpus {res.num_gpus:g} → {tp * 2})",
               {"ppo.vllm_tensor_parallel": tp * 2, "ppo.rollout.num_gpus": float(tp * 2)})
    if cfg.model.dtype == "float32":
        yield "model.dtype float32 → bfloat16", {"model.dtype": "bfloat16"}


def suggest(cfg, name: str, m: ModelShape, gpu_memory: int, host_memory: int | None) -> list[str]:
    """Single changes that fit (the first of each knob), else the knobs together; then mechanics not yet in tlcr."""
    found, tried, last = [], set(), {}
    for text, changes in _candidates(cfg, name):
        knob = text.split(" ", 1)[0]
        last[knob] = (text, changes)  # each knob's furthest setting, for the combination below
        if knob not in tried and _group(_with(cfg, changes), name, m, gpu_memory, host_memory)["fits"]:
            found.append(text)
            tried.add(knob)
    combined, texts = cfg, []
    for text, changes in last.values() if not found else ():
        combined, texts = _with(combined, changes), texts + [text]
        if _group(combined, name, m, gpu_memory, host_memory)["fits"]:
            found.append("together: " + "; ".join(texts))
            break
    g = _group(cfg, name, m, gpu_memory, host_memory)
    if g["peak_phase"] == "sync" and name == "ppo.learner" and cfg.ppo.bucket_mib > 64:
        found.append(f"ppo.bucket_mib {cfg.ppo.bucket_mib:g} → 64 (a smaller weight-sync bucket)")
    return found or ["nothing single fits: combine the knobs above or use a larger GPU"]
