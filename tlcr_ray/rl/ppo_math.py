"""PPO math on dense token-level rewards (pure torch; every tensor is [batch, R] over response tokens).

    kl = kl_penalty(old_logprobs, ref_logprobs)                    # k1: log pi - log pi_ref
    kl = full_kl(old_logits, ref_logits)                           # or exact, over the vocabulary
                                                                   # (the learner's, per micro-batch)
    R = shaped_rewards(token_rewards, kl, response_mask, kl_coef)  # R_t = r_t - beta * KL_t
    adv, ret = gae(R, old_values, response_mask, gamma=1.0, lam=0.95)
    adv = masked_whiten(adv, response_mask)
    loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs, adv, response_mask, 0.2)

Index t everywhere is the action index: response token t, its log-prob (read from the logits one
column earlier), the value of the state before it, its reward and its KL. No one-token lag.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tlcr_ray.choices import KL_ESTIMATORS  # noqa: F401  (ppo.kl_estimator; defined there so the config can check it)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalize [batch, R] to zero mean, unit variance over valid tokens only; padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return white * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """[batch, R] sampled-token log-probs under the policy and the reference -> [batch, R] KL estimate.

    k1: log pi - log pi_ref (unbiased, can be negative; the paper's choice);
    k3: exp(ref - log pi) - (ref - log pi) - 1 (non-negative, lower variance).
    Use `full_kl` (or `token_kl(..., "full")`) for the exact KL over the vocabulary.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator {estimator!r}: expected k1 or k3 (token_kl also takes full)")


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[batch, R, vocab] policy and reference logits for each action -> [batch, R] KL(pi || pi_ref).

    KL_t = sum_v pi(v|s_t) (log pi(v|s_t) - log pi_ref(v|s_t)): exact, >= 0, and the same for logits
    or log-probs (log_softmax is idempotent).
    """
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    ref_logp = F.log_softmax(ref_logits.float() / temperature, dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def token_kl(estimator: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
             logits: torch.Tensor | None = None, ref_logits: torch.Tensor | None = None,
             temperature: float = 1.0, kl: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL_t, [batch, R], by `estimator` (ppo.kl_estimator).

    k1/k3 read the sampled tokens' log-probs ([batch, R] each); full needs the policy's and the
    reference's logits at the response positions ([batch, R, vocab] each), or `kl` [batch, R], the exact
    KL already computed where the logits are (`PPOLearner.evaluate`, which holds a reference copy: the
    controller never sees a vocabulary-sized tensor).
    """
    if estimator != "full":
        return kl_penalty(logprobs, ref_logprobs, estimator)
    if kl is not None:
        return kl.float()
    if logits is None or ref_logits is None:
        raise ValueError("kl estimator 'full' needs the policy's and the reference's [batch, R, vocab] logits")
    return full_kl(logits, ref_logits, temperature)


def shaped_rewards(token_rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float) -> torch.Tensor:
    """R_t = r_t - beta * KL_t on response tokens, 0 on padding. [batch, R] each."""
    return (token_rewards.float() - kl_coef * kl.float()) * mask


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over right-padded response tokens.

    rewards, values, mask: [batch, R]; values[:, t] = V(state before action t). The value after the
    last action is 0 (episode ends). Returns (advantages, returns), both [batch, R], 0 on padding.
    """
    mask = mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Padding has zero reward and value, so `running` is 0 when it reaches a row's last token.
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def token_sum_over(x: torch.Tensor, mask: torch.Tensor, normaliser: float | torch.Tensor | None) -> torch.Tensor:
    """sum(x * mask) / normaliser; None: the token mean, masked_mean(x, mask). A micro-batch of a larger
    mini-batch passes the mini-batch's token count, so its micro-batches' losses add up to the token mean
    over the whole mini-batch (not a mean of micro-batch means)."""
    if normaliser is None:
        return masked_mean(x, mask)
    return (x * mask).sum() / max(float(normaliser), 1.0)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float, normaliser: float | torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate, token-mean over valid tokens (or the token sum / `normaliser`, `token_sum_over`).
    [batch, R] inputs -> (loss, clip fraction, approx KL); the two diagnostics are this batch's token means."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = token_sum_over(torch.maximum(unclipped, clipped), mask, normaliser)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, normaliser: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clipped - R)^2), token-mean (or / `normaliser`).
    -> (loss, clip fraction)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * token_sum_over(torch.maximum(loss_unclipped, loss_clipped), mask, normaliser)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clipfrac.detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[batch, R, vocab] -> [batch, R] entropy of the categorical distribution."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def advantages_from_rollout(rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                            values: torch.Tensor, mask: torch.Tensor, *, kl_coef: float, gamma: float,
                            lam: float, kl_estimator: str = "k1", whiten: bool = True,
                            logits: torch.Tensor | None = None, ref_logits: torch.Tensor | None = None,
                            temperature: float = 1.0, kl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The controller's step between scoring and the update; every tensor [batch, R], except the
    [batch, R, vocab] `logits` / `ref_logits` that kl_estimator "full" needs unless `kl` brings it
    (see `token_kl`).

    -> {"kl", "shaped_rewards", "advantages" (whitened if asked), "returns"}.
    """
    kl = token_kl(kl_estimator, logprobs, ref_logprobs, logits, ref_logits, temperature, kl) * mask
    shaped = shaped_rewards(rewards, kl, mask, kl_coef)
    advantages, returns = gae(shaped, values, mask, gamma, lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return {"kl": kl, "shaped_rewards": shaped, "advantages": advantages, "returns": returns}


def remax_advantages(rewards: torch.Tensor, baseline: torch.Tensor, logprobs: torch.Tensor,
                     ref_logprobs: torch.Tensor, mask: torch.Tensor, *, kl_coef: float, gamma: float,
                     kl_estimator: str = "k1", logits: torch.Tensor | None = None,
                     ref_logits: torch.Tensor | None = None, temperature: float = 1.0,
                     kl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """ReMax (docs/algorithm.md §10): REINFORCE with the greedy response's reward as the baseline.

    rewards, logprobs, ref_logprobs, mask: [batch, R] for the sampled responses; baseline: [batch], the
    total reward of each prompt's greedy response. With R_t = r_t - beta * KL_t as in PPO:

        A_t = sum_{t' >= t} gamma^(t'-t) R_t'  -  gamma^(T-t) * b       (no critic, no whitening)

    i.e. the baseline is subtracted from the last token's reward before the (value-free) return; at
    kl_coef 0 and gamma 1, A_t = r(sample) - r(greedy) on every token of the row.
    -> {"kl", "shaped_rewards", "advantages", "returns"} like `advantages_from_rollout` (returns = advantages).
    """
    kl = token_kl(kl_estimator, logprobs, ref_logprobs, logits, ref_logits, temperature, kl) * mask
    shaped = shaped_rewards(rewards, kl, mask, kl_coef)
    lengths = mask.sum(1).long()
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0])
    centred = shaped.clone()
    centred[rows, last] -= baseline.float() * (lengths > 0)
    advantages, _ = gae(centred, torch.zeros_like(centred), mask, gamma, 1.0)
    return {"kl": kl, "shaped_rewards": shaped, "advantages": advantages, "returns": advantages}
