"""Full-vocabulary KL (`ppo.kl_estimator: full`): the response-position logits, the index of KL_t,
and KL_t at the planted index. A run through the controller: tests/integration/test_ppo_full_kl.py.

    .venv/bin/python -m pytest tests/unit/test_full_kl.py -q
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tlcr_ray.rl.batch import pack, response_logits, response_logits_of, token_logprobs
from tlcr_ray.rl.ppo_math import advantages_from_rollout, full_kl, token_kl

VOCAB, PREV, BAD = 32, 11, 7
CPU = torch.device("cpu")


class BigramLM(torch.nn.Module):
    """Next-token logits depend only on the current token; `boost` favours BAD after PREV. Takes
    HF's `logits_to_keep` (positions) like a real causal LM."""

    def __init__(self, boost: float):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            self.table[PREV, BAD] += boost

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=None, use_cache=None):
        ids = input_ids if logits_to_keep is None else input_ids[:, logits_to_keep]
        return SimpleNamespace(logits=self.table[ids])


def test_response_logits_of_reads_the_same_columns_as_a_full_forward(tiny_model_dir):
    from tlcr_ray.models import load_policy, position_ids

    model = load_policy(tiny_model_dir).eval()
    packed = pack([[5, 6, 7], [8, 9, 10, 11, 12]], [[20, 21, 22, 23], [30]], pad_id=0)
    mask = packed.attention_mask
    with torch.no_grad():  # the same position ids (from the mask) as response_logits_of passes
        full = response_logits(model(input_ids=packed.input_ids, attention_mask=mask,
                                     position_ids=position_ids(mask)).logits, packed)
        kept = response_logits_of(model, packed, CPU)
    assert kept.shape == (2, 4, model.config.vocab_size)
    assert torch.allclose(kept, full, atol=1e-5)


def test_full_kl_is_zero_against_itself_and_positive_exactly_at_the_planted_action():
    # Row 0 takes BAD at response index 2 (after PREV); row 1 at index 0 (PREV ends its prompt).
    packed = pack([[1, 2, 3], [4, PREV]], [[5, PREV, BAD, 6], [BAD, 9, 10]], pad_id=0)
    mask = packed.response_mask
    policy, same, planted = BigramLM(0.0), BigramLM(0.0), BigramLM(5.0)
    with torch.no_grad():
        logits = response_logits_of(policy, packed, CPU)
        logprobs = token_logprobs(logits, packed.response_ids) * mask
        rewards, values = torch.ones_like(mask) * mask, torch.zeros_like(mask)
        for ref_model, expect_at in ((same, [[], []]), (planted, [[2], [0]])):
            ref_logits = response_logits_of(ref_model, packed, CPU)
            ref_logprobs = token_logprobs(ref_logits, packed.response_ids) * mask
            out = advantages_from_rollout(rewards, logprobs, ref_logprobs, values, mask, kl_coef=0.5, gamma=1.0,
                                          lam=1.0, kl_estimator="full", whiten=False, logits=logits,
                                          ref_logits=ref_logits)
            kl = out["kl"]
            assert kl.shape == mask.shape
            assert torch.allclose(kl, full_kl(logits, ref_logits) * mask)
            for row in range(2):
                assert (kl[row] > 1e-3).nonzero().flatten().tolist() == expect_at[row]
                assert (kl[row].abs() <= 1e-6).sum() == kl.shape[1] - len(expect_at[row])
            assert torch.allclose(out["shaped_rewards"], (rewards - 0.5 * kl) * mask)
    # The sampled BAD is likelier under the planted reference, so k1 is negative where the exact KL is positive.
    k1 = token_kl("k1", logprobs, ref_logprobs)
    assert k1[0, 2] < 0 < kl[0, 2] and k1[1, 0] < 0 < kl[1, 0]


def test_full_kl_without_logits_is_an_error():
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="full"):
        token_kl("full", lp, lp)
    with pytest.raises(ValueError, match="k1"):
        token_kl("k2", lp, lp)
