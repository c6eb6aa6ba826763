"""Process set-up shared by every entry point (`tlcr ...`, `ray job submit`, the Serve app, tests).

    set_process_defaults()      # environment every stage and Ray worker should inherit
    started = ensure_ray()      # join RAY_ADDRESS's cluster, else start a private local Ray

This is the only place that calls `ray.init`. Ray is imported inside the functions, so the library
stays importable without Ray; only the Ray layers (`actors/`, `serve/`) and the CLI call these.
"""
from __future__ import annotations

import os
import sys

from tlcr_ray.layout import REPO_ROOT


def set_process_defaults() -> None:
    """Environment defaults, set before Ray starts so that every worker inherits them."""
    # DeepSpeed JIT-compiles its CPU shared-memory comm op on first use (~60 s). Keeping the build next
    # to the interpreter (the venv, where `make` pre-builds it) means every process of every stage and
    # every Ray worker finds it compiled, instead of racing to build it into ~/.cache under a file lock.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def ensure_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None) -> bool:
    """Join the cluster named by RAY_ADDRESS (e.g. under `ray job submit`), else start a fresh local Ray
    on 127.0.0.1. Returns True when this call started Ray (the caller owns its shutdown).

    `num_cpus` and `env_vars` (added to every worker's environment) apply to a local start only.

    `address="local"` because a bare `ray.init()` joins whatever /tmp/ray/ray_current_cluster names:
    never someone else's `ray start` on this machine.
    """
    import ray

    if ray.is_initialized():
        return False
    set_process_defaults()
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=False)
        return False
    # Workers import actors/ and serve/ from this checkout even when the package is not installed.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), **(env_vars or {})}})
    return True
