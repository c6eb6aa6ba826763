"""`tlcr ppo|sft --dry-run` against a real Ray cluster with fake GPUs: two 8-GPU nodes of a
`ray.cluster_utils.Cluster` (the GPUs are only Ray resources; nothing runs on them, no model loads).

    .venv/bin/python -m pytest tests/cluster/test_dry_run.py -q

Layouts: today's two-node separate pools (configs/a100-7b-2node.yaml), `colocate: all` on one 8-GPU node
(configs/a100-7b.yaml), TP=2 vLLM engines (both layouts), a supervised stage, and two that do not fit
(exit 2 naming what is missing: too few GPUs; a memory plan over the GPU). The CLI runs in a subprocess
with RAY_ADDRESS, as on a real cluster. Everything runs in fresh PID, mount and network namespaces
(root + `unshare`): a loopback-only network, its own /tmp/ray, nothing left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
A100, TWO_NODE = "configs/a100-7b.yaml", "configs/a100-7b-2node.yaml"
CASES = {
    "two_node": ["ppo", "--config", TWO_NODE],
    "two_node_tp2": ["ppo", "--config", TWO_NODE, "--set", "ppo.vllm_tensor_parallel=2", "--set", "ppo.rollout.num_gpus=2"],
    "colocated": ["ppo", "--config", A100],
    "colocated_tp2": ["ppo", "--config", A100, "--set", "ppo.vllm_tensor_parallel=2", "--set", "ppo.rollout.num_actors=4"],
    "sft": ["sft", "--config", A100],
    "too_many_gpus": ["ppo", "--config", TWO_NODE, "--set", "ppo.learner.num_actors=20",
                      "--set", "ppo.placement_wait_s=3"],
    "over_memory": ["ppo", "--config", A100, "--set", "ppo.vllm_memory_utilization=0.9"],
}


def run_scenario(out_dir: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    node = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024**2, "num_cpus": 96, "num_gpus": 8}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    results = {"nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
    try:
        for name, args in CASES.items():
            proc = subprocess.run([sys.executable, "-m", "tlcr_ray.cli", *args, "--dry-run"], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=300)
            results[name] = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr[-4000:]}
        # Everything the dry runs created is gone again.
        from ray.util.placement_group import placement_group_table

        results["live_groups"] = [t["name"] for t in placement_group_table().values() if t["state"] != "REMOVED"]
        results["free_gpus"] = ray.available_resources().get("GPU", 0)
    finally:
        ray.shutdown()
        cluster.shutdown()
    (out_dir / "scenario.json").write_text(json.dumps(results, indent=2))
    return results


def _summary(case: dict) -> dict:
    """The JSON the CLI prints last (after the human-readable tables)."""
    out = case["stdout"]
    return json.loads(out[out.rindex("\n{") + 1:] if "\n{" in out else out[out.index("{"):])


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict:
    unshare = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net"]
    if os.geteuid() != 0 or not shutil.which("unshare") or subprocess.run([*unshare, "true"]).returncode:
        pytest.skip("needs root + unshare for a loopback-only network namespace")
    tmp = tmp_path_factory.mktemp("dry-run")
    (tmp / "ray-tmp").mkdir()
    Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point; what is inside stays untouched
    inner = 'ip link set lo up && mount --bind "$1" /tmp/ray && shift && exec "$@"'
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([*unshare, "bash", "-c", inner, "_", str(tmp / "ray-tmp"), sys.executable, __file__, str(tmp)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    result = tmp / "scenario.json"
    assert result.exists(), f"the scenario died (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(result.read_text())


pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_node_layout_puts_the_learner_on_one_node_and_the_rest_on_the_other(scenario):
    case = scenario["two_node"]
    assert case["rc"] == 0, case["stderr"]
    s = _summary(case)
    assert s["dry_run"] and s["fits"] and s["colocate"] == "none" and s["nodes"] == 2
    assert s["placement_groups"][0]["name"] == "tlcr-ppo-learner"
    assert s["placement_groups"][0]["strategy"] == "STRICT_PACK"
    by_group: dict[str, set] = {}
    for a in s["actors"]:
        by_group.setdefault(a["actor"].split("-")[0], set()).add(a["node_id"])
    assert len(by_group["learner"]) == 1, "the 8 learner ranks share one node"
    assert by_group["learner"].isdisjoint(by_group["rollout"] | by_group["reward"] | by_group["reference"])
    assert "no model is loaded" in case["stdout"] and "Everything fits." in case["stdout"]


def test_tp2_engines_get_their_own_gpu_bundles(scenario):
    case = scenario["two_node_tp2"]
    assert case["rc"] == 0, case["stderr"]
    actors = {a["actor"]: a for a in _summary(case)["actors"]}
    assert actors["rollout-0"]["num_gpus"] == 0.0  # the engine actor; its TP workers hold the GPUs
    w0, w1 = actors["rollout-0 vLLM TP worker 0"], actors["rollout-0 vLLM TP worker 1"]
    assert (w0["bundle"], w1["bundle"]) == (0, 1) and w0["num_gpus"] == w1["num_gpus"] == 1.0
    assert w0["node_id"] == w1["node_id"], "one engine's TP ranks stay on one node"
    assert "VLLM_RAY_BUNDLE_INDICES" in case["stdout"]


@pytest.mark.parametrize("name", ["colocated", "colocated_tp2"])
def test_colocated_layout_fits_one_eight_gpu_node(scenario, name):
    case = scenario[name]
    assert case["rc"] == 0, case["stderr"]
    s = _summary(case)
    assert s["colocate"] == "all" and s["nodes"] == 1
    (pg,) = s["placement_groups"]
    assert pg["strategy"] == "STRICT_PACK" and len(pg["bundles"]) == 8
    shares: dict[int, float] = {}
    for a in s["actors"]:
        shares[a["bundle"]] = shares.get(a["bundle"], 0.0) + a["num_gpus"]
    assert sorted(shares) == list(range(8)) and max(shares.values()) <= 1.0
    assert "colocated (ppo.colocate all, 8 shared GPUs)" in case["stdout"] and "Everything fits." in case["stdout"]


def test_supervised_dry_run(scenario):
    case = scenario["sft"]
    assert case["rc"] == 0, case["stderr"]
    s = _summary(case)
    assert s["stage"] == "sft" and s["nodes"] == 1 and s["placement_groups"][0]["strategy"] == "STRICT_PACK"
    assert len(s["actors"]) == 8


def test_not_enough_gpus_exits_2_naming_what_is_missing(scenario):
    case = scenario["too_many_gpus"]
    assert case["rc"] == 2
    err = case["stderr"]
    assert "tlcr-ppo-learner" in err and "GPU 4 more" in err and "autoscales" in err, err


def test_memory_that_does_not_fit_exits_2(scenario):
    case = scenario["over_memory"]
    assert case["rc"] == 2
    assert "colocated groups need" in case["stderr"], case["stderr"]


def test_dry_runs_leave_nothing_behind(scenario):
    assert scenario["live_groups"] == [] and scenario["free_gpus"] == 16


if __name__ == "__main__":
    run_scenario(Path(sys.argv[1]))
