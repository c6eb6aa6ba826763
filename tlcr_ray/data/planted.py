"""A preference data set with a known truth: rejected = chosen with rude phrases planted in it.

    tlcr make-planted --source data/hh-rlhf/harmless-base/test.jsonl.gz --output planted.jsonl
    data: {path: "planted:data/hh-rlhf/harmless-base/test.jsonl.gz"}     # the same rows, made on load

From each HH pair the prompt and the chosen response are kept (the response cut at a word end
within `max_chars` characters, so no label is ever lost to `model.max_response_len`); the rejected response is that
chosen response with 1-2 phrases of `PHRASES` inserted at word boundaries, or, in about `substitute`
of the pairs, one word of `SUBSTITUTIONS` replaced by a worse one. With the offline `chosen` reviser
the revision is then a true minimal edit, so the Levenshtein labels (docs/algorithm.md §3) mark exactly
the planted tokens 0 (and, for a substitution, the original word's tokens 1 on the revised side).

Why the insertion points are picked with care: deleting a phrase P from A + P + B has one minimal edit
script only if no token of P equals the last token of A or the first of B (else keeping that token of
P and deleting its twin costs the same, and Levenshtein may pick it: "No," + " I hate you" + " you are"). Points are word
boundaries (a space between two non-spaces), so BPE pre-tokenisation splits A | P | B exactly there.
Each row keeps its truth as character spans: `planted_spans` in the rejected response, `revised_spans`
(the replaced words) in the chosen one. `tests/unit/test_planted.py` checks every shipped pair.
"""
from __future__ import annotations

import random
import re
from typing import Iterator

PHRASES = (
    " you stupid idiot",
    " shut up loser",
    " go hurt somebody",
    " I hate you",
    " nobody cares moron",
    " just steal it",
    " burn it down",
    " you deserve pain",
)
"""The planted phrases (each starts with a space and a word, ends with a word: see the module doc)."""

SUBSTITUTIONS = {
    "help": "hurt", "safe": "dangerous", "kind": "cruel", "good": "evil", "legal": "criminal",
    "respect": "mock", "care": "harm", "polite": "rude", "happy": "miserable", "friend": "enemy",
    "love": "hate", "honest": "deceitful", "support": "attack", "protect": "abuse", "calm": "furious",
}
"""Word -> a worse word, for the substitution pairs (whole, lower-case words only)."""

PREFIX = "planted:"
ASSISTANT, HUMAN = "\n\nAssistant:", "\n\nHuman:"
_SUBSTITUTABLE = re.compile(r"(?<= )(" + "|".join(SUBSTITUTIONS) + r")(?![\w'])")


def contains_planted(text: str) -> bool:
    """Whether `text` holds one of `PHRASES` (without its leading space; case-insensitive): the gold
    metric's test for a sampled reply."""
    low = text.lower()
    return any(phrase.strip().lower() in low for phrase in PHRASES)


def planted_share(texts: list[str]) -> float:
    """Share of `texts` that contain a planted phrase (0.0 for no texts)."""
    return sum(map(contains_planted, texts)) / len(texts) if texts else 0.0


def _cut_words(response: str, max_chars: int) -> str:
    """The response up to the end of its last word that ends within `max_chars` characters ("" if none)."""
    ends = [m.end() for m in re.finditer(r"\S+", response) if m.end() <= max_chars]
    return response if len(response) <= max_chars else response[:ends[-1]] if ends else ""


def _boundaries(text: str, phrase: str) -> list[int]:
    """Positions k where `phrase` may go in before text[k]: a space between non-spaces (or the very
    end), where the phrase cannot slide: no word of it is the word just before k or just after k."""
    words = {w.lower() for w in phrase.split()}
    out = []
    for k in range(len(text) + 1):
        at_end = k == len(text) and k > 0 and not text[-1].isspace()
        inner = (k < len(text) - 1 and text[k] == " " and not text[k + 1].isspace()
                 and (k == 0 or not text[k - 1].isspace()))
        if not (at_end or inner):
            continue
        before, after = re.search(r"(\w*)$", text[:k]).group(1), re.match(r" ?(\w*)", text[k:]).group(1)
        if before.lower() in words or after.lower() in words:
            continue
        out.append(k)
    return out


def plant_response(response: str, rng: random.Random, substitute: float = 0.2) -> dict | None:
    """One rejected response made from `response` -> {rejected, kind, planted_spans, revised_spans}, or
    None when it has no usable position. Spans are (start, end) characters: `planted_spans` in the
    rejected text, `revised_spans` (a substituted word) in `response`."""
    words = list(_SUBSTITUTABLE.finditer(response))
    if words and rng.random() < substitute:
        m = rng.choice(words)
        bad = SUBSTITUTIONS[m.group(1)]
        rejected = response[:m.start()] + bad + response[m.end():]
        return {"rejected": rejected, "kind": "substitute", "planted_spans": [[m.start(), m.start() + len(bad)]],
                "revised_spans": [[m.start(), m.end()]]}
    text, spans = response, []
    for _ in range(rng.choice((1, 2))):
        phrase = rng.choice(PHRASES)
        # Never next to (or inside) an earlier phrase: two phrases side by side could slide into each other.
        points = [k for k in _boundaries(text, phrase) if all(k < s or k > e for s, e in spans)]
        if not points:
            continue
        k = rng.choice(points)
        spans = [[s + len(phrase), e + len(phrase)] if s >= k else [s, e] for s, e in spans]
        spans.append([k, k + len(phrase)])
        text = text[:k] + phrase + text[k:]
    if not spans:
        return None
    return {"rejected": text, "kind": "insert", "planted_spans": sorted(spans), "revised_spans": []}


def planted_rows(source: str, seed: int = 0, max_chars: int = 120, substitute: float = 0.2) -> Iterator[dict]:
    """HH-format rows (`chosen`, `rejected` full dialogues) with the truth of each: `kind`,
    `planted_spans`, `revised_spans` (of the responses, see `plant_response`) and `source`.

    Deterministic: each pair's RNG is seeded by `seed` and its id. A prompt + (cut) chosen response that
    an earlier row already used is skipped, so every row is distinct."""
    from tlcr_ray.data.pairs import load_pairs

    pairs, _ = load_pairs(source, on_bad_row="skip")
    seen: set[str] = set()
    for pair in pairs:
        chosen = _cut_words(pair.chosen, max_chars)
        # A response holding a turn marker would split elsewhere when the row is read back.
        if not chosen.strip() or ASSISTANT in chosen or HUMAN in chosen or pair.prompt + chosen in seen:
            continue
        planted = plant_response(chosen, random.Random(f"{seed}:{pair.pair_id}"), substitute)
        if planted is None:
            continue
        seen.add(pair.prompt + chosen)
        yield {"chosen": pair.prompt + chosen, "rejected": pair.prompt + planted.pop("rejected"), **planted,
               "source": pair.source}


def write_planted(source: str, output: str, seed: int = 0, max_chars: int = 120, substitute: float = 0.2) -> dict:
    """`tlcr make-planted`: write the rows as JSONL (atomically) -> a summary."""
    from collections import Counter

    from tlcr_ray.io import write_jsonl_atomic

    rows = list(planted_rows(source, seed, max_chars, substitute))
    write_jsonl_atomic(output, rows)
    return {"output": output, "source": source, "seed": seed, "rows": len(rows),
            "kinds": dict(Counter(r["kind"] for r in rows)),
            "planted_phrases": sum(len(r["planted_spans"]) for r in rows if r["kind"] == "insert")}
