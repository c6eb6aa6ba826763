"""Preference pairs: load HH-RLHF-format dialogues, split prompt/response, partition 20/40/40.

    from tlcr_ray.data.pairs import load_pairs, partition
    pairs, skipped = load_pairs("data/hh-rlhf/harmless-base/test.jsonl.gz")
    parts = partition(pairs, (0.2, 0.4, 0.4), seed=0)        # {"sft": [...], "reward": [...], "rl": [...]}

A row holds two full dialogues, `chosen` and `rejected` ("\\n\\nHuman: ...\\n\\nAssistant: ..."). The prompt
is `chosen` up to and including its last "\\n\\nAssistant:"; the responses are the rest, kept verbatim
(the leading space after "Assistant:" included). When the two dialogues already differ before that
turn, the prompt is their longest common prefix cut back to its last "\\n\\nAssistant:" (docs/algorithm.md §1).
Sources: .jsonl, .jsonl.gz, .parquet, `hf:<hub id>` (needs `pip install datasets`), or `planted:<source>`
(the known-truth planted-phrase set made from another source on load: `tlcr_ray.data.planted`).
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from tlcr_ray.choices import ON_BAD_ROW, PARTS, SPLITS  # noqa: F401  (one definition, checked by the config)
from tlcr_ray.io import JsonlError, iter_jsonl

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


def hh_dialogue(messages: list[dict]) -> str:
    """Chat messages ({"role": "user" | "assistant", "content"}) in the HH-RLHF format the policy was trained on,
    ending with the assistant's turn open: "\\n\\nHuman: q\\n\\nAssistant: a ... \\n\\nAssistant:". What a base
    model without a chat template (e.g. Llama-2-7b-hf after SFT on HH) is prompted with."""
    text = ""
    for m in messages:
        if m["role"] not in ("user", "assistant", "system"):
            raise ValueError(f"message role {m['role']!r}: expected user, assistant or system")
        marker = ASSISTANT if m["role"] == "assistant" else HUMAN  # HH has no system turn: a human one
        text += f"{marker} {m['content'].strip()}"
    return text + ASSISTANT


class DataError(ValueError):
    """A data file or row is unusable; the message names the file, the line and the field."""


@dataclass(frozen=True)
class PreferencePair:
    pair_id: str
    """sha1 of the raw chosen+rejected text, first 16 hex: stable across runs and machines."""
    prompt: str
    chosen: str
    """The preferred response only (the text after the prompt)."""
    rejected: str
    source: str
    """Where the row came from: "file:line"."""


class Split(NamedTuple):
    prompt: str
    chosen: str
    rejected: str
    fallback: bool
    """The dialogues differ before chosen's last Assistant turn: the prompt is their common prefix."""


class _BadRow(Exception):
    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(detail)
        self.reason, self.field = reason, field


def pair_id(chosen: str, rejected: str) -> str:
    return hashlib.sha1((chosen + rejected).encode("utf-8")).hexdigest()[:16]


def split_dialogue(chosen: str, rejected: str) -> Split:
    """Split two full dialogues into (prompt, chosen response, rejected response); raises _BadRow."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise _BadRow("no_assistant_turn", "chosen", 'no "\\n\\nAssistant:" turn')
    prompt = chosen[: cut + len(ASSISTANT)]
    fallback = rejected[: rejected.rfind(ASSISTANT) + len(ASSISTANT)] != prompt
    if fallback:
        common = os.path.commonprefix([chosen, rejected])
        cut = common.rfind(ASSISTANT)
        if cut < 0:
            raise _BadRow("no_common_prompt", "rejected",
                          'chosen and rejected share no prefix ending in "\\n\\nAssistant:"')
        prompt = common[: cut + len(ASSISTANT)]
    chosen_response, rejected_response = chosen[len(prompt):], rejected[len(prompt):]
    # Whitespace-only responses are real data (HH has chosen == " ": saying nothing was preferred);
    # only a response with no characters at all leaves nothing to tokenize.
    for field, response in (("chosen", chosen_response), ("rejected", rejected_response)):
        if not response:
            raise _BadRow("empty_response", field, "the response after the prompt is empty")
    if chosen_response == rejected_response:
        raise _BadRow("identical_responses", "rejected", "chosen and rejected responses are identical")
    return Split(prompt, chosen_response, rejected_response, fallback)


# ---------------------------------------------------------------- raw rows: (line number, row | error)

def _json_rows(path: str) -> Iterator[tuple[int, dict | _BadRow]]:
    for line_no, row in iter_jsonl(path, on_invalid="yield"):
        if isinstance(row, JsonlError):
            yield line_no, _BadRow("invalid_json", "-", str(row).split(": ", 1)[1])
        else:
            yield line_no, row if isinstance(row, dict) else _BadRow("not_an_object", "-", "not a JSON object")


def _parquet_rows(path: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def _hub_rows(hub_id: str, split: str) -> Iterator[tuple[int, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{hub_id}: reading a hub dataset needs the `datasets` package "
                        "(pip install 'tlcr-ray[hub]' or pip install datasets)") from None
    try:
        dataset = datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # the hub client raises many types; the user needs the message
        raise DataError(f"hf:{hub_id}: cannot load split {split!r}: {exc}") from exc
    for row_no, row in enumerate(dataset, 1):
        yield row_no, row


def _raw_rows(path: str, hub_split: str) -> Iterator[tuple[int, dict | _BadRow]]:
    if path.startswith("hf:"):
        return _hub_rows(path[3:], hub_split)
    if path.startswith("planted:"):  # generated on load from another source: tlcr_ray.data.planted
        from tlcr_ray.data.planted import planted_rows

        return enumerate(planted_rows(path[len("planted:"):]), 1)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return _json_rows(path)
    if path.endswith(".parquet"):
        return _parquet_rows(path)
    raise DataError(f"{path}: unknown format; expected .jsonl, .jsonl.gz, .parquet or hf:<hub id>")


def _read(path: str, on_bad_row: str, hub_split: str) -> tuple[list[PreferencePair], Counter, Counter]:
    """-> (pairs, skip reasons, notes: rows read, fallback splits, rejected not starting with the prompt)."""
    if on_bad_row not in ON_BAD_ROW:
        raise DataError(f"on_bad_row must be one of {', '.join(ON_BAD_ROW)}, got {on_bad_row!r}")
    pairs, skipped, notes = [], Counter(), Counter()
    seen: set[str] = set()
    for line_no, row in _raw_rows(path, hub_split):
        notes["rows"] += 1
        try:
            if isinstance(row, _BadRow):
                raise row
            for field in ("chosen", "rejected"):
                if not isinstance(row.get(field), str):
                    kind = "missing" if row.get(field) is None else type(row[field]).__name__
                    raise _BadRow(f"bad_field_{field}", field, f"expected a string, got {kind}")
            split = split_dialogue(row["chosen"], row["rejected"])
            pid = pair_id(row["chosen"], row["rejected"])
            if pid in seen:
                raise _BadRow("duplicate", "-", "the same chosen/rejected pair appeared earlier")
        except _BadRow as bad:
            if on_bad_row == "error":
                raise DataError(f"{path}:{line_no}: field {bad.field!r}: {bad} "
                                "(set data.on_bad_row=skip to skip such rows)") from None
            skipped[bad.reason] += 1
            continue
        seen.add(pid)
        notes["fallback_split"] += split.fallback
        notes["rejected_not_prefixed"] += not row["rejected"].startswith(
            row["chosen"][: row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)])
        pairs.append(PreferencePair(pid, split.prompt, split.chosen, split.rejected, f"{path}:{line_no}"))
    return pairs, skipped, notes


def load_pairs(path: str, *, on_bad_row: str = "error",
               hub_split: str = "test") -> tuple[list[PreferencePair], dict[str, int]]:
    """Every usable pair of a file (in file order) and the skipped rows' reasons -> counts."""
    pairs, skipped, _ = _read(path, on_bad_row, hub_split)
    return pairs, dict(skipped)


def _rank(pair: PreferencePair, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{pair.pair_id}".encode()).hexdigest()


def partition(pairs: list[PreferencePair], fractions=(0.2, 0.4, 0.4),
              seed: int = 0) -> dict[str, list[PreferencePair]]:
    """Deterministic seeded 3-way split into "sft", "reward", "rl".

    Pairs are ordered by a seeded hash of their id and cut by the fractions, so the split depends only
    on the ids and the seed (not on file order), and adding rows moves only pairs near the cut points.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"data.fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    ordered = sorted(pairs, key=lambda p: _rank(p, seed))
    first = round(fractions[0] * len(ordered))
    second = first + round(fractions[1] * len(ordered))
    return {"sft": ordered[:first], "reward": ordered[first:second], "rl": ordered[second:]}


def load_split(data_cfg, split: str | None = None) -> tuple[list[PreferencePair], dict]:
    """The pairs of one partition (`sft`, `reward`, `rl`, or `all`), cut to `data_cfg.max_pairs`.

    -> (pairs, stats): stats = path, split, rows read, kept, skipped by reason, fallback splits, selected.
    """
    split = split or data_cfg.split
    if split not in SPLITS:
        raise DataError(f"data.split must be one of {', '.join(SPLITS)}; got {split!r}")
    pairs, skipped, notes = _read(data_cfg.path, data_cfg.on_bad_row, data_cfg.hub_split)
    chosen = pairs if split == "all" else partition(pairs, data_cfg.fractions, data_cfg.seed)[split]
    if data_cfg.max_pairs is not None:
        chosen = chosen[: data_cfg.max_pairs]
    stats = {"path": data_cfg.path, "split": split, "rows": notes["rows"], "kept": len(pairs),
             "skipped": dict(skipped), "fallback_split": notes["fallback_split"],
             "rejected_not_prefixed": notes["rejected_not_prefixed"], "selected": len(chosen)}
    return chosen, stats


def rl_prompt_pools(pairs: list[PreferencePair], n_eval: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The RL partition (as `load_split(data, "rl")` gives it) -> (PPO's training pairs, held-out pairs).

    The held-out pairs are the last `n_eval` (`pipeline.eval_prompts`) in the partition's hashed order;
    PPO trains on the others, less any whose prompt text is a held-out prompt, so the report's prompts
    are never training prompts (docs/algorithm.md §1). The PPO controller and the report both call
    this, so they cannot disagree. Raises ConfigError when nothing would be left to train on.
    """
    from tlcr_ray.config import ConfigError

    if n_eval < 0:
        raise ConfigError(f"pipeline.eval_prompts: must be >= 0, got {n_eval}")
    if n_eval >= len(pairs):
        raise ConfigError(f"pipeline.eval_prompts={n_eval}: the RL partition has only {len(pairs)} pairs "
                          "(after data.max_pairs), so no PPO prompt would be left; lower pipeline.eval_prompts "
                          "or use more pairs")
    held_out = pairs[len(pairs) - n_eval:]
    eval_prompts = {p.prompt for p in held_out}
    train = [p for p in pairs[:len(pairs) - n_eval] if p.prompt not in eval_prompts]
    if not train:
        raise ConfigError(f"pipeline.eval_prompts={n_eval}: every other pair of the RL partition repeats a "
                          "held-out prompt; no PPO prompt would be left")
    return train, held_out
