"""Token-labelling throughput: Levenshtein.editops labels vs a pure-Python O(nm) DP, ~300-token pairs.

    .venv/bin/python bench/bench_labels.py [--pairs 2000] [--dp-pairs 20] [--tokens 300]

Pairs are real HH-RLHF responses tokenized jointly with their prompt by the SmolLM2 tokenizer
(tokenization timed and reported on its own), then extended with the next pairs' response tokens to
exactly --tokens tokens each. Two revision kinds: `chosen` (the offline reviser: a different response)
and `minimal` (the rejected ids with ~5% token edits, like an LLM's minimal revision). One process, one
thread: the figure is per core. Goal: >= 20,000 pairs/s.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import Levenshtein  # noqa: E402

from bench.common import record  # noqa: E402
from tlcr_ray.data.pairs import load_pairs  # noqa: E402
from tlcr_ray.data.tokens import encode_prompt_response  # noqa: E402
from tlcr_ray.labeling.labels import edit_labels  # noqa: E402
from tlcr_ray.models import embedded_tokenizer_dir, load_tokenizer  # noqa: E402

DATA = "data/hh-rlhf/harmless-base/test.jsonl.gz"


def dp_labels(rejected: list[int], revised: list[int]) -> tuple[list[float], list[float], int]:
    """The paper's approach: full edit-distance table, backtrace preferring delete > insert > substitute."""
    n, m = len(rejected), len(revised)
    dist = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        dist[i][0] = i
    for j in range(m + 1):
        dist[0][j] = j
    for i in range(1, n + 1):
        row, prev, a = dist[i], dist[i - 1], rejected[i - 1]
        for j in range(1, m + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a != revised[j - 1]))
    labels_rej, labels_rev = [0.5] * n, [0.5] * m
    i, j, edits = n, m, 0
    while i or j:
        if i and dist[i][j] == dist[i - 1][j] + 1:
            i, edits = i - 1, edits + 1
            labels_rej[i] = 0.0
        elif j and dist[i][j] == dist[i][j - 1] + 1:
            j, edits = j - 1, edits + 1
            labels_rev[j] = 1.0
        else:
            i, j = i - 1, j - 1
            if rejected[i] != revised[j]:
                labels_rej[i], labels_rev[j], edits = 0.0, 1.0, edits + 1
    return labels_rej, labels_rev, edits


def extend(seqs: list[list[int]], length: int) -> list[list[int]]:
    """Each sequence topped up with the following sequences' tokens to exactly `length` tokens."""
    out = []
    for k, seq in enumerate(seqs):
        ids, nxt = list(seq), k + 1
        while len(ids) < length:
            ids += seqs[nxt % len(seqs)]
            nxt += 1
        out.append(ids[:length])
    return out


def minimal_edit(ids: list[int], rng: random.Random, rate: float = 0.05) -> list[int]:
    out = []
    for token in ids:
        roll = rng.random()
        if roll < rate / 3:
            continue                                             # delete
        out.append(rng.randrange(49152) if roll < 2 * rate / 3 else token)   # replace or keep
        if roll > 1 - rate / 3:
            out.append(rng.randrange(49152))                     # insert
    return out


def rate(fn, pairs, repeats: int = 3) -> tuple[float, float]:
    """Best-of-`repeats` (per CPU-second of this thread, per wall second) of fn(a, b) over the pairs.

    The CPU-time figure is the per-core rate even when other jobs share the cores; wall time is shown too.
    """
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        cpu, wall = time.thread_time(), time.perf_counter()
        for a, b in pairs:
            fn(a, b)
        best_cpu = min(best_cpu, time.thread_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    return len(pairs) / best_cpu, len(pairs) / best_wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--dp-pairs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=300)
    args = parser.parse_args()

    tokenizer = load_tokenizer(str(embedded_tokenizer_dir()))
    pairs = load_pairs(DATA)[0][: args.pairs]

    cpu, wall = time.thread_time(), time.perf_counter()
    rejected = [encode_prompt_response(tokenizer, p.prompt, p.rejected).response_ids for p in pairs]
    chosen = [encode_prompt_response(tokenizer, p.prompt, p.chosen).response_ids for p in pairs]
    tok_cpu, tok_wall = len(pairs) / (time.thread_time() - cpu), len(pairs) / (time.perf_counter() - wall)
    mean_len = sum(map(len, rejected + chosen)) / (2 * len(pairs))

    rejected = extend(rejected, args.tokens)
    rng = random.Random(0)
    kinds = {"chosen": list(zip(rejected, extend(chosen, args.tokens))),
             "minimal": [(r, minimal_edit(r, rng)) for r in rejected]}
    for kind, work in kinds.items():
        fast, fast_wall = rate(edit_labels, work)
        sample = work[: args.dp_pairs]
        slow, _ = rate(dp_labels, sample, repeats=1)
        for a, b in sample:     # same number of edits (the labels may differ only on ties)
            assert dp_labels(a, b)[2] == len(Levenshtein.editops(a, b)) == Levenshtein.distance(a, b)
        edits = sum(map(Levenshtein.distance, *zip(*work))) / len(work)
        details = (f"{len(work)} pairs of {args.tokens} HH tokens (SmolLM2), revision={kind}, mean {edits:.0f} "
                   f"edits; per CPU-second of 1 thread ({fast_wall:,.0f}/s wall on a shared machine); "
                   f"pure-Python DP {slow:.1f} pairs/s on {len(sample)} pairs, same edit counts")
        record("labels", f"editops labels pairs/s per core ({kind})", f"{fast:,.0f}", ">= 20,000", details)
        record("labels", f"editops / Python DP speed-up ({kind})", f"{fast / slow:,.0f}x", "", details)
    record("labels", "joint tokenization pairs/s per core (2 encodes per pair)", f"{tok_cpu:,.0f}",
           "", f"{len(pairs)} HH pairs, prompt + response each, mean response {mean_len:.0f} tokens "
           f"({tok_wall:,.0f}/s wall)")


if __name__ == "__main__":
    main()
