"""A local `tlcr` command keeps Ray to itself: nothing `tlcr serve` or a short `tlcr ppo` starts listens
beyond loopback, the auth token a local run creates is owner-only, and SIGTERM stops the whole tree.

Each command runs in its own session, so "every process the command started" is "every process in that
session" (found through /proc, even after the driver's children re-parent). Auth is Ray's default for a
local CLI run (RAY_AUTH_MODE unset -> token), with a throw-away HOME so the real ~/.ray is untouched.
Works in a loopback-only network namespace too: a wildcard bind shows as 0.0.0.0 / :: there as well.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tlcr_ray import process_tree
from tlcr_ray.rl.rendezvous import free_port

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
STARTUP_S, STOP_S = 240, 45  # stop: serve.shutdown + ray.shutdown + the kill fallback in local_ray


def _loopback_works() -> bool:
    with socket.socket() as srv:
        try:
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            socket.create_connection(srv.getsockname(), timeout=2).close()
            return True
        except OSError:
            return False


def session_pids(sid: int) -> dict[int, str]:
    """Live (non-zombie) processes of session `sid`: pid -> name."""
    return {pid: name for pid, (_, name) in process_tree.in_session(sid).items()}


def _listen_inodes() -> dict[str, tuple[str, int]]:
    """socket inode -> (address, port) of every TCP socket in LISTEN state in this network namespace."""
    out = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A":  # TCP_LISTEN
                continue
            hexaddr, hexport = cols[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(raw) if width == 4 else ipaddress.IPv6Address(raw)
            out[cols[9]] = (str(addr), int(hexport, 16))
    return out


def listening(pids: dict[int, str]) -> list[tuple[str, int, str, int]]:
    """(argv0, pid, address, port) for each listening TCP socket held by one of `pids`."""
    table, rows = _listen_inodes(), []
    for pid, name in pids.items():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in table:
                rows.append((name, pid, *table[target[8:-1]]))
    return sorted(set(rows))


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback  # 0.0.0.0 / :: (wildcards) and every real interface fail


@pytest.fixture(scope="module")
def served(tmp_path_factory, head_models):
    if not _loopback_works():
        pytest.skip("loopback is down (unshare -n without `ip link set lo up`?)")
    tmp = tmp_path_factory.mktemp("loopback")
    checkpoint, port, env, home = head_models["disc"], free_port("127.0.0.1"), *_cli_env(tmp)
    with open(tmp / "serve.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tlcr_ray.cli", "serve", "--checkpoint", checkpoint,
                                 "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own session: the whole tree is findable by sid
        try:
            _wait_healthy(proc, f"http://127.0.0.1:{port}", log)
            yield proc, home, log, f"http://127.0.0.1:{port}"
        finally:  # whatever the assertions said, leave nothing running
            process_tree.kill(process_tree.in_session(proc.pid), signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_healthy(proc: subprocess.Popen, url: str, log) -> None:
    began = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"tlcr serve exited {proc.returncode} before /healthz:\n{_tail(log)}")
        try:
            if requests.get(f"{url}/healthz", timeout=2).ok:
                return
        except requests.RequestException:  # not up yet (refused, or the proxy still starting)
            pass
        if time.monotonic() - began > STARTUP_S:
            pytest.fail(f"no /healthz after {STARTUP_S}s:\n{_tail(log)}")
        time.sleep(1)


def _tail(log, n: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-n:]


def test_everything_it_starts_listens_on_loopback_only(served):
    proc, home, _, url = served
    # a real scoring call: TokenRewardAPI -> Scorer goes over the replicas' gRPC servers, so those are up
    # (and still reachable once pinned to loopback); the agents' late ports are bound by then too
    reply = requests.post(f"{url}/v1/token-rewards", json={"items": [{"prompt": "hi", "response": " Hello!"}]},
                          timeout=120)
    assert reply.status_code == 200, reply.text
    time.sleep(2)
    pids = session_pids(proc.pid)
    rows = listening(pids)
    assert len(pids) >= 5 and len(rows) >= 5, f"the walk found too little: {pids} {rows}"  # gcs, raylet, ...
    exposed = [r for r in rows if not is_loopback(r[2])]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(f"  {n} (pid {p}) {a}:{port}"
                                                                   for n, p, a, port in exposed)
    token = home / ".ray" / "auth_token"
    if token.exists():  # Ray's default local mode is token auth: its secret must be private
        assert stat.S_IMODE(token.stat().st_mode) == 0o600, oct(token.stat().st_mode)


def test_sigterm_stops_the_whole_tree_and_says_so(served):
    proc, _, log, _ = served
    assert len(session_pids(proc.pid)) >= 5
    began = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tlcr serve still running {STOP_S}s after SIGTERM:\n{_tail(log)}")
    while (left := session_pids(proc.pid)) and time.monotonic() - began < STOP_S:
        time.sleep(0.5)
    assert not left, f"still alive {STOP_S}s after SIGTERM: {left}\n{_tail(log)}"
    assert proc.returncode != -signal.SIGKILL, "it had to be SIGKILLed"
    assert "stopped local Ray" in _tail(log, 20000), _tail(log)


def _cli_env(tmp: Path) -> tuple[dict, Path]:
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env, home


@pytest.mark.slow
def test_a_local_ppo_run_listens_on_loopback_only_and_leaves_nothing(tmp_path, tiny_model_dir, head_models):
    if not _loopback_works():
        pytest.skip("loopback is down (unshare -n without `ip link set lo up`?)")
    env, home = _cli_env(tmp_path)
    overrides = [f"output_dir={tmp_path / 'run'}", f"ppo.policy={tiny_model_dir}",
                 f"reward.discriminator={head_models['disc']}", "ppo.steps=2", "ppo.checkpoint_every=2",
                 "model.max_response_len=8", "data.max_pairs=16", "ppo.learner.num_actors=1"]
    cmd = [sys.executable, "-m", "tlcr_ray.cli", "ppo", "--config", "configs/tiny.yaml",
           *[a for o in overrides for a in ("--set", o)]]
    seen: set[tuple[str, int, str, int]] = set()
    with open(tmp_path / "ppo.log", "w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:  # sample the sockets of the whole tree while the run goes on
                seen.update(listening(session_pids(proc.pid)))
                time.sleep(0.5)
        finally:
            process_tree.kill(process_tree.in_session(proc.pid), signal.SIGKILL)
        assert proc.returncode == 0, _tail(log)
        left = session_pids(proc.pid)
        assert not left, f"left running after tlcr ppo exited: {left}"
        assert "stopped local Ray" in _tail(log, 20000)
    assert len(seen) >= 4, f"the walk found too little: {seen}"  # gcs, raylet, workers, agents
    exposed = sorted(r for r in seen if not is_loopback(r[2]))
    assert not exposed, "listening beyond loopback:\n" + "\n".join(f"  {n} (pid {p}) {a}:{port}"
                                                                    for n, p, a, port in exposed)
    token = home / ".ray" / "auth_token"
    assert token.exists() and stat.S_IMODE(token.stat().st_mode) == 0o600
