"""Out-of-memory errors of a stage or a PPO actor group, turned into one message a user can act on.

    try:
        trainer.fit()
    except Exception as exc:
        if find_oom(exc) is None:
            raise
        raise OutOfMemory(oom_message(cfg, "sft", exc, last_checkpoint)) from exc

`find_oom` recognises torch.OutOfMemoryError ("CUDA out of memory"), the CPU allocator's "can't
allocate memory", Python's MemoryError and Ray's own memory-monitor kills, also when they arrive
wrapped (RayTaskError, Ray Train's worker failures, chained causes). `oom_message` names the group,
what `tlcr plan` (tlcr_ray/plan.py) estimates for it and the knobs that lower it; the CLI prints it and
exits with EXIT_CODE. No Ray import here: wrappers are walked by their attributes.
"""
from __future__ import annotations

import os

EXIT_CODE = 3
MARKERS = ("out of memory", "outofmemoryerror", "can't allocate memory", "cannot allocate memory", "memoryerror")
TEST_OOM_ENV = "TLCR_TEST_OOM"
"""Test hook, for the OOM tests only: "<group>:<n>" (e.g. "ppo.learner:2", "sft:2") makes that group
attempt a real, impossible allocation (1 PiB) at its n-th step (PPO learner: the n-th `train` call of a
learner rank since it started; a supervised stage: optimizer step n), so the error is the allocator's
own, raised where a real one would be."""


class OutOfMemory(RuntimeError):
    """A stage or actor group ran out of memory; str() is the whole message for the user."""

    def __init__(self, message: str, group: str):
        super().__init__(message)
        self.group = group


def _children(exc) -> list:
    out = [getattr(exc, "cause", None), exc.__cause__, exc.__context__]
    for attr in ("worker_failures", "errors"):  # Ray Train: {rank: exception} / a list
        value = getattr(exc, attr, None)
        out += list(value.values()) if isinstance(value, dict) else list(value or []) if isinstance(value, (list, tuple)) else []
    return [c for c in out if isinstance(c, BaseException)]


def _is_oom(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"OutOfMemoryError", "MemoryError"}) or any(m in str(e).lower() for m in MARKERS)


def find_oom(exc: BaseException, _seen: set | None = None) -> BaseException | None:
    """The innermost out-of-memory error in `exc` or anything it wraps; None when it is not one."""
    seen = set() if _seen is None else _seen
    if id(exc) in seen:
        return None
    seen.add(id(exc))
    for child in _children(exc):
        found = find_oom(child, seen)
        if found is not None:
            return found
    return exc if _is_oom(exc) else None


KNOBS = {
    "learner": ["ppo.micro_batch_size", "ppo.mini_batch_size", "ppo.gradient_checkpointing", "ppo.offload_optimizer",
                "ppo.offload_params", "ppo.zero_stage", "ppo.bucket_mib", "ppo.learner.num_actors", "ppo.learner.num_gpus"],
    "rollout": ["ppo.vllm_memory_utilization", "ppo.vllm_kv_cache_gib", "ppo.prompts_per_step", "ppo.rollout.num_actors",
                "ppo.vllm_tensor_parallel"],
    "reference": ["ppo.forward_micro_batch_size", "ppo.offload_reference", "ppo.reference.num_actors"],
    "reward": ["ppo.forward_micro_batch_size", "ppo.offload_reward", "ppo.reward.num_actors"],
    "stage": ["{s}.micro_batch_size (raise {s}.grad_accum to keep the batch)", "{s}.gradient_checkpointing",
              "{s}.offload_optimizer", "{s}.offload_params", "{s}.zero_stage", "{s}.num_workers (GPUs)"],
}
"""What lowers each group's memory, most effective first; only the fields this config has are named."""


def _has(cfg, dotted: str) -> bool:
    obj = cfg
    for part in dotted.split(" ", 1)[0].split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def knobs(cfg, group: str) -> list[str]:
    """The config fields to turn for `group` ("sft", "ppo.learner", ...), with their current values."""
    key = group.removeprefix("ppo.") if group.startswith("ppo.") else "stage"
    out = []
    for knob in KNOBS[key]:
        knob = knob.format(s=group)
        if _has(cfg, knob):
            field = knob.split(" ", 1)[0]
            value = cfg
            for part in field.split("."):
                value = getattr(value, part)
            note = knob[len(field):].strip().strip("()")
            out.append(f"{field} (now {value}{'; ' + note if note else ''})")
    return out


def estimate(cfg, group: str) -> str:
    """What `tlcr plan` estimates for the group, in words; or why there is no estimate."""
    from tlcr_ray.plan import GIB, plan
    from tlcr_ray.plan_models import gpu_bytes, host_memory, local_cuda_memory

    try:
        mem = local_cuda_memory() or gpu_bytes(getattr(cfg, "gpu", None) or "a100-80gb")
        report = plan(cfg, mem, host_memory(), groups=(group,), knobs=False)
    except Exception as exc:  # an unknown model shape: say so rather than fail the message
        return f"tlcr plan has no estimate for it ({exc})"
    g = report["groups"][group]
    where = "per process, on the host" if g.get("cpu") else "per GPU"
    room = report["host_memory_bytes"] if g.get("cpu") else report["gpu_memory_bytes"]
    total = f" ({g['host_bytes'] / GIB:.1f} GiB for all its processes)" if g.get("cpu") else ""
    verdict = "fits" if g["fits"] else "does NOT fit"
    return (f"tlcr plan estimates {g['per_gpu']['peak'] / GIB:.1f} GiB {where} at its peak ({g['peak_phase']}){total}"
            + (f" of {room / GIB:.1f} GiB: it {verdict}" if room else ""))


def oom_message(cfg, group: str, exc: BaseException, checkpoint: str | None, during: str = "") -> str:
    """One paragraph: which group ran out of memory and on what, the plan's estimate, the knobs, the checkpoint."""
    cause = find_oom(exc) or exc
    first = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ""
    lines = [f"{group} ran out of memory{' during ' + during if during else ''}: {type(cause).__name__}: {first}",
             f"  {estimate(cfg, group)}.",
             "  To lower it: " + ("; ".join(knobs(cfg, group)) or "a smaller model or batch") + "; or more GPUs.",
             f"  `tlcr plan --config ...` shows every group's estimate. The last checkpoint is intact: "
             f"{checkpoint or 'none yet (a rerun starts from the beginning)'}; a rerun resumes from it."]
    return "\n".join(lines)


def maybe_inject_oom(group: str, step: int) -> None:
    """The TEST_OOM_ENV test hook (see there): an impossible allocation at `group`'s step `step`."""
    spec = os.environ.get(TEST_OOM_ENV, "")
    if spec and spec.rsplit(":", 1) == [group, str(step)]:
        import torch

        torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: the allocator refuses it
