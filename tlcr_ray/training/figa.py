"""FIGA (Guo et al., ICLR 2024, "Beyond Imitation: Leveraging Fine-grained Quality Signals for Alignment")
on the Levenshtein labels of docs/algorithm.md §3: per-token weights and the weighted loss (§10).

    weights = token_weights(row.labels, row.kind, ends_with_eos, alpha=1.0, beta=0.5, gamma=0.0)
    loss, correct, counted = figa_loss(logits, labels, weights, max_bad_ce=0.6)

The weights and the loss follow the released code (RUCAIBox/FIGA, `modeling_llama.py`, the "FIGA main
method" branch, and `train.py`'s masks): revised tokens the reviser added or substituted (label 1) and
the revised response's final EOS get +alpha; rejected tokens it deleted or substituted (label 0) get
-beta, and only while the policy's cross-entropy on them is at most `max_bad_ce`; the revised side's
unchanged tokens get gamma and the rejected side's get 0. The loss is sum_t w_t * CE_t over the
micro-batch divided by the number of tokens with w_t != 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tlcr_ray.labeling.labels import IGNORE as LABEL_IGNORE
from tlcr_ray.labeling.labels import NEGATIVE, POSITIVE

IGNORE = -100


def token_weights(labels: list[float], kind: str, ends_with_eos: bool, alpha: float, beta: float,
                  gamma: float) -> list[float]:
    """One LabeledSequence's labels ([T]: -100 prompt, 0 / 0.5 / 1 response) -> FIGA weights [T].

    revised: 1 -> alpha, 0.5 -> gamma, final EOS -> alpha; rejected: 0 -> -beta, else 0; prompt: 0.
    """
    if kind not in ("revised", "rejected"):
        raise ValueError(f"FIGA weights: kind must be revised or rejected, got {kind!r}")
    weights = []
    for label in labels:
        if label == LABEL_IGNORE:
            weights.append(0.0)
        elif kind == "revised":
            weights.append(alpha if label == POSITIVE else gamma)
        else:
            weights.append(-beta if label == NEGATIVE else 0.0)
    if kind == "revised" and ends_with_eos and labels and labels[-1] != LABEL_IGNORE:
        weights[-1] = alpha  # the stop action of the good response is imitated (the released code's mask)
    return weights


def figa_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
              max_bad_ce: float | None) -> tuple[torch.Tensor, int, int]:
    """logits [B, T, V], labels [B, T] (IGNORE off the response), weights [B, T] -> (loss, correct, counted).

    Position t predicts token t+1, so labels and weights shift by one as in SFT. A negative weight whose
    token already has CE_t > max_bad_ce (p < exp(-max_bad_ce)) is dropped: the unlikelihood term stops
    once the policy no longer favours the token, which also keeps it from diverging to -inf.
    correct / counted: next-token argmax hits / tokens with a positive weight.
    """
    logits, labels, weights = logits[:, :-1].float(), labels[:, 1:], weights[:, 1:].float()
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # [B, T-1]
    if max_bad_ce is not None:
        weights = torch.where((weights < 0) & (ce.detach() > max_bad_ce), torch.zeros_like(weights), weights)
    weights = weights * (labels != IGNORE)
    active = int((weights != 0).sum())
    loss = (ce * weights).sum() / max(active, 1)
    positive = weights > 0
    correct = ((logits.argmax(-1) == labels) & positive).sum()
    return loss, int(correct), int(positive.sum())
