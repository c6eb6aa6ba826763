"""Stochastic rounding of fp32 weights to bfloat16, for exports of policies whose update is finer than bf16.

    bf16 = stochastic_bf16(weight, generator)        # E[bf16] == weight; each value is one of its two neighbours
    bucket = round_bucket(bucket, seed=0)            # {name: fp32} -> {name: bf16}, seeded per name

A policy fine-tuned from a bf16 start S by a few small steps changes each weight by less than half a
bf16 step: round-to-nearest gives S back (configs/demo.yaml's PPO policies kept 2-4% of their change,
`bench/bench_export_dtype.py`). Rounded stochastically, a weight moves to the upper neighbour with
probability (w - lower) / (upper - lower), so the export keeps the change in expectation and adds
zero-mean noise of at most one bf16 step, the same size as the error any bf16 export already carries.
Deterministic: each tensor's draws come from a generator seeded by (seed, its name), whatever the bucketing.
"""
from __future__ import annotations

import zlib

import torch


def stochastic_bf16(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 [any shape] -> bf16 [same], rounded away from zero with probability equal to the dropped
    fraction of a bf16 step. bf16 is fp32's top 16 bits: adding a uniform 16-bit integer to the bit pattern
    and truncating the low half does exactly that, for either sign (the sign bit sits above the carry)."""
    if weight.dtype != torch.float32:
        raise TypeError(f"stochastic rounding to bfloat16 starts from float32, got {weight.dtype}")
    weight = weight.detach().cpu().contiguous()
    noise = torch.randint(0, 1 << 16, weight.shape, generator=generator, dtype=torch.int32)
    # -65536 is 0xFFFF0000: keep the top 16 bits. A carry into the exponent is the next bf16 value up.
    rounded = ((weight.view(torch.int32) + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(weight), rounded, weight).to(torch.bfloat16)  # exact: low bits are 0


def generator_for(name: str, seed: int) -> torch.Generator:
    # One 32-bit value of both: the CPU generator (mt19937) keeps only a seed's low 32 bits.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def round_bucket(bucket: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every fp32 tensor of `bucket` stochastically rounded to bf16 (others unchanged), on the CPU."""
    return {name: stochastic_bf16(t, generator_for(name, seed)) if t.dtype == torch.float32 else t
            for name, t in bucket.items()}
