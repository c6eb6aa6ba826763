"""Stochastic rounding of fp32 weights into bfloat16 exports (`<stage>.export_rounding`, `ppo.export_rounding`):
unbiased, one of the two neighbours, deterministic per name, and an export that keeps a small fine-tune's
change where round-to-nearest gives the start back.

    .venv/bin/python -m pytest tests/unit/test_rounding.py -q
"""
from __future__ import annotations

import json

import pytest
import torch

from tlcr_ray.config import ConfigError, load_config
from tlcr_ray.training.rounding import generator_for, round_bucket, stochastic_bf16


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_each_value_becomes_one_of_its_bf16_neighbours_with_the_right_odds(sign):
    x = torch.full((400_000,), sign * (1.0 + 2**-9))  # a quarter of the way from 1 to the next bf16 (1 + 2^-7)
    r = stochastic_bf16(x, generator_for("w", 0))
    assert r.dtype == torch.bfloat16
    assert sorted(abs(v) for v in r.float().unique().tolist()) == [1.0, 1.0 + 2**-7]
    up = (r.float().abs() > 1.0).float().mean().item()
    assert abs(up - 0.25) < 0.005  # rounded away from zero with probability 1/4
    assert abs(r.float().mean().item() - x[0].item()) < 2e-5  # unbiased


def test_bf16_values_infinities_and_nan_pass_unchanged_and_draws_are_seeded_per_name():
    exact = torch.randn(10_000).bfloat16().float()
    assert torch.equal(stochastic_bf16(exact, generator_for("a", 0)).float(), exact)
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    out = stochastic_bf16(special, generator_for("a", 0)).float()
    assert out[0] == float("inf") and out[1] == -float("inf") and torch.isnan(out[2])
    w = torch.randn(10_000)
    a, b = round_bucket({"x": w}, seed=3)["x"], round_bucket({"x": w}, seed=3)["x"]
    assert torch.equal(a, b)  # the same export twice is the same file
    assert not torch.equal(a, round_bucket({"y": w}, seed=3)["y"]) and not torch.equal(a, round_bucket({"x": w}, seed=4)["x"])
    assert round_bucket({"n": torch.arange(3)})["n"].dtype == torch.int64  # only fp32 tensors are rounded
    with pytest.raises(TypeError, match="float32"):
        stochastic_bf16(w.double(), generator_for("x", 0))


def kept_share(exported: torch.Tensor, start: torch.Tensor, trained: torch.Tensor) -> float:
    """<export - start, change> / |change|^2: 1 keeps the change, 0 is the start again."""
    change = trained - start
    return float(((exported.float() - start) * change).sum() / (change * change).sum())


def test_a_change_below_half_a_bf16_step_survives_stochastic_rounding_only():
    g = torch.Generator().manual_seed(0)
    start = (0.03 * torch.randn(1_000_000, generator=g)).bfloat16().float()  # a bf16 SFT export, loaded as fp32
    trained = start + 1e-5 * torch.randn(start.shape, generator=g).sign()  # a few Adam steps at lr ~1e-5
    nearest = kept_share(trained.bfloat16(), start, trained)
    stochastic = kept_share(round_bucket({"w": trained})["w"], start, trained)
    assert nearest < 0.3  # most weights round back to where they started
    assert 0.97 < stochastic < 1.03


def test_an_hf_export_rounds_stochastically_and_says_so(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from tlcr_ray.models import load_policy
    from tlcr_ray.training.gather import state_buckets, tied_names, write_hf_folder

    model = load_policy(tiny_model_dir, dtype="float32")
    buckets = state_buckets(model, zero3=False, rank=0, bucket_bytes=2**16, skip=tied_names(model))
    write_hf_folder(buckets, tmp_path / "out", module=model, rank=0, dtype=torch.bfloat16, rounding="stochastic")
    stored = {k: v for f in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    held = model.state_dict()
    assert stored and all(t.dtype == torch.bfloat16 for t in stored.values())
    for name, t in stored.items():
        w = held[name].float()
        step = (w.abs().clamp_min(1e-30).log2().floor() - 7).exp2()  # a bf16 step at each weight's magnitude
        assert ((t.float() - w).abs() <= step + 1e-12).all(), name  # one neighbour or the other, never further
    info = json.loads((tmp_path / "out" / "tlcr_export.json").read_text())
    assert info["rounding"] == "stochastic" and info["dtype"] == "bfloat16"
    reloaded = load_policy(str(tmp_path / "out"), dtype="float32")
    assert all(torch.equal(reloaded.state_dict()[k], v.float()) for k, v in stored.items())


def test_stochastic_rounding_needs_a_bfloat16_export():
    with pytest.raises(ConfigError, match=r"ppo\.export_rounding=stochastic .* ppo\.export_dtype=bfloat16"):
        load_config(None, ["ppo.export_rounding=stochastic"])
    cfg = load_config(None, ["sft.export_rounding=stochastic", "sft.export_dtype=bf16"])
    assert cfg.sft.export_rounding == "stochastic" and cfg.sft.export_dtype == "bfloat16"
