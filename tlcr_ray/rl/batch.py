"""The batch layout every PPO actor shares, and the log-prob math on it.

    packed = pack(batch.prompt_ids, batch.response_ids, pad_id=0)
    logp = token_logprobs(response_logits_of(model, packed, device), packed.response_ids)   # [batch, R]

Packing layout (reward, reference and learner forwards): prompts LEFT-padded to P, responses
RIGHT-padded to R, so response token j of every row sits at column P + j. The log-prob of that token
is read from the logits at column P + j - 1; the discriminator's p for it at P + j
(docs/algorithm.md §6). Every forward passes position ids counted from the attention mask, so the
left padding does not move the positions of models with absolute position embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tlcr_ray.models.loading import position_ids


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    """Sampling log-prob of each response token under the engine's weights (logits / temperature)."""
    finish_reasons: list[str]
    """"stop" (EOS sampled, EOS kept as the last response token) or "length"."""


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    """[batch, P + R]: left-padded prompts then right-padded responses."""
    attention_mask: torch.Tensor
    """[batch, P + R]: 1 on real tokens."""
    response_ids: torch.Tensor
    """[batch, R]: response tokens (pad id after the end)."""
    response_mask: torch.Tensor
    """[batch, R]: 1.0 on response tokens (the actions), 0.0 on padding."""
    prompt_len: int
    """P: response token j is at column P + j."""


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> PackedBatch:
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"pack: {len(prompt_ids)} prompts but {len(response_ids)} responses")
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(r) for r in response_ids))
    B = len(prompt_ids)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R))
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(prompt):P] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, P:P + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, P - len(prompt):P + len(response)] = 1
        response_mask[i, :len(response)] = 1.0
    return PackedBatch(input_ids, attention_mask, input_ids[:, P:].clone(), response_mask, P)


def select_rows(packed: PackedBatch, rows) -> PackedBatch:
    """The given rows (None: all) of a packed batch; P and R stay those of the whole batch."""
    if rows is None:
        return packed
    rows = list(rows)
    return PackedBatch(packed.input_ids[rows], packed.attention_mask[rows], packed.response_ids[rows],
                       packed.response_mask[rows], packed.prompt_len)


def response_logits(logits: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """[batch, P + R, vocab] causal-LM logits -> [batch, R, vocab] predicting each response token."""
    P, R = packed.prompt_len, packed.response_ids.shape[1]
    return logits[:, P - 1:P + R - 1]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[..., vocab] logits, [...] ids -> [...] log-probs of the ids (float32), e.g. [batch, R, vocab] -> [batch, R]."""
    logp = F.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def response_logits_of(model, packed: PackedBatch, device: torch.device) -> torch.Tensor:
    """[rows, R, vocab] causal-LM logits predicting each response token (the columns P - 1 .. P + R - 2
    of `response_logits`). The LM head runs on those positions only: over a 49k
    vocabulary it costs more than the rest of a small model's forward."""
    return response_outputs_of(model, packed, device).logits


def response_outputs_of(model, packed: PackedBatch, device: torch.device):
    """The model's whole output at the response-predicting positions (`response_logits_of`): `.logits`
    [rows, R, vocab]; a `models.shared_critic.PolicyWithValueHead` also `.value` [rows, R], the value
    of the state before each response token, from the same forward."""
    P, R = packed.prompt_len, packed.response_ids.shape[1]
    # Exact positions rather than the last R + 1 then a slice, whose backward would fill a zero tensor.
    positions = torch.arange(P - 1, P + R - 1, device=device)
    mask = packed.attention_mask.to(device)
    # Position ids from the mask: the left padding must not shift an absolute-position model's positions.
    # No KV cache: nothing is generated from here (HF would otherwise keep every layer's K/V).
    return model(input_ids=packed.input_ids.to(device), attention_mask=mask, position_ids=position_ids(mask),
                 logits_to_keep=positions, use_cache=False)


@torch.no_grad()
def policy_logprobs(model, packed: PackedBatch, temperature: float = 1.0, micro_batch_size: int | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """[batch, R] log-probs of the packed responses under a causal LM, zero on padding; the forward runs
    `micro_batch_size` rows at a time (`models.forward.micro_batched`)."""
    from tlcr_ray.models.forward import micro_batched

    device = device or next(model.parameters()).device

    def forward(rows: slice) -> torch.Tensor:
        part = select_rows(packed, range(packed.input_ids.shape[0])[rows])
        logits = response_logits_of(model, part, device)
        return token_logprobs(logits, part.response_ids.to(device), temperature).cpu()

    return micro_batched(forward, packed.input_ids.shape[0], micro_batch_size) * packed.response_mask


def shard_rows(batch_size: int, rank: int, world_size: int) -> range:
    """Contiguous block of rows for `rank`; blocks differ in size by at most one."""
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def split_rows(n: int, parts: int) -> list[range]:
    """`n` rows in at most `parts` contiguous, near-equal, non-empty blocks (one per actor)."""
    return [r for r in (range(c[0], c[-1] + 1) for c in np.array_split(np.arange(n), parts) if len(c))]


def merge_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """Rollout batches of several engines -> one, rows in order."""
    return RolloutBatch(*(sum((getattr(b, f) for b in batches), []) for f in
                          ("prompt_ids", "response_ids", "logprobs", "finish_reasons")))
