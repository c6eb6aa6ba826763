"""ppo.fuse_evaluation: a one-pass update (1 epoch, 1 mini-batch, 1 micro-batch, one rank) takes its old
log-probs and values from its own forward and computes the advantages itself (`train_in_one_pass`); it
gives the update the evaluate-then-train path gives, for every critic layout and for ReMax.

    .venv/bin/python -m pytest tests/integration/test_fused_evaluation.py -q
"""
from __future__ import annotations

import json

import pytest
import torch

from tlcr_ray.config import PPOConfig
from tlcr_ray.rl.batch import RolloutBatch
from tlcr_ray.rl.minibatches import fuses_evaluation, update_is_one_pass
from tlcr_ray.rl.ppo_math import advantages_from_rollout, remax_advantages

CFG = dict(steps=4, prompts_per_step=4, mini_batch_size=4, ppo_epochs=1, actor_lr=1e-3, critic_lr=2e-3,
           zero_stage=0, seed=0)
CASES = {  # name -> PPOConfig fields, and whether the old log-probs come from the rollout
    "separate": ({}, False),
    "separate-rollout-logprobs": ({}, True),
    "shared": ({"critic": "shared"}, False),
    "remax": ({"algorithm": "remax"}, False),
}


def rollout() -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3000, 4000, (n,), generator=g).tolist()  # noqa: E731
    prompts, responses = [ids(n) for n in (5, 3, 7, 4)], [ids(n) for n in (4, 6, 2, 5)]
    return RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], ["length"] * 4)


def make_learner(policy_dir, critic_dir, rdzv, fuse: str, **fields):
    from tlcr_ray.rl.learner import PPOLearner

    return PPOLearner(policy_dir, PPOConfig(**{**CFG, **fields}, fuse_evaluation=fuse), rank=0, world_size=1,
                      init_method=rdzv, critic_dir=critic_dir)


def weights(learner) -> dict[str, torch.Tensor]:
    out = {f"actor.{k}": v.detach().clone() for k, v in learner.actor.module.state_dict().items()}
    if learner.critic is not None:
        out.update({f"critic.{k}": v.detach().clone() for k, v in learner.critic.module.state_dict().items()})
    return out


def worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())


def test_the_one_pass_rule():
    one = PPOConfig(**CFG)
    assert update_is_one_pass(one, 1) and fuses_evaluation(one, 1)
    assert not update_is_one_pass(one, 2)  # two ranks: each holds half the batch
    for fields in ({"ppo_epochs": 2}, {"mini_batch_size": 2}, {"micro_batch_size": 2}):
        assert not update_is_one_pass(PPOConfig(**{**CFG, **fields}), 1), fields
    assert update_is_one_pass(PPOConfig(**{**CFG, "mini_batch_size": 8, "micro_batch_size": 4}), 1)
    assert not fuses_evaluation(PPOConfig(**{**CFG, "kl_estimator": "full"}), 1)
    assert not fuses_evaluation(PPOConfig(**{**CFG, "fuse_evaluation": "off"}), 1)


@pytest.mark.parametrize("case", CASES)
def test_one_pass_update_equals_evaluate_then_train(case, tiny_model_dir, head_models, tokenizer, learner_rdzv):
    fields, from_rollout = CASES[case]
    cfg = PPOConfig(**{**CFG, **fields})
    critic_dir = head_models["rm" if case == "remax" else "disc"]
    batch, pad = rollout(), tokenizer.pad_token_id
    plain = make_learner(tiny_model_dir, critic_dir, learner_rdzv, "off", **fields)
    fused = make_learner(tiny_model_dir, critic_dir, learner_rdzv, "auto", **fields)
    assert fused.fused and not plain.fused
    with pytest.raises(RuntimeError, match="not one pass"):
        plain.train_in_one_pass(batch, pad, torch.zeros(4, 6), torch.zeros(4, 6))
    start = weights(plain)
    g = torch.Generator().manual_seed(1)
    for update in range(2):  # the second update starts from the first's weights and optimizer state
        old = plain.evaluate(batch, pad)
        mask = old["logprobs"].ne(0).float()
        rewards = torch.randn(mask.shape, generator=g) * mask
        ref_logprobs = (old["logprobs"] + 0.1 * torch.randn(mask.shape, generator=g)) * mask
        baseline = torch.randn(4, generator=g) if case == "remax" else None
        common = dict(kl_coef=cfg.kl_coef, gamma=cfg.gamma)
        adv = remax_advantages(rewards, baseline, old["logprobs"], ref_logprobs, mask, **common) if baseline \
            is not None else advantages_from_rollout(rewards, old["logprobs"], ref_logprobs, old["values"], mask,
                                                     lam=cfg.lam, **common)
        expected = plain.train(batch, pad, adv["advantages"], adv["returns"], old["logprobs"], old["values"])
        given = old["logprobs"] if from_rollout else None  # the rollout's log-probs equal the learner's here
        got = fused.train_in_one_pass(batch, pad, rewards, ref_logprobs, given, baseline)
        assert torch.allclose(got["old_logprobs"], old["logprobs"], atol=1e-5)
        assert torch.allclose(got["values"], old["values"], atol=1e-5)
        for key in ("advantages", "returns", "kl"):
            assert torch.allclose(got[key], adv[key], atol=1e-4), (update, key)
        stats = got["stats"]
        assert stats.keys() == expected.keys()
        for key, value in expected.items():
            if key != "seconds":
                assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (update, key)
        # Adam's early steps are ~lr x sign(gradient): float-rounding differences of the old log-probs (the
        # evaluation's batch shape is not the update's) move a weight by a small share of a step at most.
        moved = worst(weights(plain), start)
        assert moved > 1e-3 and worst(weights(fused), weights(plain)) < 0.02 * moved, update


def test_dropout_turns_the_fusion_off(tmp_path, tiny_model_dir, head_models, learner_rdzv):
    """A train-mode forward with dropout is not the evaluation's: the learner evaluates first."""
    import shutil

    from tlcr_ray.models import has_active_dropout, load_policy

    policy = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, policy)
    config = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    assert has_active_dropout(load_policy(str(policy))) and not has_active_dropout(load_policy(tiny_model_dir))
    assert not make_learner(str(policy), head_models["disc"], learner_rdzv, "auto").fused


@pytest.mark.ray
@pytest.mark.slow
def test_a_one_rank_run_skips_the_evaluation(tmp_path, ray_local, tiny_model_dir, head_models, tiny_ppo_config):
    """Through the Ray layer on one learner rank (the demo's layout, a separate critic): no evaluation
    forward at all, the ratio of the one pass is exactly 1, the engine's weights are the learner's after
    each sync."""
    from actors.controller import run

    cfg = tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous", "ppo.learner.num_actors=1",
                          "ppo.steps=2", "ppo.checkpoint_every=2",
                          "ppo.sync_check_every=1")
    assert run(cfg)["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "ppo-continuous" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["time_learner_eval"] == 0.0  # nothing evaluated
        assert row["approx_kl"] < 1e-9 and row["value_loss"] > 0 and row["entropy"] == row["entropy"]
        assert row["sync_logprob_err"] < 1e-4
    assert rows[-1]["kl"] != 0.0  # the policy moved away from the reference
