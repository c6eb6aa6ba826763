"""Streamed ZeRO-3 gather (docs: tlcr_ray/training/gather.py): 2 real DeepSpeed ranks on CPU export a
policy bucket by bucket; the folder reloads with exactly the engine's weights, an HF rollout engine fed
the same buckets holds them too, rank 0 never held more than one bucket + the largest parameter gathered
(the other rank nothing) (the whole-model export, measured the same way, holds all of it).

    .venv/bin/python -m pytest tests/integration/test_streamed_gather.py -q
"""
from __future__ import annotations

import pytest
import torch

BUCKET_MIB = 0.1


@pytest.fixture(scope="module")
def deeper_tiny_model(tmp_path_factory, tokenizer_dir) -> str:
    """8 layers, so the layers (not only the 12 MB embedding) are a real share of the model."""
    from tlcr_ray.testing.tiny_model import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny8") / "model", tokenizer_dir, seed=3, layers=8))


def test_zero3_export_streams_bounded_buckets_and_reloads_identically(tmp_path, deeper_tiny_model):
    from tlcr_ray.models import load_policy
    from tlcr_ray.testing.gather_ranks import launch

    ranks = launch(deeper_tiny_model, tmp_path / "streamed", "streamed", BUCKET_MIB, world=2)
    bound = int(BUCKET_MIB * 2**20) + ranks[0]["largest_param_bytes"]
    assert 0 < ranks[0]["max_gathered_bytes"] <= bound, ranks[0]
    assert ranks[0]["max_gathered_bytes"] < ranks[0]["model_bytes"], ranks[0]
    # On gloo the pieces go to rank 0 alone: the other rank never holds a gathered parameter.
    assert ranks[1]["max_gathered_bytes"] == 0, ranks[1]
    assert ranks[0]["rollout_matches"] is True

    folder = tmp_path / "streamed" / "export"
    assert (folder / "model.safetensors.index.json").exists()  # several shards: one per bucket
    reference = torch.load(tmp_path / "streamed" / "reference.pt")
    reloaded = load_policy(str(folder)).state_dict()
    assert set(reloaded) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(reloaded[name], tensor), name
    # The learner was never stepped: the reference must also equal the folder it started from (so it
    # is the model's weights, not something the export and the reference got wrong together).
    initial = load_policy(deeper_tiny_model).state_dict()
    assert all(torch.equal(initial[k], v) for k, v in reference.items())


def test_whole_model_export_holds_everything_at_once(tmp_path, deeper_tiny_model):
    """The measurement the bound above is compared with: the pre-streaming export gathers every
    parameter together on every rank."""
    from tlcr_ray.testing.gather_ranks import launch

    ranks = launch(deeper_tiny_model, tmp_path / "whole", "whole", BUCKET_MIB, world=2)
    for r in ranks:
        assert r["max_gathered_bytes"] == r["model_bytes"], r
        assert r["max_gathered_bytes"] > int(BUCKET_MIB * 2**20) + r["largest_param_bytes"]


def test_zero3_shared_critic_on_two_ranks_exports_the_policy_alone_and_checkpoints_the_head(tmp_path, tiny_model_dir):
    """ppo.critic shared under ZeRO-3 on 2 ranks: after one update the streamed export (and the rollout
    engine fed the same buckets) holds exactly the trained policy, no head; a fresh learner loading the
    checkpoint gives every rank the same values and log-probs (the head came back, not its zero init)."""
    from tlcr_ray.models import load_policy
    from tlcr_ray.testing.gather_ranks import launch

    ranks = launch(tiny_model_dir, tmp_path / "shared", "shared", BUCKET_MIB, world=2)
    assert all(r["checkpoint_restored"] is True for r in ranks), ranks
    assert ranks[0]["rollout_matches"] is True
    assert 0 < ranks[0]["max_gathered_bytes"] <= int(BUCKET_MIB * 2**20) + ranks[0]["largest_param_bytes"]
    reference = torch.load(tmp_path / "shared" / "reference.pt")
    initial = load_policy(tiny_model_dir).state_dict()
    reloaded = load_policy(str(tmp_path / "shared" / "export")).state_dict()
    assert set(reference) == set(reloaded) == set(initial)
    assert all(torch.equal(reloaded[k], v) for k, v in reference.items())
    assert any(not torch.equal(initial[k], v) for k, v in reference.items())  # the update moved the policy
