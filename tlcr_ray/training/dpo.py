"""DPO (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model") on the reward partition's pairs, with the SFT model as the reference (docs/algorithm.md §10).

    logps = response_logps(model(input_ids=ids, attention_mask=mask).logits, labels)     # [2B]
    loss, right, pairs = dpo_loss(logps, ref_logps, beta=0.1)
    ref = cached_reference_logps(path, examples, reference, compute)   # computed once, then read

The reference log-probs are computed once, before training, and cached in the stage folder
(`dpo/reference_logps.json`, atomically), so the reference model is never in memory while the policy
trains and a resumed or rerun stage does not compute them again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from tlcr_ray.io import read_json, write_json_atomic

IGNORE = -100


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [N, T, V], labels [N, T] (token ids on the response, IGNORE elsewhere) ->
    [N] sum over response tokens of log pi(token_{t+1} | tokens <= t)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    return -F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none").sum(-1)


def implicit_margins(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """policy, reference [2B] summed log-probs, the B chosen first -> [B] implicit reward margins
    beta * ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected))."""
    chosen, rejected = (policy.float() - reference.float()).chunk(2)
    return beta * (chosen - rejected)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, int, int]:
    """[2B] policy and reference log-probs (chosen first) -> (mean -log sigmoid(margin), margins > 0, B)."""
    margin = implicit_margins(policy, reference, beta)
    return -F.logsigmoid(margin).mean(), int((margin > 0).sum()), margin.numel()


def fingerprint(examples: list[dict], reference: str) -> str:
    """What the cached log-probs depend on: the reference folder (path, file sizes, mtimes) and every
    example's token ids. A retrained SFT model or other data makes the cache stale."""
    digest = hashlib.sha1()
    folder = Path(reference)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    digest.update(json.dumps([str(folder.resolve()) if folder.exists() else reference,
                              [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]).encode())
    for e in examples:
        digest.update(json.dumps([e["pair_id"], e["chosen_ids"], e["chosen_labels"], e["rejected_ids"],
                                  e["rejected_labels"]]).encode())
    return digest.hexdigest()


def read_cached(path: str | Path, examples: list[dict], reference: str) -> dict[str, list[float]] | None:
    """{pair_id: [log pi_ref(chosen), log pi_ref(rejected)]} from the cache, or None when it is absent or stale."""
    path = Path(path)
    if not path.exists():
        return None
    cached = read_json(path)
    if cached.get("fingerprint") != fingerprint(examples, reference):
        return None
    return cached["logps"]


def write_cached(path: str | Path, examples: list[dict], reference: str, logps: dict[str, list[float]]) -> None:
    missing = [e["pair_id"] for e in examples if e["pair_id"] not in logps]
    if missing:
        raise ValueError(f"reference log-probs missing for {len(missing)} pairs (e.g. {missing[0]})")
    write_json_atomic(Path(path), {"reference": reference, "fingerprint": fingerprint(examples, reference),
                                   "pairs": len(examples), "logps": logps}, indent=None)


def cached_reference_logps(path: str | Path, examples: list[dict], reference: str,
                           compute: Callable[[list[dict]], dict[str, list[float]]]) -> dict[str, list[float]]:
    """The reference log-probs of `examples`: read from `path`, else `compute(examples)` and cache them."""
    cached = read_cached(path, examples, reference)
    if cached is not None:
        return cached
    logps = compute(examples)
    write_cached(path, examples, reference, logps)
    return logps


@torch.no_grad()
def compute_reference_logps(model, examples: list[dict], pad_id: int, micro_batch_size: int,
                            device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """One no-grad forward of the reference per micro-batch -> {pair_id: [chosen, rejected]}."""
    from tlcr_ray.training.batching import collate

    model.eval()
    out = {}
    for i in range(0, len(examples), micro_batch_size):
        chunk = examples[i:i + micro_batch_size]
        batch = {k: v.to(device) for k, v in collate("dpo", chunk, pad_id, with_reference=False).items()}
        logps = response_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False).logits,
                               batch["labels"])
        chosen, rejected = logps.chunk(2)
        for e, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            out[e["pair_id"]] = [c, r]
    return out


def attach(examples: list[dict], logps: dict[str, list[float]]) -> None:
    """Store each example's reference log-probs in it (`ref_logps`), for `collate("dpo", ...)`."""
    for e in examples:
        e["ref_logps"] = logps[e["pair_id"]]
