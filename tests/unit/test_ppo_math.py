"""GAE by hand, whitening, losses, and the alignment of reward, log-prob, KL and advantage indices."""
from types import SimpleNamespace

import torch

from tlcr_ray.rl.batch import pack, policy_logprobs
from tlcr_ray.rl.ppo_math import (
    entropy_from_logits,
    full_kl,
    gae,
    kl_penalty,
    masked_whiten,
    policy_loss,
    remax_advantages,
    shaped_rewards,
    value_loss,
)
from tlcr_ray.rl.rewards import discriminator_probs, token_rewards

REWARDS = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
VALUES = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 9.0]])  # 9.0 sits on padding and must be ignored
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_gae_hand_computed():
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.5)
    # row 0: deltas (1+1-0.5, 0+1.5-1, 2+0-1.5) = (1.5, 0.5, 0.5); A2=0.5, A1=0.5+0.25, A0=1.5+0.375
    assert torch.allclose(adv[0], torch.tensor([1.875, 0.75, 0.5]))
    assert torch.allclose(ret[0], torch.tensor([2.375, 1.75, 2.0]))
    # row 1 ends at t=1: deltas (0.5+2-1, 1+0-2) = (1.5, -1); A0 = 1.5 - 0.5
    assert torch.allclose(adv[1], torch.tensor([1.0, -1.0, 0.0]))
    assert torch.allclose(ret[1], torch.tensor([2.0, 1.0, 0.0]))


def test_gae_lambda_one_gives_reward_to_go_and_gamma_discounts():
    _, ret = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[3.0, 2.0, 2.0], [1.5, 1.0, 0.0]]))
    _, ret = gae(REWARDS, torch.zeros_like(VALUES), MASK, gamma=0.5, lam=1.0)
    assert torch.allclose(ret[0], torch.tensor([1.0 + 0.0 + 0.25 * 2.0, 1.0, 2.0]))


def test_whiten_uses_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    w = masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert abs(valid.mean().item()) < 1e-6 and abs(valid.var(unbiased=False).item() - 1) < 1e-4
    assert w[1, 1:].abs().sum() == 0


def test_policy_loss_clips_and_counts():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, clipfrac, _ = policy_loss(new, old, adv, torch.ones(1, 4), clip_eps=0.2)
    # per token max(-A r, -A clip(r)): -1, -1.2, 0.8, 1.1
    assert torch.isclose(loss, torch.tensor((-1.0 - 1.2 + 0.8 + 1.1) / 4))
    assert torch.isclose(clipfrac, torch.tensor(0.5))


def test_value_loss_clipped():
    loss, clipfrac = value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]),
                                torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), clip=0.2)
    # token 0: unclipped 0, clipped (0.2-1)^2 = 0.64; token 1: both 1
    assert torch.isclose(loss, torch.tensor(0.5 * (0.64 + 1.0) / 2))
    assert torch.isclose(clipfrac, torch.tensor(0.5))


def test_kl_estimators_and_entropy():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    assert torch.allclose(kl_penalty(lp, ref), torch.tensor([[0.5, 0.0]]))
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    logits = torch.randn(2, 3, 11)
    assert torch.allclose(full_kl(logits, logits), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(entropy_from_logits(torch.zeros(1, 1, 8)), torch.log(torch.tensor([[8.0]])))


VOCAB, PREV, BAD = 32, 11, 7


class BigramLM(torch.nn.Module):
    """Causal LM whose next-token logits depend only on the current token; `boost` favours BAD after PREV."""

    def __init__(self, boost: float):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(VOCAB, VOCAB))
        with torch.no_grad():
            self.table[PREV, BAD] = boost

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=None, use_cache=None):
        # positions: a bigram ignores them; logits_to_keep as HF's (the positions whose logits are wanted)
        assert use_cache is False  # every scoring forward turns HF's KV cache off
        ids = input_ids if logits_to_keep is None else input_ids[:, logits_to_keep]
        return SimpleNamespace(logits=self.table[ids])


class PlantedTokenDiscriminator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return torch.where(input_ids == BAD, -10.0, 10.0) + self.dummy


def test_reward_kl_and_advantage_share_the_action_index():
    # Row 0 has BAD at response index 2 (after PREV); row 1 at index 0 (PREV ends its prompt).
    packed = pack([[1, 2, 3], [4, PREV]], [[5, PREV, BAD, 6], [BAD, 9, 10]], pad_id=0)
    mask = packed.response_mask
    p = discriminator_probs(PlantedTokenDiscriminator(), packed.input_ids, packed.attention_mask,
                            packed.prompt_len, mask)
    r = token_rewards(p, "continuous") * mask
    logprobs = policy_logprobs(BigramLM(boost=0.0), packed)
    ref_logprobs = policy_logprobs(BigramLM(boost=5.0), packed)
    kl = kl_penalty(logprobs, ref_logprobs) * mask
    planted = [[2], [0]]
    for row in range(2):
        assert (r[row] < 0).nonzero().flatten().tolist() == planted[row]
        assert (kl[row].abs() > 1e-6).nonzero().flatten().tolist() == planted[row]
    R = shaped_rewards(r, kl, mask, kl_coef=0.1)
    adv, _ = gae(R, torch.zeros_like(R), mask, gamma=1.0, lam=1.0)
    # With zero values the advantage is the reward-to-go, so it steps by R exactly at the planted action.
    assert torch.isclose(adv[0, 2] - adv[0, 3], R[0, 2]) and torch.isclose(adv[1, 0] - adv[1, 1], R[1, 0])
    assert R[0, 2] < -0.5 and R[1, 0] < -0.5 and (R[0, :2] > 0.5).all()


def test_remax_advantage_is_sample_minus_greedy_reward_per_sequence():
    """kl_coef 0, gamma 1: every token of a row gets r(sample) - r(greedy); padding stays 0."""
    rewards = torch.tensor([[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]])  # sequence RM scores on the last token
    baseline = torch.tensor([0.5, 1.0])                          # the greedy responses' rewards
    lp = torch.zeros(2, 3)
    out = remax_advantages(rewards, baseline, lp, lp, MASK, kl_coef=0.0, gamma=1.0)
    assert torch.allclose(out["advantages"], torch.tensor([[1.5, 1.5, 1.5], [-2.0, -2.0, 0.0]]))
    assert torch.equal(out["returns"], out["advantages"])  # no critic: nothing else to regress on


def test_remax_advantage_with_kl_penalty_is_the_return_minus_the_baseline():
    rewards = torch.tensor([[0.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    baseline = torch.tensor([1.0, 0.25])
    logprobs = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -7.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -1.0, 0.0]])  # k1 KL: [[0.5, -1, 0], [1, 0, pad]]
    out = remax_advantages(rewards, baseline, logprobs, ref, MASK, kl_coef=0.1, gamma=1.0)
    # row 0: R = (-0.05, 0.1, 2) -> returns (2.05, 2.1, 2) minus b = 1; row 1: R = (-0.1, 1) - b 0.25
    assert torch.allclose(out["advantages"], torch.tensor([[1.05, 1.1, 1.0], [0.65, 0.75, 0.0]]))
    assert torch.allclose(out["kl"], torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]))
