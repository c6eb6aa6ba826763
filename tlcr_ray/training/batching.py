"""Dynamic-padding collate and the per-rank micro-batch stream of the supervised stages.

    batch = collate("disc", examples[:4], pad_id=tokenizer.pad_token_id)   # tensors [B, T_max]
    stream = micro_batches(train, micro_batch_size=4, rank=0, world_size=2, seed=0, start=resume_step)
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import torch

from tlcr_ray.layout import SUPERVISED_STAGES
from tlcr_ray.training.examples import IGNORE


def pad(seqs: list[list], value) -> torch.Tensor:
    """Right-pad to the longest sequence of this batch -> [B, T_max]."""
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs])


def ids_and_mask(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = pad([[1] * len(s) for s in seqs], 0)
    return pad(seqs, pad_id), mask


def collate(stage: str, examples: list[dict], pad_id: int, with_reference: bool = True) -> dict[str, torch.Tensor]:
    """sft: input_ids, attention_mask, labels [B, T]; disc: ... targets [B, T] (float);
    rm: input_ids, attention_mask [2B, T] with the B chosen sequences first;
    dpo: as rm, plus labels [2B, T] and (with_reference) ref_logps [2B]; figa: as sft, plus weights [B, T]."""
    if stage in ("sft", "figa"):
        ids, mask = ids_and_mask([e["input_ids"] for e in examples], pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": pad([e["labels"] for e in examples], IGNORE)}
        if stage == "figa":
            batch["weights"] = pad([e["weights"] for e in examples], 0.0).float()
        return batch
    if stage == "dpo":
        sides = ("chosen", "rejected")
        ids, mask = ids_and_mask([e[f"{s}_ids"] for s in sides for e in examples], pad_id)
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": pad([e[f"{s}_labels"] for s in sides for e in examples], IGNORE)}
        if with_reference:
            batch["ref_logps"] = torch.tensor([e["ref_logps"][k] for k in (0, 1) for e in examples],
                                              dtype=torch.float32)
        return batch
    if stage == "disc":
        ids, mask = ids_and_mask([e["input_ids"] for e in examples], pad_id)
        targets = pad([e["targets"] for e in examples], float(IGNORE)).float()
        return {"input_ids": ids, "attention_mask": mask, "targets": targets}
    if stage == "rm":
        seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        ids, mask = ids_and_mask(seqs, pad_id)
        return {"input_ids": ids, "attention_mask": mask}
    raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(SUPERVISED_STAGES)}")


def micro_batches_per_epoch(num_examples: int, micro_batch_size: int, world_size: int) -> int:
    per_worker = num_examples // world_size
    if per_worker == 0:
        raise ValueError(f"{num_examples} training examples cannot feed {world_size} workers")
    return math.ceil(per_worker / micro_batch_size)


def micro_batches(examples: list[dict], micro_batch_size: int, rank: int, world_size: int, seed: int,
                  start: int = 0) -> Iterator[list[dict]]:
    """Endless micro-batches for one worker, reshuffled each epoch; `start` skips ahead (resume).

    Every worker gets the same number per epoch, so the collectives of data-parallel ranks stay in step.
    """
    per_epoch = micro_batches_per_epoch(len(examples), micro_batch_size, world_size)
    per_worker = len(examples) // world_size
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        shard = order[rank::world_size][:per_worker]
        for j in range(offset, per_epoch):
            yield [examples[i] for i in shard[j * micro_batch_size:(j + 1) * micro_batch_size]]
        index = (epoch + 1) * per_epoch


def total_steps(num_examples: int, train_cfg, world_size: int) -> int:
    """Optimizer steps of the run: `max_steps`, else `epochs` worth of micro-batches / grad_accum."""
    if train_cfg.max_steps is not None:
        return train_cfg.max_steps
    per_epoch = micro_batches_per_epoch(num_examples, train_cfg.micro_batch_size, world_size)
    return max(1, int(train_cfg.epochs * per_epoch / train_cfg.grad_accum))
