"""The PPO loop's pure pieces (tlcr_ray.rl.loop_state): resumable prompt sampling, the checkpointed
controller state, the response mask, the metrics row and the weight-sync check."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tlcr_ray.rl.loop_state import initial_state, response_mask, sample_prompts, saved_state, step_metrics, sync_check
from tlcr_ray.rl.ppo_math import advantages_from_rollout


def test_sampling_covers_each_epoch_once_and_resumes_exactly_from_a_saved_state():
    pool = list(range(10))
    state = initial_state(seed=3)
    first = [sample_prompts(pool, 4, seed=3, state=state) for _ in range(5)]  # 20 prompts: two epochs
    assert sorted(first[0] + first[1] + first[2][:2]) == pool and state["epoch"] == 2
    assert first[0] != sorted(first[0])  # a permutation, not file order

    state = initial_state(seed=3)
    sample_prompts(pool, 4, seed=3, state=state)
    state["step"] = 1
    state["rng"].integers(2**31)
    saved = json.loads(json.dumps(saved_state(state, "continuous")))  # what controller.json holds
    resumed = initial_state(3, saved)
    assert resumed["step"] == 1 and saved["mode"] == "continuous"
    assert sample_prompts(pool, 4, seed=3, state=resumed) == first[1]
    assert resumed["rng"].integers(2**31) == state["rng"].integers(2**31)
    with pytest.raises(ValueError, match="empty"):
        sample_prompts([], 1, seed=0, state=initial_state(0))


def test_response_mask_marks_each_rows_tokens():
    mask = response_mask([[5, 6, 7], [], [9]], width=4)
    assert mask.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]]


def test_step_metrics_are_means_over_valid_tokens():
    mask = response_mask([[1, 2], [3]], width=2)
    rewards = torch.tensor([[0.5, -0.5], [1.0, 9.0]]) * mask
    logprobs, ref = torch.tensor([[-1.0, -2.0], [-1.0, 0.0]]), torch.tensor([[-1.5, -2.0], [-1.0, 0.0]])
    values = torch.zeros(2, 2)
    adv = advantages_from_rollout(rewards, logprobs, ref, values, mask, kl_coef=0.1, gamma=1.0, lam=0.95)
    row = step_metrics(rewards, mask, adv, logprobs, ref, values, torch.ones(2, 2), ["stop", "length"],
                       [{"policy_loss": 1.0, "seconds": 3.0}, {"policy_loss": 3.0, "seconds": 4.0}])
    assert row["reward_token_mean"] == pytest.approx(1.0 / 3)
    assert row["kl_k1"] == pytest.approx(0.5 / 3) and row["response_len"] == 1.5
    assert row["perplexity"] == pytest.approx(float(np.exp(4.0 / 3))) and row["stop_frac"] == 0.5
    assert row["truncated_frac"] == 0.5
    assert row["policy_loss"] == 2.0 and "seconds" not in row


def test_sync_check_reports_the_largest_gaps():
    out = sync_check([-1.0, -2.0], [-1.5, -2.0], [-1.0, -2.25])
    assert out == {"sync_logprob_err": 0.25, "sync_logprob_change": 0.5}
