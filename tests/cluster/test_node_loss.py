"""Node loss, for real: a tiny PPO run on a 3-node `ray.cluster_utils.Cluster` loses the node that
hosts its rollout actor (killed without grace) right after its first checkpoint; the controller
recreates the actor groups on the surviving nodes and finishes from that checkpoint.

    .venv/bin/python -m pytest tests/test_node_loss.py -q

The scenario runs in a child process inside fresh PID, mount and network namespaces (`unshare`, root
only): a loopback-only network (Ray resolves 127.0.0.1 to the machine's address unless that is all
there is), its own /tmp/ray, and nothing left behind when it ends. This session's Ray is untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER_RESOURCE = "tlcr_worker"
STEPS, CHECKPOINT_EVERY = 8, 2


def _node_of_actor(ray, class_name: str) -> str | None:
    from ray._private.state import actors  # the GCS's actor table; the state API needs a dashboard

    for info in actors().values():
        if info["ActorClassName"] == class_name and info["State"] == "ALIVE":
            return info["Address"]["NodeID"]
    return None


def run_scenario(out_dir: Path, cfg_args: list[str]) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from actors.controller import run
    from tlcr_ray.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", cfg_args)
    first_ckpt = Path(cfg.output_dir) / f"ppo-{cfg.reward.mode}" / "checkpoints" / f"step-{CHECKPOINT_EVERY:06d}"
    node_args = {"node_ip_address": "127.0.0.1", "object_store_memory": 200 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "num_cpus": 2, "include_dashboard": False})
    # Two identical workers: whichever hosts the rollout actor is killed, the other takes it over.
    workers = [cluster.add_node(**node_args, num_cpus=2, resources={WORKER_RESOURCE: 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    observed: dict = {}

    def kill_rollout_node():
        deadline = time.monotonic() + 600
        while not first_ckpt.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        node_id = _node_of_actor(ray, "Rollout")
        (victim,) = [w for w in workers if w.node_id == node_id]
        observed["checkpoints_before_kill"] = sorted(p.name for p in first_ckpt.parent.iterdir())
        observed["killed_node"] = node_id
        cluster.remove_node(victim, allow_graceful=False)

    killer = threading.Thread(target=kill_rollout_node, daemon=True)
    killer.start()
    try:
        summary = run(cfg)
        killer.join(timeout=5)
        observed["summary"] = summary
        observed["node_alive"] = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
    finally:
        ray.shutdown()
        cluster.shutdown()
    (out_dir / "scenario.json").write_text(json.dumps(observed, indent=2, default=str))
    return observed


@pytest.fixture(scope="module")
def tiny_ppo_overrides(tmp_path_factory, tiny_model_dir, tokenizer) -> list[str]:
    from tlcr_ray.models import TokenDiscriminator, save_head_model

    root = tmp_path_factory.mktemp("node-loss-ppo")
    disc = save_head_model(TokenDiscriminator.from_pretrained(tiny_model_dir, seed=1), root / "disc", tokenizer)
    return [f"output_dir={root / 'run'}", f"ppo.policy={tiny_model_dir}", f"reward.discriminator={disc}",
            f"ppo.steps={STEPS}", f"ppo.checkpoint_every={CHECKPOINT_EVERY}", "model.max_response_len=8",
            "data.max_pairs=16", f"ppo.rollout.resources={{{WORKER_RESOURCE}: 1}}"]


@pytest.mark.slow
@pytest.mark.ray
def test_ppo_finishes_from_its_checkpoint_after_losing_the_rollout_node(tmp_path, tiny_ppo_overrides):
    unshare = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net"]
    if os.geteuid() != 0 or not shutil.which("unshare") or subprocess.run([*unshare, "true"]).returncode:
        pytest.skip("needs root + unshare for a loopback-only network namespace")
    (tmp_path / "ray-tmp").mkdir()
    Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point; what is inside stays untouched
    inner = 'ip link set lo up && mount --bind "$1" /tmp/ray && shift && exec "$@"'
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    # --kill-child: killing unshare on a timeout ends the namespace, and with it everything inside.
    proc = subprocess.Popen([*unshare, "bash", "-c", inner, "_", str(tmp_path / "ray-tmp"),
                             sys.executable, __file__, str(tmp_path), *tiny_ppo_overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=780)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    result = tmp_path / "scenario.json"
    assert result.exists(), f"the scenario died (rc {proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}"
    seen = json.loads(result.read_text())
    print(json.dumps(seen))
    assert seen["checkpoints_before_kill"][0] == f"step-{CHECKPOINT_EVERY:06d}"
    assert seen["node_alive"][seen["killed_node"]] is False, "the killed node should be marked dead"
    summary = seen["summary"]
    assert summary["failures_recovered"] >= 1, "the run never noticed the lost node"
    assert summary["steps"] == STEPS
    # It resumed from a checkpoint, not from the initial policy.
    assert "resuming from" in out
    assert "checkpoints/step-" in out.split("resuming from")[1][:300]
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "each step is logged once, in order"
    assert (Path(summary["run_dir"]) / "model" / "config.json").exists()


if __name__ == "__main__":
    run_scenario(Path(sys.argv[1]), sys.argv[2:])
