"""`ray start` + `ray job submit --working-dir . -- python -m tlcr_ray.cli ppo ...` -> SUCCEEDED, `ray stop`.

    .venv/bin/python -m pytest tests/test_job_submit.py -q

`ray stop` stops every Ray process it can see, so the cluster runs inside fresh PID, mount and network
namespaces (`unshare`, root only, as tests/test_node_loss.py does): a loopback-only network, its own
/tmp/ray (bind-mounted from the test's tmp dir), and nothing left behind when the namespace ends.
The session's own Ray and everyone else's stay untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
UNSHARE = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net"]

# Runs inside the namespaces. The job's own exit status is what `ray job submit` returns (it waits).
SCRIPT = r"""
set -u
ip link set lo up && mount --bind "$RAY_TMP" /tmp/ray || exit 10
trap 'ray stop --grace-period 5 >/dev/null 2>&1' EXIT
ray start --head --node-ip-address 127.0.0.1 --port 6390 --dashboard-host 127.0.0.1 --dashboard-port 8299 \
    --include-dashboard true --num-cpus 4 --object-store-memory 200000000 --disable-usage-stats >/dev/null || exit 11
ray job submit --address http://127.0.0.1:8299 --submission-id tlcr-ppo-test --working-dir . \
    -- python -m tlcr_ray.cli ppo --config configs/tiny.yaml "$@"
echo "submit-exit=$?"
python -c "from ray.job_submission import JobSubmissionClient as C
print('job-status=' + C('http://127.0.0.1:8299').get_job_status('tlcr-ppo-test').value)"
"""


def _namespaces_allowed() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run([*UNSHARE, "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _namespaces_allowed(), reason="needs root + unshare to isolate ray start/stop")
def test_ray_job_submit_ppo_succeeds(tmp_path, tiny_model_dir, head_models):  # noqa: F811
    (tmp_path / "ray-tmp").mkdir()
    Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point; what is inside stays untouched
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMP": str(tmp_path / "ray-tmp"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           # The machine is shared: other people's memory use must not make Ray kill this job's workers.
           "RAY_memory_monitor_refresh_ms": "0"}
    env.pop("RAY_ADDRESS", None)
    overrides = [f"output_dir={tmp_path / 'run'}", f"ppo.policy={tiny_model_dir}",
                 f"reward.discriminator={head_models['disc']}", "ppo.steps=2", "model.max_response_len=8",
                 "data.max_pairs=16"]
    args = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen([*UNSHARE, "bash", "-c", SCRIPT, "job", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=840)
    except subprocess.TimeoutExpired:  # --kill-child: killing unshare ends everything inside
        proc.kill()
        out, _ = proc.communicate()
    assert "submit-exit=0" in out, out[-4000:]
    assert "job-status=SUCCEEDED" in out, out[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "ppo-continuous" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "run" / "ppo-continuous" / "model" / "config.json").exists()
