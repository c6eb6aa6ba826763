"""`tlcr ppo|sft|train-disc|train-rm --dry-run`: will this run get its GPUs, and will it fit on them?

    RAY_ADDRESS=<head>:6379 tlcr ppo --config configs/a100-7b.yaml --dry-run

Connects to the cluster (RAY_ADDRESS, else a local Ray), creates the run's placement groups exactly as
the run would (`tlcr_ray.placement`, in its order and strategies, waiting ppo.placement_wait_s), prints
where every actor would go (node, bundle, GPU share) and the memory plan per GPU (`tlcr_ray.plan`),
removes the groups and returns. Anything that does not fit raises ConfigError (the CLI exits 2) naming
it. No model is loaded and no actor is started.
"""
from __future__ import annotations

from ray_init import ensure_ray
from tlcr_ray.config import ConfigError
from tlcr_ray.placement import ActorSlot, PlacementGroupSpec, PlacementLayout, ppo_placement, strategy_for
from tlcr_ray.plan import GIB, format_table, plan
from tlcr_ray.plan_models import gpu_bytes, host_memory, local_cuda_memory
from tlcr_ray.rl.rollout import resolve_backend


def _memory(cfg, groups: list[str]) -> tuple[str, list[str]]:
    """(the plan's table, what does not fit) for the GPU the run would check (`plan.require_fit`'s choice)."""
    if not groups:
        return "memory plan: no group uses a GPU (CPU run)", []
    local = local_cuda_memory()
    gpu = "cuda:0" if local else cfg.gpu
    if gpu is None:
        return "memory plan skipped: the config names no `gpu` (set gpu: a100-80gb, or run `tlcr plan --gpu`)", []
    try:
        report = plan(cfg, local or gpu_bytes(gpu), host_memory(), groups=tuple(groups), gpu=gpu)
    except ConfigError as exc:
        if "model.base" not in str(exc):
            raise
        return f"memory plan skipped: {exc}", []
    misfits = [f"{n} needs {g['per_gpu']['peak'] / GIB:.1f} GiB per GPU at {g['peak_phase']}, {gpu} has "
               f"{report['gpu_memory_bytes'] / GIB:.1f}" for n, g in report["groups"].items()
               if not g["fits"] and not g.get("cpu")]
    col = report.get("colocated")
    if col and not col["fits"]:
        misfits.append(f"the colocated groups need {col['peak'] / GIB:.1f} GiB on one GPU at {col['peak_phase']}, "
                       f"{gpu} has {report['gpu_memory_bytes'] / GIB:.1f}")
    return format_table(report), misfits


def _place(layout: PlacementLayout, wait_s: float) -> tuple[str, list[dict]]:
    from actors.placement import create_placement_groups, describe, format_rows, remove_all

    pgs = create_placement_groups(layout.groups, wait_s, prefix="tlcr-dry-run-")
    try:
        rows = describe(layout, pgs)
    finally:
        remove_all(pgs)
    return format_rows(layout, rows), rows


def _report(what: str, layout: PlacementLayout, wait_s: float, cfg, gpu_groups: list[str]) -> dict:
    ensure_ray()
    problems = []
    try:
        text, rows = _place(layout, wait_s)
    except ConfigError as exc:  # PlacementError: what is missing; the memory plan is still worth printing
        text, rows = f"placement: {exc}", []
        problems.append(str(exc))
    table, misfits = _memory(cfg, gpu_groups)
    problems += misfits
    print(f"{what} --dry-run: no model is loaded\n\n{text}\n\n{table}", flush=True)
    if problems:
        raise ConfigError(f"{what} --dry-run: does not fit: " + " | ".join(problems))
    nodes = sorted({r["node_id"] for r in rows})
    return {"stage": what, "dry_run": True, "fits": True, "colocate": layout.colocate,
            "placement_groups": [{"name": g.name, "strategy": g.strategy, "bundles": g.bundles} for g in layout.groups],
            "nodes": len(nodes),
            "actors": [{k: r[k] for k in ("actor", "placement_group", "bundle", "node_id", "node_ip", "num_gpus")}
                       for r in rows]}


def ppo_dry_run(cfg) -> dict:
    from actors.placement import node_resources

    ensure_ray()
    layout = ppo_placement(cfg.ppo, resolve_backend(cfg.ppo.rollout_backend), node_resources())
    gpu_groups = [f"ppo.{g}" for g in ("rollout", "reward", "reference", "learner") if getattr(cfg.ppo, g).num_gpus > 0]
    return _report("ppo", layout, cfg.ppo.placement_wait_s, cfg, gpu_groups)


def supervised_layout(stage: str, train_cfg, nodes) -> PlacementLayout:
    """Ray Train's worker group as a layout: num_workers bundles of the worker's resources (what
    `ScalingConfig.as_placement_group_factory` asks), STRICT_PACK when one node holds them."""
    bundle = {"CPU": float(train_cfg.cpus_per_worker), **({"GPU": 1.0} if train_cfg.use_gpu else {})}
    bundles = [dict(bundle) for _ in range(train_cfg.num_workers)]
    spec = PlacementGroupSpec(f"tlcr-{stage}-train", bundles, strategy_for(bundles, nodes))
    actors = [ActorSlot(stage, r, spec.name, r, bundle["CPU"], bundle.get("GPU", 0.0)) for r in range(len(bundles))]
    return PlacementLayout("none", [spec], actors)


def supervised_dry_run(cfg, stage: str) -> dict:
    from actors.placement import node_resources

    ensure_ray()
    t = getattr(cfg, stage)
    return _report(stage, supervised_layout(stage, t, node_resources()), cfg.ppo.placement_wait_s, cfg,
                   [stage] if t.use_gpu else [])
