"""Process set-up shared by every entry point (`tlcr ...`, `ray job submit`, the Serve app, tests):
the one `ray.init`, a local Ray that stays on loopback, and a clean stop on SIGINT/SIGTERM.

    with stop_on_signals():     # main thread: SIGINT/SIGTERM raise Interrupted (a KeyboardInterrupt) here
        started = ensure_ray()  # RAY_ADDRESS set: join that cluster; else a fresh local Ray on 127.0.0.1

Ray is imported inside the functions, so the library stays importable without Ray; only the Ray
layers (`actors/`, `serve/`) and the CLI call these. README "Security notes" says what listens where.
"""
from __future__ import annotations

import atexit
import os
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tlcr_ray import process_tree
from tlcr_ray.layout import REPO_ROOT

LOOPBACK = "127.0.0.1"
_started = False  # a Ray that ensure_ray() started is up: only then are its processes ours to stop
_lock = threading.Lock()  # one orderly shutdown at a time (main thread, atexit)
_handler: Callable | None = None  # stop_on_signals()'s handler while active: ray.init() replaces it


def set_process_defaults() -> None:
    """Environment defaults, set before Ray starts so that every worker inherits them."""
    # DeepSpeed JIT-compiles its CPU shared-memory comm op on first use (~60 s). Keeping the build next
    # to the interpreter (the venv, where `make` pre-builds it) means every process of every stage and
    # every Ray worker finds it compiled, instead of racing to build it into ~/.cache under a file lock.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


RETAIN_HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
"""glibc malloc for the workers of a local Ray under TLCR_MALLOC=retain: every block from the heap (never
its own mmap) and the heap never trimmed, so a freed block is reused by a later allocation, its pages
faulted in once. (Opt-in while its memory cost is being measured on every stage.)

Why: glibc serves any block over its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on
free, so a tensor that size allocated and freed on every step (the [rows, R, vocab] logits and their
log-softmax, the tied embedding's gradient) faults every page in again each time, and page faults are dear
in a VM. Measured on this project's 2-core VM, SmolLM2-135M, `PPOLearner.train_in_one_pass` of 8 x 128
tokens in a Ray actor (2 threads): 400-600k minor faults and 7.4-10.8 s per update with glibc's defaults,
~0 faults and 5.6-6.7 s from the fourth update on with these. The price: RSS stays at the high-water mark,
and that mark rose (5.1 vs 4.6 GiB for that learner; a bare loop of 200 MB blocks grew the heap to 7x the
block before it reused them)."""


def worker_malloc_env() -> dict[str, str]:
    """The malloc settings a local Ray's workers start with, by TLCR_MALLOC: system (the default: glibc's
    own) -> {}; retain -> RETAIN_HEAP_ENV, unless this environment sets MALLOC_* / GLIBC_TUNABLES itself
    (the workers inherit those as they are), and not off glibc (the variables mean nothing elsewhere)."""
    import platform

    choice = os.environ.get("TLCR_MALLOC", "system")
    if choice not in ("retain", "system"):
        raise ValueError(f"TLCR_MALLOC={choice!r}: expected system (the default) or retain")
    if choice == "system" or platform.libc_ver()[0] != "glibc":
        return {}
    if "GLIBC_TUNABLES" in os.environ or any(name.startswith("MALLOC_") for name in os.environ):
        return {}
    return dict(RETAIN_HEAP_ENV)


def ensure_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None,
               num_gpus: int | None = None) -> bool:
    """Join the cluster named by RAY_ADDRESS (returns False), else start a fresh local Ray whose every
    server listens on 127.0.0.1 (returns True: this process owns it and stops it on exit).

    `address="local"`: a bare `ray.init()` would join whatever /tmp/ray/ray_current_cluster names,
    someone else's `ray start`. `num_cpus`, `num_gpus` (None: what Ray detects; a number on a CPU machine
    makes fake GPU resources, as the tests of GPU placement use) and `env_vars` (added to every worker's
    environment) shape a local Ray only: a cluster or Ray job brings its own (deploy/runtime_env.yaml).
    """
    global _started
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    set_process_defaults()
    if (address := os.environ.get("RAY_ADDRESS")) and address != "local":
        ray.init(address=address, log_to_driver=False)
        return False
    malloc_env = worker_malloc_env()  # a bad TLCR_MALLOC fails here, before anything is started
    _private_token_file()
    if _handler is not None and sys.platform.startswith("linux"):
        # A CLI run (inside stop_on_signals): orphans of a dying raylet re-parent to us, not to init,
        # so the shutdown still finds them. Not for library callers such as a test session.
        import ctypes

        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    # `_node_ip_address="127.0.0.1"` alone is not enough in Ray 2.60: ray.init passes it through
    # services.resolve_ip_for_localhost(), which swaps loopback for the machine's address while
    # ray_constants.ENABLE_RAY_CLUSTER is on (the Linux default), and every Ray server binds loopback
    # or all interfaces by that node IP. So the switch is off for this one call, and the outcome is
    # checked below rather than trusted (the flag is private).
    saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    _started = True  # before init: a signal during start-up must still clean up what it spawned
    try:
        # Workers import actors/ and serve/ from this checkout even when the package is not installed.
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, num_cpus=num_cpus,
                 num_gpus=num_gpus, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), **malloc_env, **(env_vars or {})}})
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if _handler is not None:  # ray.init() set SIGTERM to sys.exit and Ray's core worker put its crash
            for s in (signal.SIGINT, signal.SIGTERM):  # handler on top: without ours a SIGTERM aborts the
                signal.signal(s, _handler)  # driver before it stops the agents, which then linger
    if (node_ip := ray.util.get_node_ip_address()) != LOOPBACK:  # a Ray upgrade changed the rules
        shutdown_local_ray(reason="refused")
        raise RuntimeError(f"local Ray came up on {node_ip}, not {LOOPBACK}; refusing to run it on the network")
    atexit.register(shutdown_local_ray, reason="exit")  # a normal exit must not leave agents behind either
    return True


def pin_serve_grpc_to_loopback() -> None:
    """Call first thing in a Serve deployment's `__init__` (Serve starts the replica's gRPC server after it).

    Ray Serve 2.60 binds each replica's inter-deployment gRPC server to "[::]:0" whatever the node IP
    (ray/serve/_private/replica.py). On a loopback-only Ray, bind it to 127.0.0.1; elsewhere leave it.
    """
    replica = sys.modules.get("ray.serve._private.replica")  # present only inside a replica process
    if replica is None or getattr(replica.add_port_to_grpc_server, "tlcr_loopback", False):
        return
    import ray

    if not ray.is_initialized() or ray.util.get_node_ip_address() != LOOPBACK:
        return
    original = replica.add_port_to_grpc_server

    def add_port(server, address: str) -> int:
        return original(server, f"{LOOPBACK}:0" if address == "[::]:0" else address)

    add_port.tlcr_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port


def _private_token_file() -> None:
    """Make the token file a local Ray reads owner-only: Ray writes it with open(path, "w"), 0644 under umask 022."""
    mode = os.environ.get("RAY_AUTH_MODE")  # unset: Ray 2.60 turns token auth on for a new local cluster
    if (mode is not None and mode.lower() != "token") or os.environ.get("RAY_AUTH_TOKEN"):
        return  # auth off, or the token lives in the environment: no file involved
    explicit = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(explicit) if explicit else Path.home() / ".ray" / "auth_token"
    if not explicit and not path.exists():  # create it ourselves: never world-readable, not even briefly
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_hex(32))  # what Ray's own generator makes
        except FileExistsError:
            pass  # another process won the race: tighten theirs below
    try:
        if (st := path.stat()).st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass  # a missing RAY_AUTH_TOKEN_PATH: Ray reports that itself


def shutdown_local_ray(timeout: float = 10.0, reason: str = "") -> None:
    """ray.shutdown(); if ensure_ray() started Ray, make sure each of its processes is gone within ~timeout s."""
    global _started
    if (ray := sys.modules.get("ray")) is None:
        return  # Ray never loaded (`tlcr label`): nothing to stop, and no reason to import it now
    with _lock:
        began = time.monotonic()
        procs = process_tree.descendants(os.getpid()) if _started else {}  # before the raylet dies
        stopper = threading.Thread(target=ray.shutdown, daemon=True)  # a wedged GCS can hang it
        stopper.start()
        stopper.join(timeout / 2)
        if not _started:
            return
        _started = False
        procs.update(process_tree.descendants(os.getpid()))
        for sig, wait in ((0, began + timeout / 2 - time.monotonic()), (signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0)):
            if sig:
                process_tree.kill(procs, sig)
            end = time.monotonic() + max(wait, 0.0)
            while time.monotonic() < end and any(process_tree.alive(p, s) for p, (s, _) in procs.items()):
                process_tree.reap()
                time.sleep(0.1)
        left = [pid for pid, (start, _) in procs.items() if process_tree.alive(pid, start)]
        names = ", ".join(n if c == 1 else f"{n} x{c}" for n, c in Counter(n for _, n in procs.values()).items())
        print(f"tlcr: stopped local Ray{f' ({reason})' if reason else ''}: {len(procs) - len(left)} of {len(procs)} "
              f"processes gone in {time.monotonic() - began:.1f}s [{names}]" + (f"; STILL ALIVE: {left}" if left else ""),
              file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    """What SIGINT/SIGTERM raise in the main thread inside stop_on_signals(); `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals(grace: float = 30.0) -> Iterator[None]:
    """SIGINT/SIGTERM raise Interrupted in the body, so its handlers and `finally`s run (e.g.
    serve.shutdown()); on the way out Ray stops. A second signal, one during that shutdown, or a
    shutdown unfinished `grace` s after the first signal SIGKILLs the whole tree and exits 128+signal.
    """
    global _handler
    got: list[int] = []
    done, stopping = threading.Event(), threading.Event()

    def hard_stop(signum: int, why: str) -> None:
        procs = process_tree.descendants(os.getpid())
        process_tree.kill(procs, signal.SIGKILL)  # no lock, no Ray call: either may be what is stuck
        print(f"tlcr: {signal.Signals(signum).name} ({why}): killed {len(procs)} processes", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def watchdog(signum: int) -> None:
        if not done.wait(grace):
            hard_stop(signum, f"still stopping after {grace:.0f}s")

    def handler(signum: int, frame: object) -> None:
        if got or stopping.is_set():  # never raise into the shutdown itself
            hard_stop(signum, "second signal" if got else "signal during shutdown")
        got.append(signum)
        threading.Thread(target=watchdog, args=(signum,), daemon=True).start()
        raise Interrupted(signum)

    previous, _handler = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}, handler
    try:
        yield
    except KeyboardInterrupt as exc:
        if got and not isinstance(exc, Interrupted):  # ray.get() re-raises a bare one: keep the signal
            raise Interrupted(got[0]) from exc
        raise
    finally:
        stopping.set()
        shutdown_local_ray(reason=signal.Signals(got[0]).name if got else "")
        done.set()
        _handler = None
        for s, h in previous.items():
            signal.signal(s, h)
