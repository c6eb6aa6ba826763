"""Shared fixtures: the tiny random-init model (built once per session) and a local Ray on 127.0.0.1."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """The SmolLM2 tokenizer as an HF folder (converted once from the embedded GGUF, then cached)."""
    from tlcr_ray.models import embedded_tokenizer_dir

    return str(embedded_tokenizer_dir())


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from tlcr_ray.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A tiny random-init Llama (hidden 64, 2 layers) with the SmolLM2 tokenizer, saved as an HF folder."""
    from tlcr_ray.models import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    return str(build_tiny_llama(path, tokenizer_dir, seed=0))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, listening on 127.0.0.1 only (no dashboard)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # address="local": never join a cluster someone left running on this machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"],
                                           "PYTHONPATH": str(REPO)}},
                 log_to_driver=False)
    yield ray
    ray.shutdown()
