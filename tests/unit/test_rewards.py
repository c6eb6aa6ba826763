"""Reward modes on a fixed p vector, the sequence baseline, and reading p at the token's own column."""
import math

import pytest
import torch

from tlcr_ray.rl.batch import pack
from tlcr_ray.rl.rewards import apply_missing_eos_penalty, discriminator_probs, sequence_rewards, token_rewards

P = torch.tensor([[0.0, 0.3, 0.4, 0.5, 0.6, 0.9, 1.0]])


def test_continuous_is_one_sigmoid_not_double_softmax():
    r = token_rewards(P, "continuous")
    assert torch.allclose(r, torch.tensor([[-1.0, -0.4, -0.2, 0.0, 0.2, 0.8, 1.0]]), atol=1e-6)
    # The paper code's double softmax gives tanh((2p-1)/2): 0.9 -> 0.38, not 0.8.
    assert abs(r[0, 5].item() - math.tanh(0.4)) > 0.3


def test_fixed_thresholds_inclusive():
    r = token_rewards(P, "fixed")
    assert r.tolist() == [[-1.0, -1.0, -1.0, 0.0, 1.0, 1.0, 1.0]]
    r = token_rewards(P, "fixed", pos_threshold=0.95, neg_threshold=0.05)
    assert r.tolist() == [[-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]


def test_ablations_drop_one_sign():
    assert torch.allclose(token_rewards(P, "no_negative"), torch.tensor([[0, 0, 0, 0, 0.2, 0.8, 1.0]]), atol=1e-6)
    assert torch.allclose(token_rewards(P, "no_positive"), torch.tensor([[-1.0, -0.4, -0.2, 0, 0, 0, 0]]), atol=1e-6)


def test_bad_mode_and_thresholds_are_clear_errors():
    with pytest.raises(ValueError, match="sequence_rewards"):
        token_rewards(P, "sequence")
    with pytest.raises(ValueError, match="threshold"):
        token_rewards(P, "fixed", pos_threshold=0.3, neg_threshold=0.4)


def test_sequence_reward_on_last_response_token_clipped():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    r = sequence_rewards(torch.tensor([7.0, -2.0, -9.0]), mask, clip=5.0)
    assert r.tolist() == [[0, 0, 5.0, 0], [-2.0, 0, 0, 0], [0, 0, 0, -5.0]]


class PlantedTokenDiscriminator(torch.nn.Module):
    """logit = -10 where the token itself is `bad`, +10 elsewhere (a hand-built oracle)."""

    def __init__(self, bad: int):
        super().__init__()
        self.bad = bad
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return torch.where(input_ids == self.bad, -10.0, 10.0) + self.dummy


def test_p_is_read_at_the_tokens_own_column_with_left_padded_prompts():
    bad = 7
    packed = pack([[1, 2, 3], [4]], [[5, bad, 6, 8], [bad, 9]], pad_id=0)
    p = discriminator_probs(PlantedTokenDiscriminator(bad), packed.input_ids, packed.attention_mask,
                            packed.prompt_len, packed.response_mask)
    r = token_rewards(p, "continuous") * packed.response_mask
    assert (r[0] < 0).nonzero().flatten().tolist() == [1]
    assert (r[1] < 0).nonzero().flatten().tolist() == [0]
    assert r[1, 2:].abs().sum() == 0  # padding carries no reward


def test_missing_eos_penalty_hits_the_last_token_of_truncated_rows_only():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    rewards = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.0], [0.6, 0.7, 0.8], [0.0, 0.0, 0.0]])
    out = apply_missing_eos_penalty(rewards, mask, ["length", "length", "stop", "length"], penalty=1.0)
    want = torch.tensor([[0.1, 0.2, -0.7], [0.4, -0.5, 0.0], [0.6, 0.7, 0.8], [0.0, 0.0, 0.0]])
    assert torch.allclose(out, want) and torch.equal(rewards[0], torch.tensor([0.1, 0.2, 0.3]))  # not in place
    assert torch.equal(apply_missing_eos_penalty(rewards, mask, ["stop"] * 4, 1.0), rewards)
    with pytest.raises(ValueError, match="3 finish reasons for 4"):
        apply_missing_eos_penalty(rewards, mask, ["stop"] * 3, 1.0)
