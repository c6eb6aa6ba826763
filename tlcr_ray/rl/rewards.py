"""Token rewards from discriminator probabilities (docs/algorithm.md §5), dense over response tokens.

    p = torch.sigmoid(disc_logits)                 # [batch, R], p_t read at token t's own position
    r = token_rewards(p, "continuous")             # 2p - 1

`sequence` (the baseline) is not a function of p: `sequence_rewards(rm_scores, response_mask)` puts
the clipped RM score on the last response token. Every function returns dense [batch, R] rewards,
zero on padding once multiplied by the response mask.
"""
from __future__ import annotations

import torch

from tlcr_ray.choices import MODES, TOKEN_MODES  # defined there (no torch) so the config can check reward.mode

MODE_LABELS = {"continuous": "TLCR", "sequence": "PPO-seq", "fixed": "TLCR-fixed",
               "no_negative": "TLCR w/o negative", "no_positive": "TLCR w/o positive"}
"""How reports name the policy each mode trains (the paper's names)."""
assert set(MODE_LABELS) == set(MODES)


def token_rewards(p: torch.Tensor, mode: str, pos_threshold: float = 0.6,
                  neg_threshold: float = 0.4) -> torch.Tensor:
    """[batch, R] probabilities that each token is good -> [batch, R] rewards.

    continuous: 2p - 1 (one sigmoid upstream, so p is a probability; no second softmax);
    fixed: +1 if p >= pos_threshold, -1 if p <= neg_threshold, else 0;
    no_negative: max(2p - 1, 0); no_positive: min(2p - 1, 0).
    """
    if mode not in TOKEN_MODES:
        raise ValueError(f"reward mode {mode!r}: token modes are {', '.join(TOKEN_MODES)} "
                         "(use sequence_rewards for 'sequence')")
    if not neg_threshold < pos_threshold:
        raise ValueError(f"fixed thresholds: need neg_threshold < pos_threshold, got {neg_threshold}, {pos_threshold}")
    r = 2.0 * p - 1.0
    if mode == "fixed":
        return (p >= pos_threshold).to(p.dtype) - (p <= neg_threshold).to(p.dtype)
    if mode == "no_negative":
        return r.clamp(min=0.0)
    if mode == "no_positive":
        return r.clamp(max=0.0)
    return r


def last_token_index(response_mask: torch.Tensor) -> torch.Tensor:
    """[batch, R] right-padded mask -> [batch] index of the last response token (0 for empty rows)."""
    return (response_mask.sum(dim=-1).long() - 1).clamp(min=0)


def sequence_rewards(scores: torch.Tensor, response_mask: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """[batch] RM scores, [batch, R] mask -> [batch, R]: zero except the clipped score on the last token."""
    rewards = torch.zeros_like(response_mask, dtype=torch.float32)
    rows = torch.arange(rewards.shape[0])
    rewards[rows, last_token_index(response_mask)] = scores.float().clamp(-clip, clip)
    return rewards * response_mask


def apply_missing_eos_penalty(rewards: torch.Tensor, response_mask: torch.Tensor, finish_reasons: list[str],
                              penalty: float) -> torch.Tensor:
    """`ppo.truncated: penalize` (docs/algorithm.md §6): a new [batch, R] tensor with `penalty` subtracted
    at the last token of each row cut at max_response_len (finish reason "length", so no EOS)."""
    if len(finish_reasons) != rewards.shape[0]:
        raise ValueError(f"{len(finish_reasons)} finish reasons for {rewards.shape[0]} reward rows")
    out = rewards.clone()
    rows = [i for i, reason in enumerate(finish_reasons) if reason == "length" and response_mask[i].any()]
    if rows:
        rows_t = torch.tensor(rows)
        out[rows_t, last_token_index(response_mask)[rows_t]] -= penalty
    return out


@torch.no_grad()
def discriminator_probs(discriminator, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prompt_len: int, response_mask: torch.Tensor, micro_batch_size: int | None = None) -> torch.Tensor:
    """p_t for each response token, read at the token's OWN column (prompt_len + t): [batch, R].

    input_ids/attention_mask [batch, P + R] in the `rollout.pack` layout; 0 on padding. The forward runs
    `micro_batch_size` rows at a time (None: all at once).
    """
    from tlcr_ray.models.forward import micro_batched

    device = next(discriminator.parameters()).device
    R = response_mask.shape[1]

    def forward(rows: slice) -> torch.Tensor:
        logits = discriminator(input_ids[rows].to(device), attention_mask[rows].to(device)).float().cpu()
        return torch.sigmoid(logits[:, prompt_len:prompt_len + R])

    return micro_batched(forward, input_ids.shape[0], micro_batch_size) * response_mask


@torch.no_grad()
def sequence_scores(reward_model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    micro_batch_size: int | None = None) -> torch.Tensor:
    """[batch, T] -> [batch] sequence RM scores (float32, CPU), `micro_batch_size` rows per forward."""
    from tlcr_ray.models.forward import micro_batched

    device = next(reward_model.parameters()).device
    return micro_batched(lambda rows: reward_model(input_ids[rows].to(device), attention_mask[rows].to(device))
                         .float().cpu(), input_ids.shape[0], micro_batch_size)


def score_packed(model, packed, reward_cfg, micro_batch_size: int | None = None) -> dict:
    """The reward actor's step on a packed batch: {"rewards": [batch, R], "p": [batch, R]} in the token
    modes, {"rewards", "scores": [batch]} in `sequence` mode (reward_cfg: the config's `reward`)."""
    mask = packed.response_mask
    if reward_cfg.mode == "sequence":
        scores = sequence_scores(model, packed.input_ids, packed.attention_mask, micro_batch_size)
        return {"scores": scores, "rewards": sequence_rewards(scores, mask, reward_cfg.sequence_clip)}
    p = discriminator_probs(model, packed.input_ids, packed.attention_mask, packed.prompt_len, mask, micro_batch_size)
    rewards = token_rewards(p, reward_cfg.mode, reward_cfg.fixed_pos_threshold, reward_cfg.fixed_neg_threshold)
    return {"p": p, "rewards": rewards * mask}
