"""Levenshtein token labels (docs/algorithm.md §3): what the reviser deleted is negative, what it added is positive.

    from tlcr_ray.labeling.labels import label_pair, write_labels
    rows = label_pair(tokenizer, pair.pair_id, pair.prompt, pair.rejected, revised)   # 2 LabeledSequence
    write_labels("runs/demo/label/labels.jsonl", rows)

`Levenshtein.editops(rejected_ids, revised_ids)` gives a minimal edit script: rejected tokens hit by a
delete or replace get 0, revised tokens hit by an insert or replace get 1, every other response token
0.5, prompt tokens IGNORE (-100, skipped by the loss). Both sequences end with the tokenizer's EOS
(unless the response was truncated), labelled 0.5: the stop action PPO rewards has a target. It is
C code (the paper's Python DP labelled ~8 pairs/s); bench/bench_labels.py measures it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import Levenshtein

from tlcr_ray.data.tokens import append_eos, encode_prompt_response
from tlcr_ray.io import iter_jsonl, write_jsonl_atomic

NEGATIVE, NEUTRAL, POSITIVE, IGNORE = 0.0, 0.5, 1.0, -100.0
KINDS = ("rejected", "revised")


@dataclass
class LabeledSequence:
    pair_id: str
    kind: str
    """"rejected" (prompt + rejected response) or "revised" (prompt + revised response)."""
    input_ids: list[int]
    labels: list[float]
    """Same length as input_ids: -100 for prompt tokens, else 0 (negative), 0.5 (neutral), 1 (positive)."""


def _as_int_list(ids) -> list[int]:
    # editops on torch tensors returns wrong edits without complaint (seen with Levenshtein 0.27): plain ints.
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def edit_labels(rejected_ids: list[int], revised_ids: list[int]) -> tuple[list[float], list[float]]:
    """Per-token labels of two responses from a minimal edit script: ([len(rejected)], [len(revised)])."""
    rejected_ids, revised_ids = _as_int_list(rejected_ids), _as_int_list(revised_ids)
    rejected = [NEUTRAL] * len(rejected_ids)
    revised = [NEUTRAL] * len(revised_ids)
    for op, i, j in Levenshtein.editops(rejected_ids, revised_ids):
        if op != "insert":      # delete or replace: the reviser removed rejected token i
            rejected[i] = NEGATIVE
        if op != "delete":      # insert or replace: the reviser wrote revised token j
            revised[j] = POSITIVE
    return rejected, revised


def label_pair(tokenizer, pair_id: str, prompt: str, rejected: str, revised: str,
               max_prompt_len: int | None = None, max_response_len: int | None = None) -> list[LabeledSequence]:
    """The two training sequences of a pair: prompt+rejected+EOS and prompt+revised+EOS, jointly tokenized.

    Both end with the tokenizer's EOS (the stop action every finished PPO response ends with), which
    the edit script aligns to itself: it is labelled neutral (0.5). A response cut at `max_response_len`
    did not end, so it gets no EOS. The edit script runs on the responses without their EOS, so a pair
    where only one side was cut labels the same tokens as one where neither was.
    """
    eos = tokenizer.eos_token_id
    encoded = [append_eos(encode_prompt_response(tokenizer, prompt, text, max_prompt_len, max_response_len), eos)
               for text in (rejected, revised)]
    has_eos = [eos is not None and enc.response_ids[-1:] == [eos] for enc in encoded]
    bodies = [enc.response_ids[:len(enc.response_ids) - ended] for enc, ended in zip(encoded, has_eos)]
    labels = edit_labels(*bodies)
    return [
        LabeledSequence(pair_id, kind, enc.input_ids, [IGNORE] * enc.response_start + body + [NEUTRAL] * ended)
        for kind, enc, body, ended in zip(KINDS, encoded, labels, has_eos)
    ]


def write_labels(path: str | Path, rows: list[LabeledSequence]) -> None:
    """Write rows as JSONL, atomically (temp file + rename): a crash never leaves a half file."""
    write_jsonl_atomic(path, (asdict(row) for row in rows))


def _check_row(raw: object, where: str) -> LabeledSequence:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for field in ("pair_id", "kind", "input_ids", "labels"):
        if field not in raw:
            raise ValueError(f"{where}: field {field!r} is missing")
    if raw["kind"] not in KINDS:
        raise ValueError(f"{where}: field 'kind' must be rejected or revised, got {raw['kind']!r}")
    ids, labels = raw["input_ids"], raw["labels"]
    if not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
        raise ValueError(f"{where}: field 'input_ids' must be a list of integers")
    if not (isinstance(labels, list) and all(v in (IGNORE, NEGATIVE, NEUTRAL, POSITIVE) for v in labels)):
        raise ValueError(f"{where}: field 'labels' must hold only -100, 0, 0.5 or 1")
    if len(ids) != len(labels):
        raise ValueError(f"{where}: field 'labels' has {len(labels)} entries for {len(ids)} input_ids")
    return LabeledSequence(str(raw["pair_id"]), raw["kind"], ids, [float(v) for v in labels])


def read_labels(path: str | Path) -> list[LabeledSequence]:
    """Read a labels JSONL file; a malformed line raises ValueError naming the file, line and field."""
    return [_check_row(raw, f"{path}:{line_no}") for line_no, raw in iter_jsonl(path)]
