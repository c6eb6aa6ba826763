"""Which rows each PPO learner rank runs in each micro-step, and how many optimizer steps that makes.

    schedule = rank_schedule(batch_size=8, mini_batch_size=8, micro_batch_size=2, world_size=2, rank=0,
                             epochs=1, seed=0)
    for minibatch in schedule:          # one optimizer step each
        for step in minibatch:          # ppo.micro_batch_size rows; gradients accumulate
            step.rows, step.weight, step.minibatch

Each epoch draws one permutation of the whole batch, the same on every rank (every rank holds the
whole batch), and cuts it into mini-batches of ppo.mini_batch_size rows (the last may be smaller).
A mini-batch's rows are split over the ranks in near-equal contiguous blocks (`rl.batch.shard_rows`)
and each block into micro-batches of ppo.micro_batch_size rows. Every rank runs the same number of
micro-steps per mini-batch (each backward reduces gradients, collectively): a rank with nothing left
runs a placeholder step of one row with weight 0, so no row counts twice and the update is the one
of the real rows. The loss of a micro-step is its tokens' sum over the token count of the WHOLE
mini-batch (`rl.learner`), so the update does not depend on how the mini-batch is cut.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tlcr_ray.rl.batch import shard_rows


@dataclass(frozen=True)
class MicroStep:
    rows: list[int]
    """Rows of the batch this rank runs in this micro-step (never empty)."""
    weight: float
    """1.0; 0.0 for a placeholder (the rank has no rows left in this mini-batch)."""
    minibatch: list[int]
    """Every row of the mini-batch, over all ranks (its token count normalises the loss)."""


def micro_rows(ppo_cfg, world_size: int) -> int:
    """Rows per micro-step: ppo.micro_batch_size, or (None) the rank's share of a mini-batch."""
    return ppo_cfg.micro_batch_size or -(-ppo_cfg.mini_batch_size // world_size)


def micro_steps_per_minibatch(mini_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient-accumulation steps of one optimizer step: ceil(ceil(mini / world) / micro)."""
    return -(-(-(-mini_batch_size // world_size)) // micro_batch_size)


def minibatches_per_epoch(batch_size: int, mini_batch_size: int) -> int:
    """Optimizer steps of one pass over a PPO batch."""
    return -(-batch_size // mini_batch_size)


def optimizer_steps_per_update(ppo_cfg, world_size: int = 1) -> int:
    """Optimizer steps of one PPO step (`PPOLearner.train` on a batch of ppo.prompts_per_step rows);
    the same for any number of ranks and any ppo.micro_batch_size."""
    return ppo_cfg.ppo_epochs * minibatches_per_epoch(ppo_cfg.prompts_per_step, ppo_cfg.mini_batch_size)


def update_is_one_pass(ppo_cfg, world_size: int) -> bool:
    """Whether one PPO update (a batch of ppo.prompts_per_step rows) is a single micro-step on a single rank:
    1 epoch, 1 mini-batch, 1 micro-batch. Its forward then runs on the weights an evaluation before it
    would see (ppo.fuse_evaluation)."""
    rows = ppo_cfg.prompts_per_step
    return (world_size == 1 and ppo_cfg.ppo_epochs == 1 and minibatches_per_epoch(rows, ppo_cfg.mini_batch_size) == 1
            and micro_rows(ppo_cfg, 1) >= rows)


def fuses_evaluation(ppo_cfg, world_size: int) -> bool:
    """ppo.fuse_evaluation auto on a one-pass update (`update_is_one_pass`) whose KL needs no reference
    logits (kl_estimator full evaluates both policies' logits together); dropout is the learner's check."""
    return (ppo_cfg.fuse_evaluation == "auto" and ppo_cfg.kl_estimator != "full"
            and update_is_one_pass(ppo_cfg, world_size))


def rank_schedule(batch_size: int, mini_batch_size: int, micro_batch_size: int, world_size: int, rank: int,
                  epochs: int, seed: int) -> list[list[MicroStep]]:
    """This rank's micro-steps, grouped by mini-batch (one optimizer step per group; module docstring)."""
    generator = torch.Generator().manual_seed(seed * 7919 + batch_size)
    steps = micro_steps_per_minibatch(mini_batch_size, micro_batch_size, world_size)
    out = []
    for _ in range(epochs):
        order = torch.randperm(batch_size, generator=generator).tolist()
        for begin in range(0, batch_size, mini_batch_size):
            minibatch = order[begin:begin + mini_batch_size]
            mine = [minibatch[i] for i in shard_rows(len(minibatch), rank, world_size)]
            group = [MicroStep(mine[k * micro_batch_size:(k + 1) * micro_batch_size], 1.0, minibatch)
                     for k in range(steps) if mine[k * micro_batch_size:(k + 1) * micro_batch_size]]
            group += [MicroStep(minibatch[:1], 0.0, minibatch)] * (steps - len(group))
            out.append(group)
    return out
