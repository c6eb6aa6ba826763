"""The one `ray.init` of every entry point (`tlcr ...`, `ray job submit`, the Serve app, tests, benches): join
the cluster RAY_ADDRESS names, else start a local Ray whose every server listens on 127.0.0.1.

    with stop_on_signals():     # tlcr_ray.local_ray: SIGINT/SIGTERM raise Interrupted here, Ray stops on the way out
        started = ensure_ray()

A Ray layer of its own, beside `actors/` and `serve/` (which both call it and never import each other):
the library `tlcr_ray` stays free of Ray and keeps what this start needs (`tlcr_ray.local_ray`).
"""
from __future__ import annotations

import atexit
import os
import signal
import sys

import ray
from ray._private import ray_constants

from tlcr_ray.layout import REPO_ROOT
from tlcr_ray.local_ray import (LOOPBACK, claim_local_ray, private_token_file, set_process_defaults,
                                shutdown_local_ray, signal_handler, worker_malloc_env)


def ensure_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None,
               num_gpus: int | None = None) -> bool:
    """Join the cluster named by RAY_ADDRESS (returns False), else start a fresh local Ray whose every
    server listens on 127.0.0.1 (returns True: this process owns it and stops it on exit).

    `address="local"`: a bare `ray.init()` would join whatever /tmp/ray/ray_current_cluster names,
    someone else's `ray start`. `num_cpus`, `num_gpus` (None: what Ray detects; a number on a CPU machine
    makes fake GPU resources, as the tests of GPU placement use) and `env_vars` (added to every worker's
    environment) shape a local Ray only: a cluster or Ray job brings its own (deploy/runtime_env.yaml).
    """
    if ray.is_initialized():
        return False
    set_process_defaults()
    if (address := os.environ.get("RAY_ADDRESS")) and address != "local":
        ray.init(address=address, log_to_driver=False)
        return False
    malloc_env = worker_malloc_env()  # a bad TLCR_MALLOC fails here, before anything is started
    private_token_file()
    handler = signal_handler()
    if handler is not None and sys.platform.startswith("linux"):
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
    claim_local_ray()  # before init: a signal during start-up must still clean up what it spawned
    try:
        # Workers import actors/ and serve/ from this checkout even when the package is not installed.
        ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, num_cpus=num_cpus,
                 num_gpus=num_gpus, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), **malloc_env, **(env_vars or {})}})
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if handler is not None:  # ray.init() set SIGTERM to sys.exit and Ray's core worker put its crash
            for s in (signal.SIGINT, signal.SIGTERM):  # handler on top: without ours a SIGTERM aborts the
                signal.signal(s, handler)  # driver before it stops the agents, which then linger
    if (node_ip := ray.util.get_node_ip_address()) != LOOPBACK:  # a Ray upgrade changed the rules
        shutdown_local_ray(reason="refused")
        raise RuntimeError(f"local Ray came up on {node_ip}, not {LOOPBACK}; refusing to run it on the network")
    atexit.register(shutdown_local_ray, reason="exit")  # a normal exit must not leave agents behind either
    return True
