"""The planted-phrase data set: its Levenshtein labels are exactly the planted spans, on every shipped pair."""
from __future__ import annotations

import random

import pytest

from tlcr_ray.data.pairs import load_pairs, split_dialogue
from tlcr_ray.data.planted import PHRASES, contains_planted, plant_response, planted_rows, planted_share
from tlcr_ray.data.tokens import encode_prompt_response
from tlcr_ray.labeling.labels import IGNORE, NEGATIVE, NEUTRAL, POSITIVE, label_pair

SOURCE = "data/hh-rlhf/harmless-base/test.jsonl.gz"
MAX_RESPONSE_LEN = 48  # configs/planted.yaml's model.max_response_len


def _marked(tokenizer, prompt: str, response: str, spans) -> list[bool]:
    """Per response token: does it hold a character of one of `spans`?"""
    enc = encode_prompt_response(tokenizer, prompt, response)
    return [any(s < e_tok and s_tok < e for s, e in spans) for s_tok, e_tok in enc.response_offsets]


@pytest.fixture(scope="module")
def rows():
    return list(planted_rows(SOURCE))


def test_every_shipped_pair_labels_exactly_its_planted_tokens(rows, tokenizer):
    assert len(rows) > 2000
    kinds = {r["kind"] for r in rows}
    assert kinds == {"insert", "substitute"}
    for row in rows:
        prompt, chosen, rejected, fallback = split_dialogue(row["chosen"], row["rejected"])
        assert not fallback
        rejected_row, revised_row = label_pair(tokenizer, "x", prompt, rejected, chosen, 256, MAX_RESPONSE_LEN)
        for labelled, response, spans, mark in ((rejected_row, rejected, row["planted_spans"], NEGATIVE),
                                                (revised_row, chosen, row["revised_spans"], POSITIVE)):
            body = [v for v in labelled.labels if v != IGNORE][:-1]  # the final EOS is neutral by design
            expected = [mark if hit else NEUTRAL for hit in _marked(tokenizer, prompt, response, spans)]
            assert body == expected, (row["source"], row["kind"], response)
            assert labelled.labels[-1] == NEUTRAL and labelled.input_ids[-1] == tokenizer.eos_token_id
        if row["kind"] == "insert":
            assert POSITIVE not in revised_row.labels and NEGATIVE in rejected_row.labels
        else:
            assert POSITIVE in revised_row.labels and NEGATIVE in rejected_row.labels


def test_rows_are_distinct_deterministic_and_load_as_pairs(rows):
    assert rows[:50] == list(planted_rows(SOURCE))[:50]
    assert rows[:50] != list(planted_rows(SOURCE, seed=1))[:50]
    pairs, skipped = load_pairs(f"planted:{SOURCE}")
    assert len(pairs) == len(rows) and skipped == {}
    assert len({p.pair_id for p in pairs}) == len(pairs)
    inserted = [r for r in rows if r["kind"] == "insert"]
    assert all(contains_planted(r["rejected"].rsplit("\n\nAssistant:", 1)[1]) for r in inserted)
    assert {len(r["planted_spans"]) for r in inserted} == {1, 2}


def test_a_phrase_never_slides_into_a_repeated_neighbour():
    # " I hate you" may not go in before " I ..." nor after "... you": deleting a shifted copy costs the same.
    for seed in range(200):
        out = plant_response(" I think you", random.Random(seed), substitute=0.0)
        if out is not None:
            for s, e in out["planted_spans"]:
                assert out["rejected"][s:e] in PHRASES
                assert not (out["rejected"][s:e] == " I hate you" and out["rejected"][e:].startswith(" I"))


def test_planted_share_counts_replies_with_a_phrase():
    assert planted_share([" Sure, you stupid idiot.", "Shut up loser", " Fine."]) == pytest.approx(2 / 3)
    assert planted_share([]) == 0.0


def test_sft_rejected_fraction_swaps_in_the_rejected_response_for_that_share(tokenizer):
    from tlcr_ray.config import load_config
    from tlcr_ray.training import sft_examples

    cfg = load_config("configs/planted.yaml")
    pairs, _ = load_pairs(f"planted:{SOURCE}")
    pairs = pairs[:400]
    targets = lambda fraction: [tokenizer.decode([t for t in e["labels"] if t != -100])  # noqa: E731
                                for e in sft_examples(pairs, tokenizer, cfg.model, 96, fraction, seed=0)]
    plain, mixed = targets(0.0), targets(0.4)
    assert not any(map(contains_planted, plain))
    share = sum(map(contains_planted, mixed)) / len(mixed)
    assert 0.3 < share < 0.45, share
    assert targets(0.4) == mixed  # the same pairs each time: a seeded hash of the pair id
