"""Where every PPO actor goes: placement groups, bundles, GPU shares and vLLM's tensor-parallel settings.

    layout = ppo_placement(cfg.ppo, nodes=[{"CPU": 96, "GPU": 8}, ...])   # ray.nodes()' resources, or None
    for g in layout.groups: placement_group(g.bundles, strategy=g.strategy, name=g.name)   # in this order
    for a in layout.actors: Actor.options(num_gpus=a.num_gpus, ..., placement_group_bundle_index=a.bundle)

Pure decisions (no Ray), so they are tested without a cluster or a GPU; `actors/groups.py` acts on them
and `tlcr ppo --dry-run` prints them. Two layouts (`ppo.colocate`):

* `none`: one placement group per group. The learner's comes first and is STRICT_PACK when its bundles
  fit on one node (ZeRO-3's all-gathers then stay on NVLink); the others PACK. A vLLM engine with
  tensor parallel TP > 1 gets its own STRICT_PACK group of TP one-GPU bundles (vLLM's Ray executor
  refuses bundles of more than one GPU): the engine actor sits in bundle 0 with num_gpus 0 and vLLM
  starts one Ray worker per bundle (`VLLM_RAY_BUNDLE_INDICES`, `VLLM_RAY_PER_WORKER_GPUS`), the way
  OpenRLHF does it. TP 1 keeps vLLM in-process on the actor's own GPU.
* `all`: one placement group of N = ppo.learner.num_actors bundles, each one GPU (when any group uses
  GPUs) and the CPUs of what sits on it. Learner rank r -> bundle r; rollout engine i's TP ranks ->
  bundles i*TP .. i*TP+TP-1; reference and reward actors from the last bundle down (rank 0 already
  carries the weight-sync clone). `num_gpus` is each actor's share of its bundle's GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tlcr_ray.config import ConfigError

GROUP_ORDER = ("learner", "rollout", "reward", "reference")
"""Creation order of the placement groups: the learner first, so the biggest, tightest group gets a node."""
EPS = 1e-9


@dataclass(frozen=True)
class PlacementGroupSpec:
    name: str
    bundles: list[dict[str, float]]
    strategy: str  # STRICT_PACK | PACK


@dataclass(frozen=True)
class ActorSlot:
    """One Ray actor: which placement group and bundle, what it asks for, what its engine is told."""

    group: str  # learner | rollout | reward | reference
    index: int
    placement_group: str
    bundle: int
    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    engine_kwargs: dict = field(default_factory=dict)
    """vLLM keywords this actor's engine needs for its placement (distributed_executor_backend, enable_sleep_mode)."""
    worker_bundles: tuple[int, ...] = ()
    """vLLM TP > 1: the bundles of its TP workers (in `placement_group`), each asking worker_gpus."""
    worker_gpus: float = 0.0


@dataclass(frozen=True)
class PlacementLayout:
    colocate: str
    groups: list[PlacementGroupSpec]
    actors: list[ActorSlot]

    def of(self, group: str) -> list[ActorSlot]:
        return [a for a in self.actors if a.group == group]


def _clean(bundle: dict[str, float]) -> dict[str, float]:
    """Ray wants positive amounts only."""
    return {k: float(v) for k, v in bundle.items() if v > EPS}


def strategy_for(bundles: list[dict[str, float]], nodes: list[dict[str, float]] | None) -> str:
    """STRICT_PACK when one node of `nodes` (each alive node's total resources) holds all bundles; also
    when no node offers every kind of resource they need yet (unknown nodes, or a cold autoscaling
    cluster with no GPU node up: the autoscaler then starts one node for the whole group). PACK only
    when nodes of the right kind exist and each is too small: the group then spans nodes."""
    if nodes is None:
        return "STRICT_PACK"
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    if any(all(n.get(k, 0.0) + EPS >= v for k, v in need.items()) for n in nodes):
        return "STRICT_PACK"
    if not any(all(n.get(k, 0.0) > 0 for k in need) for n in nodes):
        return "STRICT_PACK"
    return "PACK"


def vllm_engine_settings(tp: int, worker_bundles: list[int], worker_gpus: float, *, sleep: bool,
                         on_gpu: bool) -> tuple[dict[str, str], dict]:
    """(env vars of the engine actor, extra `vllm.LLM` keywords) for a TP-`tp` engine whose workers go on
    `worker_bundles` of the actor's placement group with `worker_gpus` each.

    TP 1: vLLM runs in the actor's process ("uni" executor) on the actor's own GPU share: nothing to set.
    TP > 1: the Ray executor, told the bundles (vLLM otherwise takes the first TP GPU bundles of the group,
    which belong to other engines or groups) and each worker's GPU share.
    """
    env: dict[str, str] = {}
    kwargs: dict = {"enable_sleep_mode": True} if sleep and on_gpu else {}
    if tp > 1:
        if len(worker_bundles) != tp:
            raise ValueError(f"{tp} TP ranks but {len(worker_bundles)} bundles: {worker_bundles}")
        env = {"VLLM_RAY_BUNDLE_INDICES": ",".join(str(b) for b in worker_bundles),
               "VLLM_RAY_PER_WORKER_GPUS": f"{worker_gpus:g}"}
        kwargs["distributed_executor_backend"] = "ray"
    return env, kwargs


def ppo_placement(ppo, backend: str, nodes: list[dict[str, float]] | None = None) -> PlacementLayout:
    """The layout of ppo.colocate (module docstring). `backend`: the resolved rollout backend (hf | vllm);
    `nodes`: the cluster's per-node resources (decides STRICT_PACK), None when unknown."""
    tp = ppo.vllm_tensor_parallel if backend == "vllm" else 1
    if ppo.colocate == "all":
        return _colocated(ppo, backend, tp, nodes)
    groups, actors = [], []
    for name in GROUP_ORDER:
        res = getattr(ppo, name)
        base = {"CPU": res.num_cpus, **res.resources}
        if name == "rollout" and tp > 1:
            if res.num_gpus <= 0:
                raise ConfigError(f"ppo.vllm_tensor_parallel {tp} needs GPUs: ppo.rollout.num_gpus is {res.num_gpus:g}")
            per_worker = res.num_gpus / tp
            if per_worker > 1 + EPS:
                raise ConfigError(f"ppo.rollout.num_gpus {res.num_gpus:g} over {tp} TP workers is more than one GPU "
                                  f"each; set ppo.rollout.num_gpus to {tp} (the GPUs of one engine)")
            for i in range(res.num_actors):
                # Bundle 0 also holds the engine actor's CPUs (its workers ask none); one node per engine.
                bundles = [_clean({**(base if r == 0 else res.resources), "GPU": per_worker}) for r in range(tp)]
                pg = PlacementGroupSpec(f"tlcr-ppo-rollout-{i}", bundles, "STRICT_PACK")
                groups.append(pg)
                env, kwargs = vllm_engine_settings(tp, list(range(tp)), per_worker, sleep=False, on_gpu=True)
                actors.append(ActorSlot("rollout", i, pg.name, 0, res.num_cpus, 0.0, dict(res.resources), env, kwargs,
                                        tuple(range(tp)), per_worker))
            continue
        bundles = [_clean({**base, "GPU": res.num_gpus})] * res.num_actors
        strategy = strategy_for(bundles, nodes) if name == "learner" else "PACK"
        pg = PlacementGroupSpec(f"tlcr-ppo-{name}", bundles, strategy)
        groups.append(pg)
        actors += [ActorSlot(name, i, pg.name, i, res.num_cpus, res.num_gpus, dict(res.resources))
                   for i in range(res.num_actors)]
    return PlacementLayout("none", groups, actors)


def _colocated(ppo, backend: str, tp: int, nodes) -> PlacementLayout:
    n = ppo.learner.num_actors
    name = "tlcr-ppo-colocated"
    on_gpu = any(getattr(ppo, g).num_gpus > 0 for g in GROUP_ORDER)
    rollout, reward, reference = ppo.rollout, ppo.reward, ppo.reference
    for g in GROUP_ORDER:
        res = getattr(ppo, g)
        if res.num_gpus > 1 + EPS:
            raise ConfigError(f"ppo.{g}.num_gpus {res.num_gpus:g}: with ppo.colocate all it is the share of one "
                              f"bundle's GPU (<= 1); the bundles are ppo.learner.num_actors = {n} GPUs")
        if on_gpu and res.num_gpus <= 0:
            raise ConfigError(f"ppo.{g}.num_gpus is 0 but other groups use GPUs: with ppo.colocate all every group "
                              f"shares the bundles' GPUs (give it a share such as 0.1)")
    if rollout.num_actors * tp > n:
        raise ConfigError(f"ppo.rollout: {rollout.num_actors} engines x TP {tp} = {rollout.num_actors * tp} GPUs, "
                          f"but ppo.colocate all has ppo.learner.num_actors = {n} bundles")
    for g, res in (("reward", reward), ("reference", reference)):
        if res.num_actors > n:
            raise ConfigError(f"ppo.{g}.num_actors {res.num_actors} > the {n} colocated bundles (ppo.learner.num_actors)")
    actors = [ActorSlot("learner", r, name, r, ppo.learner.num_cpus, ppo.learner.num_gpus, dict(ppo.learner.resources))
              for r in range(n)]
    for i in range(rollout.num_actors):
        workers = list(range(i * tp, (i + 1) * tp))
        env, kwargs = vllm_engine_settings(tp, workers, rollout.num_gpus, sleep=True, on_gpu=on_gpu)
        if backend != "vllm":
            env, kwargs = {}, {}
        actors.append(ActorSlot("rollout", i, name, workers[0], rollout.num_cpus,
                                rollout.num_gpus if tp == 1 else 0.0, dict(rollout.resources), env, kwargs,
                                tuple(workers) if tp > 1 else (), rollout.num_gpus if tp > 1 else 0.0))
    down = list(range(n - 1, -1, -1))  # from the last bundle down: bundle 0 has rank 0's sync clone
    for k in range(reference.num_actors):
        actors.append(ActorSlot("reference", k, name, down[k % n], reference.num_cpus, reference.num_gpus,
                                dict(reference.resources)))
    for j in range(reward.num_actors):
        actors.append(ActorSlot("reward", j, name, down[(reference.num_actors + j) % n], reward.num_cpus,
                                reward.num_gpus, dict(reward.resources)))
    bundles = [{"CPU": 0.0, "GPU": 1.0 if on_gpu else 0.0} for _ in range(n)]
    shares = [0.0] * n
    for a in actors:
        b = bundles[a.bundle]
        b["CPU"] += a.num_cpus
        for k, v in a.resources.items():
            b[k] = b.get(k, 0.0) + v
        for w in a.worker_bundles or (a.bundle,):
            shares[w] += a.worker_gpus if a.worker_bundles else a.num_gpus
    for i, share in enumerate(shares):
        if share > 1 + EPS:
            on = sorted({f"{a.group}" for a in actors if i in (a.worker_bundles or (a.bundle,))})
            raise ConfigError(f"ppo.colocate all: bundle {i} holds {', '.join(on)} whose ppo.<group>.num_gpus shares "
                              f"add up to {share:g} > 1 GPU; lower them (they are shares of one GPU)")
    bundles = [_clean(b) for b in bundles]
    return PlacementLayout("all", [PlacementGroupSpec(name, bundles, strategy_for(bundles, nodes))], actors)


def bundle_groups(layout: PlacementLayout) -> list[list[str]]:
    """For the one colocated placement group: the groups with an actor or a vLLM worker on each bundle."""
    (pg,) = layout.groups
    on: list[list[str]] = [[] for _ in pg.bundles]
    for a in layout.actors:
        for b in a.worker_bundles or (a.bundle,):
            if a.group not in on[b]:
                on[b].append(a.group)
    return on


def shortfall(pg: PlacementGroupSpec, available: dict[str, float], total: dict[str, float], waited_s: float) -> str:
    """Why a placement group did not get placed: what it asks, what the cluster has, and what to do."""
    need: dict[str, float] = {}
    for b in pg.bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    short = {k: v - available.get(k, 0.0) for k, v in need.items() if available.get(k, 0.0) + EPS < v}
    per_bundle = ", ".join(sorted({_fmt(b) for b in pg.bundles}))
    missing = (", ".join(f"{k} {v:g} more" for k, v in sorted(short.items())) if short else
               f"the totals are free but no node holds the bundles as {pg.strategy} asks")
    return (f"placement group {pg.name} ({len(pg.bundles)} bundles of {per_bundle}, {pg.strategy}) was not placed "
            f"within {waited_s:g} s: it asks {_fmt(need)}; the cluster has {_fmt(available)} free of {_fmt(total)}; "
            f"missing: {missing}. If the cluster autoscales, nodes may still be starting: raise "
            f"ppo.placement_wait_s; otherwise lower the group's num_actors / num_gpus or add nodes.")


def _fmt(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store_memory"))
            and "_group_" not in k and k != "bundle"}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"
