"""Process set-up shared by every entry point (`tlcr ...`, `ray job submit`, the Serve app, tests):
what a local Ray starts with (loopback, worker environment, an owner-only token file) and a clean stop
on SIGINT/SIGTERM; the one `ray.init` that uses them is the Ray layer's `ray_init.ensure_ray`.

    with stop_on_signals():     # main thread: SIGINT/SIGTERM raise Interrupted (a KeyboardInterrupt) here
        started = ensure_ray()  # (ray_init) RAY_ADDRESS set: join that cluster; else a local Ray on 127.0.0.1

Nothing here imports Ray: `shutdown_local_ray` stops one only if the process has loaded it. README
"Security notes" says what listens where.
"""
from __future__ import annotations

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

LOOPBACK = "127.0.0.1"
_started = False  # a Ray that ray_init.ensure_ray() started is up: only then are its processes ours to stop
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


def claim_local_ray() -> None:
    """`ray_init.ensure_ray`, just before it starts a local Ray: its processes are now ours to stop
    (`shutdown_local_ray`), even if a signal comes during the start-up."""
    global _started
    _started = True


def signal_handler() -> Callable | None:
    """`stop_on_signals()`'s handler while one is active (a CLI run), else None."""
    return _handler


def private_token_file() -> None:
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
