"""The PPO loop's pure pieces: prompt sampling with a resumable cursor, the controller's checkpointed
state, the response mask, the per-step metrics row and the weight-sync check.

    state = initial_state(seed=0, saved=None)                 # or the controller.json of a checkpoint
    prompts = sample_prompts(pool, 8, seed=0, state=state)    # advances state["epoch"], state["cursor"]
    row = step_metrics(rewards, mask, adv, old_logprobs, ref_logprobs, values, entropy, finish_reasons, train)

The Ray controller (`actors/controller.py`) drives these; they are unit-tested without Ray.
"""
from __future__ import annotations

import numpy as np
import torch

from tlcr_ray.rl.ppo_math import masked_mean


def initial_state(seed: int, saved: dict | None = None) -> dict:
    """Loop state: step, data cursor (epoch, position in its permutation) and the step-seed RNG."""
    rng = np.random.default_rng(seed)
    if saved is None:
        return {"step": 0, "epoch": 0, "cursor": 0, "rng": rng}
    rng.bit_generator.state = saved["rng"]
    return {"step": saved["step"], "epoch": saved["epoch"], "cursor": saved["cursor"], "rng": rng}


def saved_state(state: dict, mode: str) -> dict:
    """What a checkpoint's controller.json holds (the inverse of `initial_state`)."""
    return {"step": state["step"], "epoch": state["epoch"], "cursor": state["cursor"],
            "rng": state["rng"].bit_generator.state, "mode": mode}


def sample_prompts(pool: list, n: int, seed: int, state: dict) -> list:
    """`n` items of `pool` from a seeded per-epoch permutation; the cursor lives in `state`, so a
    resumed run continues exactly where the checkpoint left off."""
    if not pool:
        raise ValueError("sample_prompts: the prompt pool is empty")
    chosen = []
    while len(chosen) < n:
        order = np.random.default_rng([seed, state["epoch"]]).permutation(len(pool))
        take = order[state["cursor"]:state["cursor"] + n - len(chosen)]
        chosen += [pool[i] for i in take]
        state["cursor"] += len(take)
        if state["cursor"] >= len(pool):
            state["epoch"], state["cursor"] = state["epoch"] + 1, 0
    return chosen


def response_mask(response_ids: list[list[int]], width: int) -> torch.Tensor:
    """[batch, width] float mask: 1.0 on each row's response tokens, 0.0 on padding."""
    mask = torch.zeros((len(response_ids), width))
    for i, resp in enumerate(response_ids):
        mask[i, :len(resp)] = 1.0
    return mask


def rollout_logprobs(logprobs: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """The engine's per-token sampling log-probs (`RolloutBatch.logprobs`, one list per row) as [batch, R],
    0 on padding (`mask`, [batch, R]): ppo.old_logprobs rollout."""
    out = torch.zeros_like(mask)
    for i, row in enumerate(logprobs):
        out[i, :len(row)] = torch.tensor(row, dtype=out.dtype)
    if not torch.isfinite(out).all():
        raise ValueError("ppo.old_logprobs=rollout: the engine returned a non-finite log-prob")
    return out * mask


def step_metrics(rewards: torch.Tensor, mask: torch.Tensor, adv: dict, old_logprobs: torch.Tensor,
                 ref_logprobs: torch.Tensor, values: torch.Tensor, entropy: torch.Tensor | None,
                 finish_reasons: list[str], train: list[dict]) -> dict[str, float]:
    """The learning half of a step's metrics row; every tensor [batch, R], `adv` from
    `advantages_from_rollout`, `train` one stats dict per learner rank (its "entropy", the update's,
    is the row's: `entropy` [batch, R] from the evaluation forward is the fallback)."""
    return {
        "reward_token_mean": masked_mean(rewards, mask).item(),
        "reward_seq_sum": rewards.sum(1).mean().item(),
        "kl": masked_mean(adv["kl"], mask).item(),
        "kl_seq_sum": adv["kl"].sum(1).mean().item(),
        "kl_k1": masked_mean(old_logprobs - ref_logprobs, mask).item(),  # sampled estimate, whatever kl_estimator
        "response_len": mask.sum(1).mean().item(),
        "perplexity": float(torch.exp(-masked_mean(old_logprobs, mask))),
        **({} if entropy is None else {"entropy": masked_mean(entropy, mask).item()}),
        "value_mean": masked_mean(values, mask).item(),
        "stop_frac": float(np.mean([f == "stop" for f in finish_reasons])),
        "truncated_frac": float(np.mean([f == "length" for f in finish_reasons])),  # cut at max_response_len
        **{k: float(np.mean([t[k] for t in train])) for k in train[0] if k != "seconds"},
    }


def heldout_metrics(texts: list[str], lengths: list[int]) -> dict:
    """The `ppo.heldout_every` probe's metrics from its sampled replies (text and token count each):
    `heldout_planted_share` (share holding a phrase of `tlcr_ray.data.planted.PHRASES`, the planted
    benchmark's gold metric; ~0 on other data), `heldout_len` and the replies themselves."""
    from tlcr_ray.data.planted import planted_share

    return {"heldout_planted_share": planted_share(texts), "heldout_len": float(np.mean(lengths)) if lengths else 0.0,
            "heldout_replies": texts}


def sync_check(learner_logprobs: list[float], rollout_before: list[float], rollout_after: list[float]) -> dict:
    """One probe sequence scored by the learner and by a rollout engine before and after a sync:
    `sync_logprob_err` (engine vs learner, ~0 when the sync worked) and `sync_logprob_change`
    (engine before vs after, > 0 when the update reached it)."""
    learner, before, after = (np.array(x) for x in (learner_logprobs, rollout_before, rollout_after))
    return {"sync_logprob_err": float(np.max(np.abs(learner - after))),
            "sync_logprob_change": float(np.max(np.abs(after - before)))}
