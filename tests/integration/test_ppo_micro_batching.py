"""The PPO learner rank without Ray (one DeepSpeed rank over gloo, CPU): micro-batches with gradient
accumulation give the update of one whole mini-batch; evaluate's forward micro-batches; the exact
full KL computed on the learner; optimizer offload and gradient checkpointing in real engines.

    .venv/bin/python -m pytest tests/integration/test_ppo_micro_batching.py -q
"""
from __future__ import annotations

import pytest
import torch

from tlcr_ray.config import PPOConfig
from tlcr_ray.rl.batch import RolloutBatch, pack

# max_grad_norm huge: clipping would rescale any gradient to norm 1 and hide a wrong normalisation.
CFG = dict(steps=2, prompts_per_step=8, mini_batch_size=8, ppo_epochs=1, actor_lr=1e-3, critic_lr=1e-3,
           lr_schedule="constant", max_grad_norm=1e9)


def rollout(n: int, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3000, 4000, (k,), generator=g).tolist()  # noqa: E731
    lengths = [(3 + i % 4, 1 + (5 * i) % 7) for i in range(n)]  # uneven responses: token means matter
    prompts, responses = [ids(p) for p, _ in lengths], [ids(r) for _, r in lengths]
    return RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], ["length"] * n)


def make_learner(policy_dir, critic_dir, rdzv, **overrides):
    from tlcr_ray.rl.learner import PPOLearner

    return PPOLearner(policy_dir, PPOConfig(**{**CFG, **overrides}), rank=0, world_size=1, init_method=rdzv,
                      critic_dir=critic_dir)


def captured_gradients(engine) -> list:
    """The gradients each optimizer step applies: read by a pre-step hook on the torch AdamW inside the
    DeepSpeed engine (ZeRO-2: its flat fp32 partitions)."""
    steps = []
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    base.register_step_pre_hook(lambda opt, args, kwargs: steps.append(
        torch.cat([p.grad.detach().flatten().clone() for g in opt.param_groups for p in g["params"]
                   if p.grad is not None])))
    return steps


def update(learner, batch, pad_id=0):
    n, R = len(batch.prompt_ids), max(len(r) for r in batch.response_ids)
    old = learner.evaluate(batch, pad_id)
    g = torch.Generator().manual_seed(1)
    grads = {name: captured_gradients(engine) for name, engine in learner.engines.items()}
    stats = learner.train(batch, pad_id, torch.randn(n, R, generator=g), torch.randn(n, R, generator=g),
                          old["logprobs"] - 0.1, old["values"])
    return grads, stats


@pytest.mark.parametrize("rows, mini, micros, critic", [(8, 8, (1, 4, 8), "separate"), (6, 4, (1, 2, 4), "separate"),
                                                         (8, 8, (2, 8), "shared")])
def test_micro_batches_with_accumulation_make_the_same_update_as_one_mini_batch(
        rows, mini, micros, critic, tiny_model_dir, head_models, learner_rdzv):
    # 1 x 8 = 4 x 2 = 8 x 1 rows per optimizer step; with 6 rows and mini-batches of 4 the second is 2 rows
    # (micro 1: 2 real micro-steps and 2 zero-weight placeholders).
    # lr 0: every mini-batch's gradients are taken at the same weights in every run (Adam would amplify
    # float32 noise on near-zero gradients into different weights for the second mini-batch).
    # ppo.critic shared: one engine, the combined loss; the gradients compared include the value head's.
    batch = rollout(rows)
    runs = {}
    for micro in micros:
        learner = make_learner(tiny_model_dir, head_models["disc"], learner_rdzv, prompts_per_step=rows,
                               mini_batch_size=mini, micro_batch_size=micro, actor_lr=0.0, critic_lr=0.0,
                               critic=critic, vf_coef=0.5)
        assert learner.accum == -(-mini // micro)
        assert learner.actor.gradient_accumulation_steps() == learner.accum
        if critic == "shared":  # a non-zero head (not its zero init), so the value loss reaches the backbone too
            with torch.no_grad():
                learner.actor.module.value_head.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
        runs[micro] = update(learner, batch)
    reference = runs[micros[-1]]
    assert list(reference[0]) == (["actor", "critic"] if critic == "separate" else ["actor"])
    for micro in micros[:-1]:
        grads, stats = runs[micro]
        for engine in reference[0]:
            # One step per mini-batch; ZeRO-2 steps each param group (shared: policy, head) on its own.
            groups = 2 if critic == "shared" else 1
            assert len(grads[engine]) == len(reference[0][engine]) == -(-rows // mini) * groups
            for got, want in zip(grads[engine], reference[0][engine]):
                assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item()), (engine, micro)
        for key in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "value_clip_frac"):
            assert stats[key] == pytest.approx(reference[1][key], abs=1e-5), key


def test_evaluate_scores_in_forward_micro_batches_without_cache(tiny_model_dir, head_models, learner_rdzv):
    batch = rollout(7)
    outs = {}
    for size in (7, 2):
        learner = make_learner(tiny_model_dir, head_models["disc"], learner_rdzv, prompts_per_step=7,
                               forward_micro_batch_size=size)
        rows, caches = [], []

        def spy(module, args, kwargs, rows=rows, caches=caches):
            rows.append(kwargs["input_ids"].shape[0])
            caches.append(kwargs.get("use_cache"))

        learner.actor.module.register_forward_pre_hook(spy, with_kwargs=True)
        outs[size] = learner.evaluate(batch, 0)
        assert max(rows) == size and set(caches) == {False}
        assert learner.score(batch.prompt_ids, batch.response_ids, 0)  # the sync check's forward, too
        assert max(rows) == size
    for key in ("logprobs", "values", "entropy"):
        assert torch.allclose(outs[2][key], outs[7][key], atol=1e-5), key
    assert "logits" not in outs[2] and "kl" not in outs[2]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_full_kl_is_computed_exactly_on_the_learner_against_its_reference_copy(
        zero_stage, tiny_model_dir, head_models, learner_rdzv):
    from tlcr_ray.models import load_policy
    from tlcr_ray.rl.batch import response_logits_of
    from tlcr_ray.rl.ppo_math import full_kl

    batch = rollout(5)
    learner = make_learner(tiny_model_dir, head_models["disc"], learner_rdzv, prompts_per_step=5, mini_batch_size=5,
                           kl_estimator="full", forward_micro_batch_size=2, temperature=0.7, zero_stage=zero_stage)
    first = learner.evaluate(batch, 0)
    assert set(first) >= {"kl", "logprobs"} and "logits" not in first
    assert first["kl"].shape == first["logprobs"].shape and first["kl"].abs().max() < 1e-5  # the policy IS the reference
    update(learner, batch)
    after = learner.evaluate(batch, 0)["kl"]
    packed = pack(batch.prompt_ids, batch.response_ids, 0)
    cpu = torch.device("cpu")
    learner.actor.eval()
    with torch.no_grad():  # the engine itself: under ZeRO-3 its module's parameters are partitioned
        expected = full_kl(response_logits_of(learner.actor, packed, cpu), response_logits_of(
            load_policy(tiny_model_dir).eval(), packed, cpu), 0.7) * packed.response_mask
    assert after.max() > 1e-4 and torch.allclose(after, expected, atol=1e-5)


def test_optimizer_offload_and_gradient_checkpointing_in_real_engines(tiny_model_dir, head_models, learner_rdzv,
                                                                        tmp_path):
    from tlcr_ray.config import TrainConfig
    from tlcr_ray.training.loop import LoopSpec, build_engine

    learner = make_learner(tiny_model_dir, head_models["disc"], learner_rdzv, prompts_per_step=4, mini_batch_size=4,
                           offload_optimizer=True, gradient_checkpointing=True)
    for engine in (learner.actor, learner.critic):
        assert engine.zero_optimization_stage() == 2
        assert engine._config.zero_config.offload_optimizer.device == "cpu" and engine.zero_cpu_offload()
        assert getattr(engine.module, "backbone", engine.module).is_gradient_checkpointing
    before = [p.detach().clone() for p in learner.actor.module.parameters()]
    grads, stats = update(learner, rollout(4))
    assert len(grads["actor"]) == 1 and stats["policy_loss"] == stats["policy_loss"]  # stepped, finite
    assert any((a - b).abs().max() > 0 for a, b in zip(before, learner.actor.module.parameters()))
    # A supervised stage's engine with the same switch (sft.offload_optimizer).
    spec = LoopSpec(stage="disc", train_cfg=TrainConfig(offload_optimizer=True, gradient_checkpointing=True),
                    init=tiny_model_dir, tokenizer=tiny_model_dir, train=[], heldout=[], total_steps=2,
                    stage_dir=str(tmp_path))
    engine, _ = build_engine(spec)
    assert engine._config.zero_config.offload_optimizer.device == "cpu" and engine.zero_cpu_offload()
    assert engine.module.backbone.is_gradient_checkpointing


def test_remax_learner_accumulates_micro_batches_without_a_critic(tiny_model_dir, head_models, learner_rdzv):
    learner = make_learner(tiny_model_dir, head_models["rm"], learner_rdzv, prompts_per_step=4, mini_batch_size=4,
                           micro_batch_size=2, algorithm="remax")
    assert learner.critic is None and list(learner.engines) == ["actor"]
    old = learner.evaluate(rollout(4), 0)
    assert old["values"].abs().max() == 0.0
    grads, stats = update(learner, rollout(4))
    assert len(grads["actor"]) == 1 and "value_loss" not in stats and "critic_lr" not in stats
