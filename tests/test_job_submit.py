"""`ray start` + `ray job submit --working-dir . -- python -m tlcr_ray.cli ppo ...` -> SUCCEEDED, `ray stop`.

`ray stop` stops every Ray process it can see, so the cluster runs inside its own PID and network
namespaces (`unshare`, loopback only): it cannot see or be seen by the session's local Ray or
anyone else's. Skipped where unshare is not permitted (not root).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_ppo_e2e import head_models  # noqa: F401  (fixture re-used)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
set -u
ip link set lo up
trap 'ray stop --grace-period 5 >/dev/null 2>&1' EXIT
ray start --head --node-ip-address 127.0.0.1 --port 6390 --dashboard-host 127.0.0.1 --dashboard-port 8299 \
    --include-dashboard true --num-cpus 4 --temp-dir "$RAY_TMP" --disable-usage-stats >/dev/null || exit 11
ray job submit --address http://127.0.0.1:8299 --submission-id tlcr-ppo-test --working-dir . \
    -- python -m tlcr_ray.cli ppo --config configs/tiny.yaml "$@"
echo "submit-exit=$?"
ray job status --address http://127.0.0.1:8299 tlcr-ppo-test
"""


def _namespaces_allowed() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _namespaces_allowed(), reason="needs unshare (root) to isolate ray start/stop")
def test_ray_job_submit_ppo_succeeds(tmp_path, tiny_model_dir, head_models):  # noqa: F811
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: AF_UNIX socket paths are <= 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMP": ray_tmp,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    overrides = [f"output_dir={tmp_path / 'run'}", f"ppo.policy={tiny_model_dir}",
                 f"reward.discriminator={head_models['disc']}", "ppo.steps=2", "model.max_response_len=8",
                 "data.max_pairs=16"]
    args = [a for o in overrides for a in ("--set", o)]
    try:
        proc = subprocess.run(["unshare", "-n", "-p", "-f", "--mount-proc", "bash", "-c", SCRIPT, "job", *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert "submit-exit=0" in out, out[-4000:]
    assert "SUCCEEDED" in out, out[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "ppo-continuous" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "run" / "ppo-continuous" / "model" / "config.json").exists()
