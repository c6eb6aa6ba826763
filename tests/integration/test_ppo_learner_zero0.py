"""One learner rank under ZeRO stage 0, as configs/demo.yaml runs it (a single rank partitions nothing,
and ZeRO-2's flat-buffer bookkeeping cost 1.5 s per optimizer step at SmolLM2-135M on CPU): an update
gives the same weights as under ZeRO-2, and a checkpoint resumes to exactly the run that never stopped.

    .venv/bin/python -m pytest tests/integration/test_ppo_learner_zero0.py -q
"""
from __future__ import annotations

import torch

from tlcr_ray.config import PPOConfig
from tlcr_ray.rl.batch import RolloutBatch

CFG = dict(steps=4, prompts_per_step=4, mini_batch_size=2, ppo_epochs=1, actor_lr=1e-3, critic_lr=2e-3,
           lr_schedule="cosine", warmup_steps=0, seed=0)


def rollout() -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3000, 4000, (n,), generator=g).tolist()  # noqa: E731
    prompts, responses = [ids(n) for n in (5, 3, 7, 4)], [ids(n) for n in (4, 6, 2, 5)]
    return RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], ["length"] * 4)


def make_learner(policy_dir, critic_dir, rdzv, zero_stage: int):
    from tlcr_ray.rl.learner import PPOLearner

    return PPOLearner(policy_dir, PPOConfig(**CFG, zero_stage=zero_stage), rank=0, world_size=1,
                      init_method=rdzv, critic_dir=critic_dir)


def update(learner, batch, pad_id) -> dict:
    n, R = len(batch.prompt_ids), max(len(r) for r in batch.response_ids)
    old = learner.evaluate(batch, pad_id)
    g = torch.Generator().manual_seed(1)
    return learner.train(batch, pad_id, torch.randn(n, R, generator=g), torch.randn(n, R, generator=g),
                         old["logprobs"], old["values"])


def critic_state(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.critic.module.state_dict().items()}


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())
    assert worst <= atol, worst


def test_zero0_updates_like_zero2_and_resumes_exactly(tiny_model_dir, head_models, tokenizer, learner_rdzv,
                                                      tmp_path):
    batch, pad = rollout(), tokenizer.pad_token_id
    start = make_learner(tiny_model_dir, head_models["disc"], learner_rdzv, 0).full_state_dict()
    zero2 = make_learner(tiny_model_dir, head_models["disc"], learner_rdzv, 2)
    zero0 = make_learner(tiny_model_dir, head_models["disc"], learner_rdzv, 0)
    assert type(zero0.actor.optimizer).__name__ == "AdamW"  # stage 0: the torch optimizer itself, no ZeRO wrapper
    assert type(zero2.actor.optimizer).__name__ != "AdamW"
    for learner in (zero2, zero0):
        update(learner, batch, pad)
    # Same update (Adam + clipping in fp32), whatever the stage: only float summation order may differ.
    assert_same(zero0.full_state_dict(), zero2.full_state_dict(), atol=1e-6)
    assert_same(critic_state(zero0), critic_state(zero2), atol=1e-6)
    moved = max((v - start[k]).abs().max().item() for k, v in zero0.full_state_dict().items())
    assert moved > 1e-4  # the update did something (lr 1e-3)

    zero0.save_checkpoint(str(tmp_path / "ckpt"), step=1)
    expected = update(zero0, batch, pad)  # the run that never stopped: its second update
    resumed = make_learner(tiny_model_dir, head_models["disc"], learner_rdzv, 0)
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    got = update(resumed, batch, pad)
    assert got["policy_loss"] == expected["policy_loss"] and got["actor_lr"] == expected["actor_lr"]
    assert_same(resumed.full_state_dict(), zero0.full_state_dict())  # Adam's moments came back too
    assert_same(critic_state(resumed), critic_state(zero0))
