"""The PPO learner rank without Ray (one DeepSpeed rank over gloo): where the critic starts
(ppo.critic_init), the lr schedule of both engines across updates and a checkpoint/resume, and the
controller's refusal of a reward model with another vocabulary.

    .venv/bin/python -m pytest tests/integration/test_ppo_learner.py -q
"""
from __future__ import annotations

import pytest
import torch

from tlcr_ray.config import PPOConfig
from tlcr_ray.rl.batch import RolloutBatch, pack

CFG = dict(steps=4, prompts_per_step=4, mini_batch_size=2, ppo_epochs=1, actor_lr=1e-3, critic_lr=2e-3,
           lr_schedule="cosine", warmup_steps=0)


def rollout(seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3000, 4000, (n,), generator=g).tolist()  # noqa: E731
    prompts, responses = [ids(n) for n in (5, 3, 7, 4)], [ids(n) for n in (4, 6, 2, 5)]
    return RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], ["length"] * 4)


@pytest.fixture
def rdzv(learner_rdzv):
    return learner_rdzv


def make_learner(policy_dir, critic_dir, rdzv, **overrides):
    from tlcr_ray.rl.learner import PPOLearner

    return PPOLearner(policy_dir, PPOConfig(**{**CFG, **overrides}), rank=0, world_size=1, init_method=rdzv,
                      critic_dir=critic_dir)


def expected_values(head_dir: str, batch: RolloutBatch, pad_id: int) -> torch.Tensor:
    """The head model's own outputs at the critic's columns (the state before each action), 0 on padding."""
    from tlcr_ray.models import load_head_model

    model = load_head_model(head_dir).eval()
    packed = pack(batch.prompt_ids, batch.response_ids, pad_id)
    P, R = packed.prompt_len, packed.response_ids.shape[1]
    with torch.no_grad():
        out = model.position_outputs(packed.input_ids, packed.attention_mask)
    return out[:, P - 1:P + R - 1] * packed.response_mask


def train_once(learner, batch, pad_id):
    n, R = len(batch.prompt_ids), max(len(r) for r in batch.response_ids)
    old = learner.evaluate(batch, pad_id)
    g = torch.Generator().manual_seed(1)
    return learner.train(batch, pad_id, torch.randn(n, R, generator=g), torch.randn(n, R, generator=g),
                         old["logprobs"], old["values"])


def test_critic_starts_from_the_reward_model_and_the_lr_follows_the_schedule_across_resume(
        tiny_model_dir, head_models, tokenizer, rdzv, tmp_path):
    from tlcr_ray.training.optim import lr_factor

    batch, pad = rollout(), tokenizer.pad_token_id
    learner = make_learner(tiny_model_dir, head_models["disc"], rdzv)
    # ppo.critic_init=reward in a token mode: V_t are the discriminator's own outputs at t's state.
    values = learner.evaluate(batch, pad)["values"]
    assert values.abs().sum() > 0
    assert torch.allclose(values, expected_values(head_models["disc"], batch, pad), atol=1e-5)

    # 4 PPO steps x (4 rows / mini-batch 2) = 8 optimizer steps of cosine decay; each update takes 2.
    total = 8
    factor = lambda k: lr_factor(k, total, 0, "cosine")  # noqa: E731
    stats = [train_once(learner, batch, pad) for _ in range(2)]
    assert [s["actor_lr"] for s in stats] == pytest.approx([1e-3 * factor(0), 1e-3 * factor(2)])
    assert [s["critic_lr"] for s in stats] == pytest.approx([2e-3 * factor(0), 2e-3 * factor(2)])
    assert learner.actor.get_lr()[0] == pytest.approx(1e-3 * factor(4)) and factor(4) == pytest.approx(0.5)
    learner.save_checkpoint(str(tmp_path / "ckpt"))

    # A fresh rank (here in sequence mode: its critic starts from the sequence RM) resumes the schedule.
    resumed = make_learner(tiny_model_dir, head_models["rm"], rdzv)
    assert torch.allclose(resumed.evaluate(batch, pad)["values"], expected_values(head_models["rm"], batch, pad),
                          atol=1e-5)
    assert resumed.actor.get_lr()[0] == pytest.approx(1e-3)  # before the load: step 0
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert resumed.actor.get_lr()[0] == pytest.approx(1e-3 * factor(4))
    assert resumed.critic.get_lr()[0] == pytest.approx(2e-3 * factor(4))
    assert train_once(resumed, batch, pad)["actor_lr"] == pytest.approx(1e-3 * factor(4))
    assert resumed.actor.get_lr()[0] == pytest.approx(1e-3 * factor(6))


def test_policy_critic_init_and_constant_schedule(tiny_model_dir, tokenizer, rdzv):
    from tlcr_ray.models import ValueModel

    batch, pad = rollout(), tokenizer.pad_token_id
    learner = make_learner(tiny_model_dir, tiny_model_dir, rdzv, critic_init="policy", lr_schedule="constant")
    fresh = ValueModel.from_pretrained(tiny_model_dir, seed=0).eval()  # the policy's backbone, a new head (seed)
    packed = pack(batch.prompt_ids, batch.response_ids, pad)
    P, R = packed.prompt_len, packed.response_ids.shape[1]
    with torch.no_grad():
        expected = fresh(packed.input_ids, packed.attention_mask)[:, P - 1:P + R - 1] * packed.response_mask
    assert torch.allclose(learner.evaluate(batch, pad)["values"], expected, atol=1e-5)
    train_once(learner, batch, pad)
    assert learner.actor.get_lr()[0] == pytest.approx(1e-3)


def test_a_checkpoint_without_scheduler_state_still_resumes(tiny_model_dir, tokenizer, rdzv, tmp_path):
    """Checkpoints written before ppo.lr_schedule existed hold `lr_scheduler: None`."""
    old = make_learner(tiny_model_dir, tiny_model_dir, rdzv, critic_init="policy")
    old.actor.lr_scheduler = old.critic.lr_scheduler = None  # as the old engines were built
    old.save_checkpoint(str(tmp_path / "old"))
    new = make_learner(tiny_model_dir, tiny_model_dir, rdzv, critic_init="policy")
    new.load_checkpoint(str(tmp_path / "old"))
    assert new.actor.get_lr()[0] == pytest.approx(1e-3)
    assert train_once(new, rollout(), tokenizer.pad_token_id)["actor_lr"] == pytest.approx(1e-3)


def test_a_reward_model_with_another_vocabulary_is_refused_before_start(tmp_path, tiny_model_dir, head_models,
                                                                         tiny_ppo_config, tokenizer):
    from transformers import LlamaConfig, LlamaModel

    from actors.controller import _resolve_paths
    from tlcr_ray.config import ConfigError
    from tlcr_ray.models import SequenceRewardModel, TokenDiscriminator, save_head_model

    assert _resolve_paths(tiny_ppo_config(tmp_path, tiny_model_dir, head_models, "continuous"))
    # A discriminator over a model with a 1000-token embedding (the same tokenizer files) ...
    small = LlamaModel(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4))
    disc = save_head_model(TokenDiscriminator(small), tmp_path / "disc-small", tokenizer)
    cfg = tiny_ppo_config(tmp_path, tiny_model_dir, {**head_models, "disc": str(disc)}, "continuous")
    with pytest.raises(ConfigError, match=r"reward\.discriminator: .*vocab_size 1000"):
        _resolve_paths(cfg)
    # ... and a sequence RM whose tokenizer maps tokens to other ids (the embedding size is the same).
    import copy

    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<tlcr-extra-token>"])
    rm = save_head_model(SequenceRewardModel.from_pretrained(tiny_model_dir), tmp_path / "rm-other", other)
    cfg = tiny_ppo_config(tmp_path, tiny_model_dir, {**head_models, "rm": str(rm)}, "sequence")
    with pytest.raises(ConfigError, match=r"reward\.reward_model: .*tokenizer"):
        _resolve_paths(cfg)


@pytest.mark.parametrize("zero_stage", [2, 1])
def test_weight_buckets_pickle_to_their_own_size_under_zero_1_and_2(tiny_model_dir, rdzv, zero_stage):
    """ZeRO-1/2 keep the parameters as views of one flat buffer. Pickled (ray.put of a sync bucket, the
    object-store path), a view carries its whole storage: the demo's 135M learner grew by 12 GB during
    its first sync and was killed. Every bucket must pickle to about the bytes of its own tensors."""
    import pickle

    learner = make_learner(tiny_model_dir, None, rdzv, zero_stage=zero_stage, bucket_mib=0.05)
    buckets = [b for b in learner.state_buckets() if b is not None]
    assert len(buckets) > 3
    model_bytes = sum(p.numel() * p.element_size() for p in learner.actor.module.parameters())
    pickled = sum(len(pickle.dumps(b)) for b in buckets)
    own = sum(t.numel() * t.element_size() for b in buckets for t in b.values())
    assert own >= model_bytes  # every weight went out (a tied one under both names)
    assert pickled < 1.1 * own + 64 * 1024, (pickled, own)
