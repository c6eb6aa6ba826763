"""Disk bytes of each stage's checkpoints and exports, for `tlcr plan` (pure arithmetic, like tlcr_ray/plan.py).

    checkpoint_sizes(cfg, model_shape(cfg.model.base))["ppo"]["after_finish_bytes"]

A resumable DeepSpeed checkpoint of one engine (DeepSpeed 0.19.8 with the torch AdamW tlcr passes in;
P params, e bytes per weight element): the module's weights e·P (mp_rank_*_model_states.pt; ZeRO-3:
its partitions) + the optimizer state (zero_pp_rank_*_optim_states.pt): Adam's m and v 8·P and, at
ZeRO >= 1 or in bf16/fp16, the fp32 master copy 4·P. The sum over ranks does not depend on the world
size. A PPO checkpoint holds the actor and the critic (ReMax: none; ppo.critic shared: the actor with its
value head, h + 1 more params) and the policy's HF folder (in model.dtype) the rollout engines restart
from. An HF export is e'·P in its export_dtype (the tied lm_head stored once).
During a run, keep_checkpoints of them live at once (plus the one being written); after a finished
stage only the export remains unless keep_resume_state.
"""
from __future__ import annotations

from tlcr_ray.choices import WEIGHT_DTYPES
from tlcr_ray.layout import POLICY_STAGES

ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}


def engine_checkpoint_bytes(params: int, e: int, zero: int) -> int:
    """One engine's resumable DeepSpeed checkpoint, summed over ranks (module docstring)."""
    master = 4 * params if (zero >= 1 or e < 4) else 0
    return e * params + master + 8 * params


def _export_elem(export_dtype: str, trained: str) -> int:
    return ELEM[trained if export_dtype == "auto" else export_dtype]


def _sizes(resumable: int, keep: int, export: int, keep_resume: bool) -> dict:
    return {"resumable_bytes": resumable, "keep_checkpoints": keep, "during_run_bytes": resumable * (keep + 1) + export,
            "export_bytes": export, "after_finish_bytes": export + (resumable * keep if keep_resume else 0)}


def checkpoint_sizes(cfg, m) -> dict:
    """{"sft"|"disc"|"rm"|"dpo"|"figa"|"ppo": {resumable_bytes (one checkpoint), keep_checkpoints, during_run_bytes (the
    worst moment: kept + the one being written + the export), export_bytes, after_finish_bytes}}."""
    out = {}
    baselines = [s for s in ("dpo", "figa") if s in cfg.pipeline.methods]  # trained only when the pipeline runs them
    for stage in ("sft", "disc", "rm", *baselines):
        t = getattr(cfg, stage)
        dtype = WEIGHT_DTYPES[t.precision]
        params = m.params if stage in POLICY_STAGES else m.backbone_params
        out[stage] = _sizes(engine_checkpoint_bytes(params, ELEM[dtype], t.zero_stage), t.keep_checkpoints,
                            _export_elem(t.export_dtype, dtype) * params, t.keep_resume_state)
    ppo, e = cfg.ppo, ELEM[cfg.model.dtype]
    shared = ppo.algorithm != "remax" and ppo.critic == "shared"
    critic = 0 if ppo.algorithm == "remax" or shared else engine_checkpoint_bytes(m.backbone_params, e, ppo.zero_stage)
    head = m.hidden + 1 if shared else 0  # the shared critic's value head, in the actor's engine
    resumable = engine_checkpoint_bytes(m.params + head, e, ppo.zero_stage) + critic + e * m.params
    out["ppo"] = _sizes(resumable, ppo.keep_checkpoints, _export_elem(ppo.export_dtype, cfg.model.dtype) * m.params,
                        ppo.keep_resume_state)
    return out


def format_checkpoints(sizes: dict, ppo_runs: int = 1) -> list[str]:
    """Table lines (GB = 1e9 bytes, as `du --si` shows a run folder)."""
    gb = lambda b: f"{b / 1e9:7.2f}"  # noqa: E731
    lines = ["", f"{'checkpoints':<14}{'resumable':>10} {'kept':>5} {'run peak':>9} {'export':>8} {'after':>8}  (GB on disk)"]
    for name, s in sizes.items():
        lines.append(f"{name:<14}{gb(s['resumable_bytes']):>10} {s['keep_checkpoints']:>5} {gb(s['during_run_bytes']):>9} "
                     f"{gb(s['export_bytes']):>8} {gb(s['after_finish_bytes']):>8}")
    total = sum(s["after_finish_bytes"] for n, s in sizes.items() if n != "ppo") + ppo_runs * sizes["ppo"]["after_finish_bytes"]
    lines.append(f"left after the pipeline ({ppo_runs} PPO run{'s' if ppo_runs != 1 else ''}): {total / 1e9:.2f} GB "
                 "(resumable = weights + optimizer states by precision; `after` keeps only the export unless "
                 "keep_resume_state)")
    return lines
