"""The supervised stages (SFT, discriminator, RM) in pure torch: examples, batching, losses, the
optimizer side and the per-rank loop body that `actors/supervised.py` runs under Ray Train.

    from tlcr_ray import training
    batch = training.collate("disc", examples[:4], pad_id=tokenizer.pad_token_id)
    loss, correct, counted = training.compute_loss("disc", model, batch)
"""
from tlcr_ray.training.batching import collate, ids_and_mask, micro_batches, micro_batches_per_epoch, pad, total_steps
from tlcr_ray.training.examples import (
                                        IGNORE,
                                        disc_examples,
                                        is_heldout,
                                        rm_examples,
                                        sft_examples,
                                        split_heldout,
                                        stage_examples,
                                        stage_init,
                                        truncate,
)
from tlcr_ray.training.losses import StepStats, compute_loss, disc_loss, rm_loss, sft_loss
from tlcr_ray.training.optim import deepspeed_config, lr_factor, param_groups, stage_deepspeed_config

__all__ = ["collate", "ids_and_mask", "micro_batches", "micro_batches_per_epoch", "pad", "total_steps", "IGNORE",
           "disc_examples", "is_heldout", "rm_examples", "sft_examples", "split_heldout", "stage_examples",
           "stage_init", "truncate", "StepStats", "compute_loss", "disc_loss", "rm_loss", "sft_loss",
           "deepspeed_config", "lr_factor", "param_groups", "stage_deepspeed_config"]
