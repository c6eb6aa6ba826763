"""Losses of the supervised stages and their step statistics (docs/algorithm.md §4).

    sft   cross-entropy on response tokens only
    disc  BCE with soft targets 0 / 0.5 / 1, mean over labelled tokens
    rm    Bradley-Terry: -log sigmoid(s_chosen - s_rejected)
    dpo   -log sigmoid(beta * implicit reward margin), reference log-probs precomputed (training/dpo.py, §10)
    figa  FIGA's weighted token cross-entropy on revised and rejected responses (training/figa.py, §10)

    loss, correct, counted = compute_loss("disc", model, batch)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tlcr_ray.layout import SUPERVISED_STAGES
from tlcr_ray.training.examples import IGNORE


@dataclass
class StepStats:
    """Sums over micro-batches; `correct / counted` is the stage's token (or pair) accuracy."""

    loss: float = 0.0
    correct: int = 0
    counted: int = 0
    tokens: int = 0
    micro_batches: int = 0

    def add(self, loss: float, correct: int, counted: int, tokens: int) -> None:
        self.loss += loss
        self.correct += correct
        self.counted += counted
        self.tokens += tokens
        self.micro_batches += 1

    def summary(self) -> dict[str, float]:
        return {"loss": self.loss / max(1, self.micro_batches), "accuracy": self.correct / max(1, self.counted),
                "tokens": self.tokens}


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """logits [B, T, V], labels [B, T] -> (mean CE over response tokens, correct next tokens, counted)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    valid = labels != IGNORE
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss, int(correct), int(valid.sum())


def disc_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """logits, targets [B, T] -> (BCE mean over labelled tokens, correct non-neutral tokens, counted).

    Accuracy counts only tokens labelled 0 or 1 (as in the paper); neutral 0.5 tokens train but are not scored.
    """
    labelled = targets != IGNORE
    loss = F.binary_cross_entropy_with_logits(logits[labelled], targets[labelled])
    decided = labelled & (targets != 0.5)
    correct = ((logits > 0) == (targets > 0.5)) & decided
    return loss, int(correct.sum()), int(decided.sum())


def rm_loss(scores: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """scores [2B] (chosen first) -> (mean -log sigmoid(chosen - rejected), pairs ranked right, pairs)."""
    chosen, rejected = scores.float().chunk(2)
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), int((margin > 0).sum()), margin.numel()


def compute_loss(stage: str, model: nn.Module, batch: dict[str, torch.Tensor],
                 train_cfg=None) -> tuple[torch.Tensor, int, int]:
    """One forward of `model` on a collated batch -> (loss, correct, counted); `train_cfg` (the stage's
    section) carries dpo.beta and figa.bad_token_max_ce."""
    from tlcr_ray.training.dpo import dpo_loss, response_logps
    from tlcr_ray.training.figa import figa_loss

    ids, mask = batch["input_ids"], batch["attention_mask"]
    if stage == "sft":
        return sft_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, batch["labels"])
    if stage == "dpo":
        logps = response_logps(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, batch["labels"])
        return dpo_loss(logps, batch["ref_logps"], train_cfg.beta)
    if stage == "figa":
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return figa_loss(logits, batch["labels"], batch["weights"], train_cfg.bad_token_max_ce)
    if stage == "disc":
        return disc_loss(model(ids, mask), batch["targets"])
    if stage == "rm":
        return rm_loss(model(ids, mask))
    raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(SUPERVISED_STAGES)}")
