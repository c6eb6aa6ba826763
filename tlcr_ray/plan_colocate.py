"""`tlcr plan` for ppo.colocate all: the per-GPU sum of the groups that share each bundle, phase by phase.

    report = plan(cfg, gpu_bytes("a100-80gb"))      # tlcr_ray.plan; with colocate all it adds:
    report["colocated"]["phases"], report["colocated"]["fits"]

The single groups' numbers come from `tlcr_ray.plan` (its module docstring); which groups sit on which
bundle from `tlcr_ray.placement`. What a phase leaves out: the rollout engines sleep (vLLM sleep mode
level 1 / HF weights on host: a CUDA context stays) while the scorers and the learner work, and the
learner's optimizer states, fp32 masters and gradient buffers are offloaded (`tlcr_ray.rl.colocate`)
while the engines generate and during the weight sync.
"""
from __future__ import annotations

from tlcr_ray.placement import bundle_groups, ppo_placement
from tlcr_ray.plan import CUDA_CONTEXT, GIB, _backend, _persistent


def plan_colocated(cfg, groups: dict, gpu_memory: int) -> dict | None:
    """ppo.colocate all: what one shared GPU holds in each phase of a step, for the worst bundle.

    On a bundle (`tlcr_ray.placement.bundle_groups`), per phase: generate = the rollout generating + the
    learner's 16-bit weights (its optimizer states offloaded, `tlcr_ray.rl.colocate`) + the reference's
    and reward's resident weights; score = the rollout asleep (its CUDA context) + the learner's evaluate
    and the scorers' forwards, optimizer still offloaded; train = the learner's train/step peak + the
    scorers' weights; sync = the rollout awake + the learner's sync peak less what stays offloaded.
    Rank 0's sync clone is counted on every bundle (conservative). None unless all four PPO groups are
    planned on GPUs with ppo.colocate all."""
    names = [f"ppo.{g}" for g in ("rollout", "reward", "reference", "learner")]
    if getattr(cfg.ppo, "colocate", "none") != "all" or not all(n in groups and not groups[n].get("cpu") for n in names):
        return None
    lrn, z = groups["ppo.learner"], cfg.ppo.zero_stage
    offloaded = sum(_persistent(st, z) - st["weights"] for st in lrn["breakdown"].values() if isinstance(st, dict))
    resident = CUDA_CONTEXT + sum(st["weights"] for st in lrn["breakdown"].values() if isinstance(st, dict))
    ro = groups["ppo.rollout"]["phases"]
    scorer = {g: (CUDA_CONTEXT + groups[f"ppo.{g}"]["per_gpu"]["model_states"], groups[f"ppo.{g}"]["phases"]["forward"])
              for g in ("reward", "reference")}
    per_group = {
        "rollout": {"generate": ro["generate"], "score": CUDA_CONTEXT, "train": CUDA_CONTEXT, "sync": ro["sync"]},
        "learner": {"generate": resident, "score": lrn["phases"]["evaluate"] - offloaded,
                    "train": max(lrn["phases"]["train"], lrn["phases"]["step"]), "sync": lrn["phases"]["sync"] - offloaded},
        **{g: {"generate": res, "score": fwd, "train": res, "sync": res} for g, (res, fwd) in scorer.items()}}
    layout = ppo_placement(cfg.ppo, _backend(cfg))
    bundles = []
    for i, on in enumerate(bundle_groups(layout)):
        phases = {p: sum(per_group[g][p] for g in on) for p in ("generate", "score", "train", "sync")}
        top = max(phases, key=phases.get)
        bundles.append({"bundle": i, "groups": on, "phases": phases, "peak": phases[top], "peak_phase": top})
    worst = max(bundles, key=lambda b: b["peak"])
    n = cfg.ppo.learner.num_actors
    return {"bundles": len(bundles), "worst_bundle": worst["bundle"], "groups": worst["groups"],
            "phases": worst["phases"], "peak": worst["peak"], "peak_phase": worst["peak_phase"],
            "margin": gpu_memory - worst["peak"], "fits": worst["peak"] <= gpu_memory, "per_bundle": bundles,
            # pinned host memory while offloaded / asleep: every rank's optimizer states + the engines' weights
            "host_offload_bytes": n * offloaded + len(layout.of("rollout")) * groups["ppo.rollout"]["per_gpu"]["model_states"]}


def format_colocated(col: dict) -> str:
    ph = ", ".join(f"{p} {v / GIB:.1f}" for p, v in col["phases"].items())
    return (f"\ncolocated (ppo.colocate all, {col['bundles']} shared GPUs): bundle {col['worst_bundle']} "
            f"({' + '.join(col['groups'])}) holds per phase {ph} GiB; peak {col['peak'] / GIB:.1f} at "
            f"{col['peak_phase']}, margin {col['margin'] / GIB:.1f}: "
            + ("fits" if col["fits"] else "DOES NOT FIT")
            + f"; host memory for the offloaded states and sleeping engines {col['host_offload_bytes'] / GIB:.1f} GiB")
