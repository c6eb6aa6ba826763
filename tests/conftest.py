"""Shared fixtures: the tiny random-init model and its head models (built once per session), the tiny
PPO config, and a local Ray on 127.0.0.1.

    tests/unit/         the pure library: seconds, no Ray (`make test-fast`)
    tests/integration/  local Ray, Serve, DeepSpeed, vLLM, PPO runs, the pipeline
    tests/cluster/      root + network namespaces: job submit, node loss, autoscaling
"""
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
    from tlcr_ray.testing.tiny_model import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    return str(build_tiny_llama(path, tokenizer_dir, seed=0))


@pytest.fixture(scope="session")
def head_models(tmp_path_factory, tiny_model_dir, tokenizer):
    """A tiny token discriminator and a tiny sequence RM over the tiny backbone."""
    import torch

    from tlcr_ray.models import SequenceRewardModel, TokenDiscriminator, save_head_model

    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    disc = save_head_model(TokenDiscriminator.from_pretrained(tiny_model_dir, seed=1), root / "disc", tokenizer)
    rm = save_head_model(SequenceRewardModel.from_pretrained(tiny_model_dir, seed=2), root / "rm", tokenizer)
    return {"disc": str(disc), "rm": str(rm)}


@pytest.fixture(scope="session")
def spread_disc_dir(tiny_model_dir, tokenizer, tmp_path_factory) -> str:
    """A tiny discriminator with its head scaled up so p spreads over (0, 1) (the API and scoring tests)."""
    import torch

    from tlcr_ray.models import TokenDiscriminator, save_head_model

    model = TokenDiscriminator.from_pretrained(tiny_model_dir, seed=0)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.weight, std=2.0)
    return str(save_head_model(model, tmp_path_factory.mktemp("spread-disc") / "model", tokenizer=tokenizer))


@pytest.fixture(scope="session")
def spread_disc(spread_disc_dir):
    """`spread_disc_dir` loaded, in eval mode (the library side the API is compared with)."""
    from tlcr_ray.models import load_head_model

    return load_head_model(spread_disc_dir).eval()


def _tiny_ppo_config(out_dir, tiny_model_dir, head_models, mode, *extra):
    from tlcr_ray.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [
        f"output_dir={out_dir}", f"ppo.policy={tiny_model_dir}", f"reward.mode={mode}",
        f"reward.discriminator={head_models['disc']}", f"reward.reward_model={head_models['rm']}",
        "model.max_response_len=12", "data.max_pairs=16", *extra])


@pytest.fixture(scope="session")
def tiny_ppo_config():
    """`tiny_ppo_config(out_dir, tiny_model_dir, head_models, mode, *overrides)` -> a Config for a short
    PPO run on configs/tiny.yaml with the tiny policy and head models."""
    return _tiny_ppo_config


NEG, POS = 1000, 2000  # the planted rule: NEG is always a bad token, POS always a good one, the rest neutral


def _planted_rows(n: int, seed: int, neg: int = NEG, pos: int = POS) -> list:
    import random

    from tlcr_ray.labeling.labels import LabeledSequence

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ids = [rng.randrange(3000, 3100) for _ in range(4)]
        labels = [-100.0] * 4
        for _ in range(12):
            r = rng.random()
            token = neg if r < 0.15 else pos if r < 0.3 else rng.randrange(3000, 3100)
            ids.append(token)
            labels.append(0.0 if token == neg else 1.0 if token == pos else 0.5)
        rows.append(LabeledSequence(f"p{seed}-{i}", "rejected", ids, labels))
    return rows


@pytest.fixture(scope="session")
def planted_rows():
    """`planted_rows(n, seed, neg=1000, pos=2000)` -> labelled sequences that follow a planted token rule
    (4 prompt tokens, 12 response tokens: `neg` labelled 0, `pos` labelled 1, the rest 0.5)."""
    return _planted_rows


@pytest.fixture(scope="session")
def learner_rdzv(tmp_path_factory):
    """init_method of the ONE single-rank process group that every in-process `PPOLearner` of the session
    joins (the first one creates it; DeepSpeed keeps the group, so it is destroyed only at the end)."""
    import torch

    yield f"file://{tmp_path_factory.mktemp('learner-rdzv') / 'file'}"
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, started as every entry point starts it (127.0.0.1, no dashboard)."""
    ray = pytest.importorskip("ray")
    from ray_init import ensure_ray

    ensure_ray(num_cpus=4, env_vars={"RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]})
    yield ray
    ray.shutdown()
