"""How every no-grad scoring forward runs: in micro-batches of rows, and a model that can wait off the GPU.

    p = micro_batched(lambda rows: disc(ids[rows], mask[rows]), len(ids), size=8)   # [B, T], 8 rows at a time
    with resident(reference, device, offload=True):                                 # on device for the block,
        logp = ...                                                                  # in host RAM afterwards

The one home of forward micro-batching (reference, reward scorer, learner evaluate/score, the text
scoring behind the HTTP API): peak activation memory is that of `size` rows whatever the batch. The
callers' forwards pass `use_cache=False` (`rl.batch.response_logits_of`, `heads._HeadModel`): a
scoring pass has no next token, and HF's default cache keeps every layer's K/V for nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch


def row_slices(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most `size` rows covering range(n) (None: one slice)."""
    size = n if not size else size
    return [slice(start, min(n, start + size)) for start in range(0, n, max(1, size))]


def micro_batched(forward: Callable[[slice], torch.Tensor | dict], n: int, size: int | None):
    """`forward(rows)` on each slice of `row_slices(n, size)`, the results concatenated along dim 0.

    `forward` returns a tensor [rows, ...] or a dict of them (concatenated key by key; None values stay
    None). The slices' outputs must agree in every dim but the first (pack the whole batch first, so
    P and R are the batch's)."""
    parts = [forward(rows) for rows in row_slices(n, size)]
    if not parts:
        raise ValueError("micro_batched: no rows")
    if isinstance(parts[0], dict):
        return {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


@contextmanager
def resident(model: torch.nn.Module, device: torch.device | str, offload: bool):
    """`model` on `device` inside the block. With `offload` it goes back to host RAM afterwards (and the
    CUDA cache is released), so a frozen model takes GPU memory only while it computes (ppo.offload_*).
    On a CPU device both moves are no-ops."""
    if offload:
        model.to(device)
    try:
        yield model
    finally:
        if offload:
            model.to("cpu")
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
