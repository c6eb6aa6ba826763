"""ppo.critic shared without Ray (one DeepSpeed rank over gloo, CPU): the value head on the policy's last
hidden state, one engine, one backward of the combined loss; the policy's weights go out (syncs, HF
export) without the head, and a checkpoint round-trips both. The micro-batching equality of the shared
learner is in test_ppo_micro_batching.py.

    .venv/bin/python -m pytest tests/integration/test_ppo_shared_critic.py -q
"""
from __future__ import annotations

import pytest
import torch

from tlcr_ray.config import PPOConfig
from tlcr_ray.rl.batch import RolloutBatch, pack

CFG = dict(steps=10, prompts_per_step=4, mini_batch_size=4, ppo_epochs=1, actor_lr=1e-3, critic_lr=1e-2,
           lr_schedule="constant", critic="shared", vf_coef=0.5)


def rollout(seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3000, 4000, (n,), generator=g).tolist()  # noqa: E731
    prompts, responses = [ids(n) for n in (5, 3, 7, 4)], [ids(n) for n in (4, 6, 2, 5)]
    return RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], ["length"] * 4)


def make_learner(policy_dir, rdzv, critic_dir=None, **overrides):
    from tlcr_ray.rl.learner import PPOLearner

    # critic_dir: e.g. a discriminator folder, which a separate critic would start from; shared ignores it.
    return PPOLearner(policy_dir, PPOConfig(**{**CFG, **overrides}), rank=0, world_size=1, init_method=rdzv,
                      critic_dir=critic_dir)


def targets(batch, seed: int = 1):
    n, R = len(batch.prompt_ids), max(len(r) for r in batch.response_ids)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, R, generator=g), torch.randn(n, R, generator=g)  # advantages, returns


def train_once(learner, batch):
    advantages, returns = targets(batch)
    old = learner.evaluate(batch, 0)
    return learner.train(batch, 0, advantages, returns, old["logprobs"], old["values"])


def head_values(policy, head, batch) -> torch.Tensor:
    """The head applied to the causal LM's own final hidden state at the state before each action (columns
    P - 1 .. P + R - 2), computed here without the shared model's forward; 0 on padding."""
    from tlcr_ray.models import position_ids

    packed = pack(batch.prompt_ids, batch.response_ids, 0)
    P, R = packed.prompt_len, packed.response_ids.shape[1]
    with torch.no_grad():
        hidden = policy.get_decoder()(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                      position_ids=position_ids(packed.attention_mask), use_cache=False)
        values = head(hidden.last_hidden_state[:, P - 1:P + R - 1]).squeeze(-1)
    return values * packed.response_mask


def policy_state(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.policy_module.state_dict().items()}


def test_one_engine_whose_values_are_the_head_on_the_policys_hidden_state_and_learn(tiny_model_dir, head_models,
                                                                                      learner_rdzv):
    from tlcr_ray.models import load_policy
    from tlcr_ray.rl.batch import policy_logprobs

    batch = rollout()
    learner = make_learner(tiny_model_dir, learner_rdzv, critic_dir=head_models["disc"])
    assert learner.critic is None and list(learner.engines) == ["actor"]
    head = learner.actor.module.value_head
    assert head.weight.abs().max() == 0 and head.bias.abs().max() == 0  # zero-init: V = 0, not the disc's head
    # The policy inside is the initial policy: the same log-probs as a plain causal LM.
    first = learner.evaluate(batch, 0)
    plain = policy_logprobs(load_policy(tiny_model_dir).eval(), pack(batch.prompt_ids, batch.response_ids, 0))
    assert torch.allclose(first["logprobs"], plain, atol=1e-5) and first["values"].abs().max() == 0
    assert set(first) == {"logprobs", "values", "entropy", "seconds"}

    before, head_before = policy_state(learner), [p.detach().clone() for p in head.parameters()]
    losses = []
    for _ in range(6):  # a fixed batch and fixed returns: the value loss must go down
        stats = train_once(learner, batch)
        losses.append(stats["value_loss"])
    assert {"policy_loss", "value_loss", "value_clip_frac", "clip_frac", "approx_kl", "actor_lr",
            "critic_lr"} <= set(stats)
    assert stats["actor_lr"] == pytest.approx(1e-3) and stats["critic_lr"] == pytest.approx(1e-2)  # two groups
    assert losses[-1] < 0.8 * losses[0], losses
    after = policy_state(learner)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy moved ...
    assert all(not torch.equal(a, b) for a, b in zip(head_before, head.parameters()))  # ... and the head
    # The values evaluate returns are the head on the trained policy's own last hidden state.
    learner.actor.eval()
    got = learner.evaluate(batch, 0)["values"]
    assert got.abs().max() > 1e-3
    assert torch.allclose(got, head_values(learner.policy_module, head, batch), atol=1e-5)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])  # ZeRO-1 steps through ZeRO-2's optimizer class
def test_syncs_and_exports_hold_the_policy_alone_and_a_checkpoint_restores_the_head(
        zero_stage, tiny_model_dir, learner_rdzv, tmp_path):
    from tlcr_ray.models import load_policy

    batch = rollout()
    learner = make_learner(tiny_model_dir, learner_rdzv, zero_stage=zero_stage)
    for _ in range(2):
        train_once(learner, batch)
    initial = load_policy(tiny_model_dir).state_dict()
    # What the rollout engines get: the policy's HF names, nothing of the head, and its trained weights.
    synced = learner.full_state_dict()
    assert set(synced) == set(initial)
    assert [n for n, _ in learner._policy_entries()] == list(initial)
    assert not any("value_head" in n for n in learner.weight_update_info()["names"])
    assert any(not torch.equal(synced[k], initial[k]) for k in initial)
    # The exported HF folder reloads as exactly that policy.
    learner.export_hf(str(tmp_path / "export"), dtype="auto")
    exported = load_policy(str(tmp_path / "export")).state_dict()
    assert set(exported) == set(initial)
    assert all(torch.equal(exported[k], synced[k]) for k in exported)

    learner.save_checkpoint(str(tmp_path / "ckpt"), step=2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["actor", "hf"]  # no critic engine
    values = learner.evaluate(batch, 0)["values"]
    assert values.abs().max() > 1e-4
    fresh = make_learner(tiny_model_dir, learner_rdzv, zero_stage=zero_stage)
    assert fresh.evaluate(batch, 0)["values"].abs().max() == 0  # the zero-init head, before the load
    fresh.load_checkpoint(str(tmp_path / "ckpt"))
    restored = fresh.evaluate(batch, 0)
    assert torch.equal(restored["values"], values)  # the head (and the hidden states under it) restored
    assert torch.equal(restored["logprobs"], learner.evaluate(batch, 0)["logprobs"])
    reloaded = fresh.full_state_dict()
    assert all(torch.equal(reloaded[k], synced[k]) for k in synced)
    if zero_stage == 2:  # a run resumed with the other ppo.critic is refused, naming it
        with pytest.raises(ValueError, match=r"written with ppo\.critic=shared, but this run has ppo\.critic=separate"):
            make_learner(tiny_model_dir, learner_rdzv, critic="separate").load_checkpoint(str(tmp_path / "ckpt"))
    # The optimizer state came back too: the next update is the same on both.
    a, b = train_once(learner, batch), train_once(fresh, batch)
    assert a["value_loss"] == pytest.approx(b["value_loss"], rel=1e-6)
    assert all(torch.equal(x, y) for x, y in zip(learner.full_state_dict().values(), fresh.full_state_dict().values()))


def test_a_remax_run_builds_no_critic_even_with_ppo_critic_shared(tiny_model_dir, learner_rdzv):
    """A pipeline's ReMax run inherits ppo.critic (tlcr_ray/pipeline.py sets only ppo.algorithm): no head."""
    learner = make_learner(tiny_model_dir, learner_rdzv, algorithm="remax")
    assert not learner.shared and learner.critic is None and list(learner.engines) == ["actor"]
    assert not hasattr(learner.actor.module, "value_head") and learner.policy_module is learner.actor.module
