"""The baselines' pure pieces: the DPO loss and its reference cache, FIGA's token weights and loss, and how
`pipeline.methods` maps to stages (docs/algorithm.md §10)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tlcr_ray.config import ConfigError, load_config
from tlcr_ray.labeling.labels import IGNORE, LabeledSequence
from tlcr_ray.layout import RunLayout
from tlcr_ray.methods import METHODS
from tlcr_ray.pipeline import pipeline_stages
from tlcr_ray.training import collate, compute_loss
from tlcr_ray.training.dpo import cached_reference_logps, dpo_loss, implicit_margins, response_logps
from tlcr_ray.training.examples import dpo_examples, figa_examples
from tlcr_ray.training.figa import figa_loss, token_weights


# ---------------------------------------------------------------- DPO

def test_dpo_loss_on_two_pairs_matches_the_hand_computed_value():
    # [2B]: chosen of pair 1, 2, then rejected of pair 1, 2.
    policy = torch.tensor([-1.0, -2.0, -3.0, -1.0])
    reference = torch.tensor([-1.5, -2.0, -2.5, -1.5])
    # pair 1: 0.1 * ((-1 + 1.5) - (-3 + 2.5)) = 0.1 * (0.5 + 0.5) = 0.1
    # pair 2: 0.1 * ((-2 + 2) - (-1 + 1.5)) = 0.1 * (0 - 0.5) = -0.05
    assert implicit_margins(policy, reference, 0.1).tolist() == pytest.approx([0.1, -0.05])
    loss, right, pairs = dpo_loss(policy, reference, beta=0.1)
    # -log sigmoid(m) = log(1 + exp(-m))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-0.1)) + math.log(1 + math.exp(0.05))) / 2, abs=1e-6)
    assert (right, pairs) == (1, 2)


def test_response_logps_sum_only_response_tokens():
    # Uniform logits over 4 tokens: every predicted token has log p = -log 4.
    logits = torch.zeros(2, 5, 4)
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2, 3],        # 3 response tokens
                           [IGNORE, 0, 1, IGNORE, IGNORE]]).long()  # 2 (then padding)
    assert response_logps(logits, labels).tolist() == pytest.approx([-3 * math.log(4), -2 * math.log(4)])


class _TableModel(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the current token (a lookup table)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_dpo_compute_loss_through_collate_matches_the_sums(tokenizer):
    pairs = [SimpleNamespace(pair_id="a", prompt="\n\nHuman: hi\n\nAssistant:", chosen=" Hello there.", rejected=" No."),
             SimpleNamespace(pair_id="b", prompt="\n\nHuman: yo\n\nAssistant:", chosen=" Yes.", rejected=" Go away now.")]
    model_cfg = SimpleNamespace(max_prompt_len=32, max_response_len=32)
    examples = dpo_examples(pairs, tokenizer, model_cfg, max_len=64)
    assert [e["pair_id"] for e in examples] == ["a", "b"]
    for e in examples:  # labels are the response's ids (EOS included), IGNORE on the prompt
        for side in ("chosen", "rejected"):
            ids, labels = e[f"{side}_ids"], e[f"{side}_labels"]
            start = labels.index(next(t for t in labels if t != IGNORE))
            assert labels[start:] == ids[start:] and ids[-1] == tokenizer.eos_token_id
    vocab = max(max(e["chosen_ids"] + e["rejected_ids"]) for e in examples) + 1
    model = _TableModel(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))
    for e, ref in zip(examples, ([-5.0, -6.0], [-7.0, -4.0])):
        e["ref_logps"] = ref
    batch = collate("dpo", examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and batch["ref_logps"].tolist() == [-5.0, -7.0, -6.0, -4.0]
    loss, right, counted = compute_loss("dpo", model, batch, SimpleNamespace(beta=0.5))

    def logp(ids, labels):  # by hand, token by token
        logprobs = torch.log_softmax(model.table.detach()[torch.tensor(ids)], -1)
        return sum(float(logprobs[t - 1, labels[t]]) for t in range(1, len(ids)) if labels[t] != IGNORE)

    margins = [0.5 * ((logp(e["chosen_ids"], e["chosen_labels"]) - e["ref_logps"][0])
                      - (logp(e["rejected_ids"], e["rejected_labels"]) - e["ref_logps"][1])) for e in examples]
    assert loss.item() == pytest.approx(sum(math.log(1 + math.exp(-m)) for m in margins) / 2, rel=1e-5)
    assert (right, counted) == (sum(m > 0 for m in margins), 2)


def _examples(n: int) -> list[dict]:
    return [{"pair_id": str(i), "chosen_ids": [1, 2, i], "chosen_labels": [IGNORE, 2, i],
             "rejected_ids": [1, 3], "rejected_labels": [IGNORE, 3]} for i in range(n)]


def test_reference_logps_are_computed_once_and_cached(tmp_path, tiny_model_dir):
    path, calls = tmp_path / "dpo" / "reference_logps.json", []

    def compute(examples):
        calls.append(len(examples))
        return {e["pair_id"]: [-1.0 * int(e["pair_id"]), -2.0] for e in examples}

    first = cached_reference_logps(path, _examples(3), tiny_model_dir, compute)
    assert calls == [3] and first["2"] == [-2.0, -2.0]
    assert json.loads(path.read_text())["pairs"] == 3

    def must_not_run(examples):
        raise AssertionError("the cached reference log-probs were recomputed")

    assert cached_reference_logps(path, _examples(3), tiny_model_dir, must_not_run) == first
    # Other pairs (or another reference) make the cache stale: computed again, and re-cached.
    cached_reference_logps(path, _examples(4), tiny_model_dir, compute)
    assert calls == [3, 4] and json.loads(path.read_text())["pairs"] == 4


# ---------------------------------------------------------------- FIGA

def _hand_labelled_pair() -> list[LabeledSequence]:
    # prompt [5, 6]; rejected " a b c" -> revised " a X c Y": b was replaced by X, Y inserted; EOS = 2.
    rejected = LabeledSequence("p", "rejected", [5, 6, 7, 8, 9, 2], [IGNORE, IGNORE, 0.5, 0.0, 0.5, 0.5])
    revised = LabeledSequence("p", "revised", [5, 6, 7, 10, 9, 11, 2], [IGNORE, IGNORE, 0.5, 1.0, 0.5, 1.0, 0.5])
    return [rejected, revised]


def test_figa_token_weights_on_a_hand_labelled_pair():
    rejected, revised = _hand_labelled_pair()
    assert token_weights(rejected.labels, "rejected", True, 1.0, 0.5, 0.0) == [0, 0, 0, -0.5, 0, 0]
    assert token_weights(revised.labels, "revised", True, 1.0, 0.5, 0.0) == [0, 0, 0, 1.0, 0, 1.0, 1.0]
    # gamma weighs the revised side's unchanged tokens; a truncated revision (no EOS) keeps gamma at its end.
    assert token_weights(revised.labels, "revised", False, 2.0, 0.5, 0.25) == [0, 0, 0.25, 2.0, 0.25, 2.0, 0.25]

    cfg = SimpleNamespace(alpha=1.0, beta=0.5, gamma=0.0)
    examples = figa_examples([rejected, revised], eos_id=2, max_len=16, figa_cfg=cfg)
    assert [e["kind"] for e in examples] == ["rejected", "revised"]
    assert examples[0]["labels"] == [IGNORE, IGNORE, 7, 8, 9, 2]
    assert examples[1]["weights"] == [0, 0, 0, 1.0, 0, 1.0, 1.0]


def test_figa_loss_weights_tokens_and_drops_unlikely_bad_ones():
    # Uniform logits over 4 tokens: CE = log 4 = 1.386 at every position.
    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([[IGNORE, 1, 2, 3]]).long()
    weights = torch.tensor([[0.0, 1.0, -0.5, 0.0]])
    ce = math.log(4)
    loss, correct, counted = figa_loss(logits, labels, weights, max_bad_ce=None)
    assert loss.item() == pytest.approx((1.0 * ce - 0.5 * ce) / 2)  # / tokens with a non-zero weight
    assert counted == 1
    # CE 1.386 > 0.6: the rejected token is no longer likely, so it is not pushed down further.
    loss, _, _ = figa_loss(logits, labels, weights, max_bad_ce=0.6)
    assert loss.item() == pytest.approx(ce)


# ---------------------------------------------------------------- pipeline.methods

def test_methods_default_to_the_papers_seven_and_map_to_stages():
    cfg = load_config(None, ["output_dir=/tmp/run"])
    assert cfg.pipeline.methods == ["sft", "dpo", "ppo-seq", "remax", "figa", "tlcr-fixed", "tlcr"]
    assert sorted(cfg.pipeline.ppo_modes) == ["continuous", "fixed", "sequence"]
    stages = {s.name: s for s in pipeline_stages(cfg)}
    layout = RunLayout("/tmp/run")
    for name, method in METHODS.items():
        if name in cfg.pipeline.methods:
            assert any(s.output == method.model(layout) for s in stages.values()), name
    remax = stages["ppo-remax"]
    assert (remax.command, remax.cfg.ppo.algorithm, remax.cfg.reward.mode) == ("ppo", "remax", "sequence")
    assert remax.output == layout.ppo("remax").model
    assert RunLayout.ppo_run_name(remax.cfg) == "remax"
    assert stages["ppo-sequence"].cfg.ppo.algorithm == "ppo"
    assert {"dpo", "eval-dpo", "figa", "train-rm"} <= set(stages)
    assert "judge-table" not in stages
    judged = pipeline_stages(load_config(None, ["output_dir=/tmp/run", "eval.judge_base_url=http://127.0.0.1:1/v1"]))
    assert [s.name for s in judged][-2:] == ["judge-table", "report"]


def test_old_ppo_modes_configs_keep_their_pipeline():
    cfg = load_config(None, ["pipeline.ppo_modes=[continuous, fixed]"])
    assert cfg.pipeline.methods == ["sft", "tlcr", "tlcr-fixed"]
    names = [s.name for s in pipeline_stages(cfg)]
    assert names == ["label", "sft", "train-disc", "eval-disc", "ppo-continuous", "ppo-fixed", "report"]
    # The saved config (both keys) loads back to the same thing.
    again = load_config(None, [f"pipeline.methods={cfg.pipeline.methods}", f"pipeline.ppo_modes={cfg.pipeline.ppo_modes}"])
    assert again.pipeline.methods == cfg.pipeline.methods


def test_methods_and_ppo_modes_that_disagree_fail_at_load():
    with pytest.raises(ConfigError, match="pipeline.ppo_modes is"):
        load_config(None, ["pipeline.methods=[sft, tlcr]", "pipeline.ppo_modes=[sequence]"])
    with pytest.raises(ConfigError, match="not allowed"):
        load_config(None, ["pipeline.methods=[sft, ppo]"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["pipeline.methods=[tlcr, tlcr]"])
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_config(None, ["dpo.beta=0"])
