"""Autoscaling, for real: Ray's fake multi-node autoscaler starts at 0 workers, a tiny `tlcr ppo` job
whose rollout group asks for a worker-only resource is submitted through deploy/submit.sh (token auth
on), the cluster scales up, the job succeeds, and the idle worker is removed again.

    .venv/bin/python -m pytest tests/test_autoscaling.py -q

`AutoscalingCluster.start()/shutdown()` run `ray stop --force`, which kills every Ray process it can
see. So the scenario runs in a child process inside fresh PID, mount and network namespaces
(`unshare`, root only): there it sees only its own processes, its own /tmp/ray and a loopback-only
network, and neither this session's Ray nor anyone else's on the machine is touched.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
WORKER_RESOURCE = "tlcr_worker"
IDLE_TIMEOUT_MINUTES = 0.2


# --- the scenario (runs inside the namespaces) ---------------------------------------------------

def _fake_cluster_config(worker_cpus: int) -> dict:
    """A cluster-launcher config for Ray's fake multi-node provider, given inline (the wheel lacks
    the example YAML `AutoscalingCluster` would read)."""
    return {
        "cluster_name": "tlcr-autoscaling-test",
        "max_workers": 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {}, "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            # The worker type alone carries WORKER_RESOURCE: asking for it forces a scale-up.
            "tlcr.worker": {"resources": {"CPU": worker_cpus, WORKER_RESOURCE: 1,
                                          "object_store_memory": 200 * 1024**2},
                            "node_config": {}, "min_workers": 0, "max_workers": 1},
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _alive_workers(ray) -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get(WORKER_RESOURCE))


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(1)


def run_scenario(out_dir: Path, tlcr_args: list[str]) -> dict:
    """Start the autoscaling cluster, submit `tlcr <tlcr_args>` with deploy/submit.sh, watch the
    worker count; returns what was observed (also written to out_dir/scenario.json)."""
    # Ray reads the auth mode once, at import: the environment comes from run_isolated.
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"]
    import ray
    from ray.cluster_utils import AutoscalingCluster

    class InlineAutoscalingCluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kw):
            return _fake_cluster_config(worker_cpus=2)

    cluster = InlineAutoscalingCluster(head_resources={"CPU": 2, "object_store_memory": 200 * 1024**2},
                                       worker_node_types={})
    observed: dict = {"workers_at_start": None, "max_workers_during_job": 0}
    cluster.start()
    try:
        ray.init(address="auto", log_to_driver=False)
        observed["workers_at_start"] = _alive_workers(ray)
        # Token auth is really enforced: a client with a wrong token is turned away.
        wrong = subprocess.run(["ray", "job", "list", "--address", "http://127.0.0.1:8265"],
                               env={**os.environ, "RAY_AUTH_TOKEN": "not-the-token"},
                               capture_output=True, text=True, timeout=120)
        observed["wrong_token_rc"] = wrong.returncode
        observed["wrong_token_message"] = (wrong.stdout + wrong.stderr)[-400:]

        job_log = out_dir / "job.log"
        with job_log.open("w") as log:
            job = subprocess.Popen(["bash", "deploy/submit.sh", *tlcr_args], cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT,
                                   env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265"})
            stop = threading.Event()

            def watch():
                while not stop.is_set():
                    observed["max_workers_during_job"] = max(observed["max_workers_during_job"],
                                                             _alive_workers(ray))
                    stop.wait(1)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                observed["job_rc"] = job.wait(timeout=480)
            finally:
                stop.set()
                watcher.join()
                if job.poll() is None:
                    job.kill()
        observed["job_log_tail"] = job_log.read_text()[-3000:]
        if observed["job_rc"] == 0:
            began = time.monotonic()
            _wait(lambda: _alive_workers(ray) == 0, 180, "the idle worker to be removed")
            observed["scale_down_s"] = round(time.monotonic() - began, 1)
        observed["workers_at_end"] = _alive_workers(ray)
    finally:
        ray.shutdown()
        cluster.shutdown()
    (out_dir / "scenario.json").write_text(json.dumps(observed, indent=2))
    return observed


# --- the test (runs in pytest's process, starts the scenario in namespaces) ----------------------

def _namespace_prefix() -> list[str] | None:
    """`unshare` into new PID + mount + network namespaces, or None when this machine can't."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return None
    cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net"]
    if subprocess.run([*cmd, "true"], capture_output=True).returncode != 0:
        return None
    return cmd


def run_isolated(out_dir: Path, tlcr_args: list[str], timeout_s: float = 780) -> dict:
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("needs root + unshare: `ray stop --force` would kill every other Ray on this machine")
    ray_tmp = out_dir / "ray-tmp"
    ray_tmp.mkdir()
    Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point; what is inside stays untouched
    token_file = out_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_AUTH_TOKEN", None)
    inner = 'ip link set lo up && mount --bind "$1" /tmp/ray && shift && exec "$@"'
    cmd = [*prefix, "bash", "-c", inner, "_", str(ray_tmp),
           sys.executable, __file__, str(out_dir), *tlcr_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    result = out_dir / "scenario.json"
    assert result.exists(), f"the scenario died (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def tiny_ppo_args(tmp_path_factory, tiny_model_dir, tokenizer) -> list[str]:
    """`tlcr ppo` on configs/tiny.yaml with the tiny policy and a tiny discriminator; the rollout
    group asks for the worker-only resource, so the job cannot run until a worker exists."""
    from tlcr_ray.models import TokenDiscriminator, save_head_model

    root = tmp_path_factory.mktemp("autoscaling-ppo")
    disc = save_head_model(TokenDiscriminator.from_pretrained(tiny_model_dir, seed=1), root / "disc", tokenizer)
    overrides = [f"output_dir={root / 'run'}", f"ppo.policy={tiny_model_dir}", f"reward.discriminator={disc}",
                 "ppo.steps=1", "model.max_response_len=8", "data.max_pairs=16",
                 f"ppo.rollout.resources={{{WORKER_RESOURCE}: 1}}"]
    return ["ppo", "--config", "configs/tiny.yaml", *[a for o in overrides for a in ("--set", o)]]


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_ppo_job_scales_workers_up_from_zero_and_back_down(tmp_path, tiny_ppo_args):
    seen = run_isolated(tmp_path, tiny_ppo_args)
    print(json.dumps({k: v for k, v in seen.items() if k != "job_log_tail"}))
    assert seen["wrong_token_rc"] != 0, seen["wrong_token_message"]
    assert seen["workers_at_start"] == 0
    assert seen["job_rc"] == 0, seen["job_log_tail"]
    assert seen["max_workers_during_job"] == 1, "the job succeeded without the worker it asked for"
    assert seen["workers_at_end"] == 0


if __name__ == "__main__":
    out, args = Path(sys.argv[1]), sys.argv[2:]
    run_scenario(out, args)
