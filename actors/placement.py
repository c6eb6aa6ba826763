"""Placement groups on the live cluster: created in `tlcr_ray.placement`'s order, waited for with a message
that names what is missing, and described (node, bundle, GPU share of every actor) for `--dry-run`."""
from __future__ import annotations

import time

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from tlcr_ray.config import ConfigError
from tlcr_ray.placement import PlacementGroupSpec, PlacementLayout, shortfall


class PlacementError(ConfigError):
    """A placement group could not be placed in time (the CLI exits 2 with the message)."""


def node_resources() -> list[dict[str, float]]:
    """Total resources of every alive node (decides STRICT_PACK)."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def create_placement_groups(specs: list[PlacementGroupSpec], wait_s: float, prefix: str = "") -> dict:
    """{name: PlacementGroup}, one at a time in order (the learner's first); on a timeout everything
    created so far is removed and PlacementError says what was asked and what the cluster has."""
    pgs: dict = {}
    try:
        for spec in specs:
            pg = placement_group(spec.bundles, strategy=spec.strategy, name=prefix + spec.name)
            pgs[spec.name] = pg
            start = time.monotonic()
            if not pg.wait(timeout_seconds=wait_s):
                raise PlacementError(shortfall(spec, ray.available_resources(), ray.cluster_resources(),
                                               round(time.monotonic() - start, 1)))
    except BaseException:
        for pg in pgs.values():
            remove_placement_group(pg)
        raise
    return pgs


def remove_all(pgs: dict) -> None:
    for pg in pgs.values():
        remove_placement_group(pg)


def bundle_nodes(pgs: dict) -> dict[str, list[str]]:
    """{placement group name: [node id of each bundle]}."""
    out = {}
    for name, pg in pgs.items():
        table = placement_group_table(pg)
        nodes = table.get("bundles_to_node_id", {})
        out[name] = [nodes.get(i, "?") for i in range(len(table["bundles"]))]
    return out


def describe(layout: PlacementLayout, pgs: dict) -> list[dict]:
    """One row per actor (and per vLLM TP worker): group, actor, placement group, bundle, node, CPUs, GPU share."""
    where = bundle_nodes(pgs)
    ips = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes()}
    rows = []
    for a in layout.actors:
        node = where[a.placement_group][a.bundle]
        rows.append({"group": a.group, "actor": f"{a.group}-{a.index}", "placement_group": a.placement_group,
                     "bundle": a.bundle, "node_id": node, "node_ip": ips.get(node, "?"), "num_cpus": a.num_cpus,
                     "num_gpus": a.num_gpus, "env": a.env_vars, "engine_kwargs": a.engine_kwargs})
        for rank, b in enumerate(a.worker_bundles):
            node = where[a.placement_group][b]
            rows.append({"group": a.group, "actor": f"{a.group}-{a.index} vLLM TP worker {rank}",
                         "placement_group": a.placement_group, "bundle": b, "node_id": node,
                         "node_ip": ips.get(node, "?"), "num_cpus": 0.0, "num_gpus": a.worker_gpus})
    return rows


def format_rows(layout: PlacementLayout, rows: list[dict]) -> str:
    nodes = {r["node_id"] for r in rows}
    short = {n: f"node{i} {n[:8]}" for i, n in enumerate(sorted(nodes))}
    lines = [f"placement (ppo.colocate {layout.colocate}; groups in creation order):"]
    for g in layout.groups:
        lines.append(f"  {g.name:<22} {g.strategy:<11} {len(g.bundles)} bundles: "
                     + " ".join("{" + ", ".join(f"{k} {v:g}" for k, v in b.items()) + "}" for b in g.bundles))
    lines.append(f"\n  {'actor':<34}{'placement group':<23}{'bundle':>6}  {'node':<32}{'cpus':>5}{'gpus':>6}")
    for r in rows:
        lines.append(f"  {r['actor']:<34}{r['placement_group']:<23}{r['bundle']:>6}  "
                     f"{short[r['node_id']] + ' ' + r['node_ip']:<32}{r['num_cpus']:>5g}{r['num_gpus']:>6g}")
        if r.get("env"):
            lines.append(f"  {'':<34}env {r['env']}; vLLM {r['engine_kwargs']}")
    return "\n".join(lines)
