"""Levenshtein token labels: hand examples, the edit-script property, joint sequences, JSONL round trip."""
from __future__ import annotations

import random
from pathlib import Path

import Levenshtein
import pytest

from tlcr_ray.data.pairs import load_pairs
from tlcr_ray.labeling.labels import LabeledSequence, edit_labels, label_pair, read_labels, write_labels

SHIPPED = Path(__file__).resolve().parents[2] / "data/hh-rlhf/harmless-base/test.jsonl.gz"


@pytest.mark.parametrize("rejected, revised, want_rej, want_rev", [
    ([1, 2, 3, 4], [1, 2, 3, 4], [.5, .5, .5, .5], [.5, .5, .5, .5]),
    ([1, 2, 3, 4], [1, 3, 4], [.5, 0, .5, .5], [.5, .5, .5]),           # delete 2
    ([1, 3, 4], [1, 2, 3, 4], [.5, .5, .5], [.5, 1, .5, .5]),           # insert 2
    ([1, 2, 3], [1, 9, 3], [.5, 0, .5], [.5, 1, .5]),                    # replace 2 -> 9
    ([1, 2, 3, 4, 5], [1, 3, 4, 5, 6], [.5, 0, .5, .5, .5], [.5, .5, .5, .5, 1]),  # delete 2, insert 6
    ([], [1, 2], [], [1, 1]),
    ([1, 2], [], [0, 0], []),
])
def test_hand_examples(rejected, revised, want_rej, want_rev):
    assert edit_labels(rejected, revised) == (want_rej, want_rev)


def apply_editops(source: list[int], target: list[int], ops) -> list[int]:
    """Replay an edit script on `source` (back to front, so earlier indices stay valid)."""
    out = list(source)
    for op, i, j in sorted(ops, key=lambda o: (o[1], o[2]), reverse=True):
        if op == "delete":
            del out[i]
        elif op == "insert":
            out.insert(i, target[j])
        else:
            out[i] = target[j]
    return out


def check_property(rejected: list[int], revised: list[int]) -> None:
    ops = Levenshtein.editops(rejected, revised)
    assert apply_editops(rejected, revised, ops) == revised
    counts = {k: sum(op == k for op, _, _ in ops) for k in ("delete", "insert", "replace")}
    labels_rej, labels_rev = edit_labels(rejected, revised)
    assert labels_rej.count(0.0) == counts["delete"] + counts["replace"] and 1.0 not in labels_rej
    assert labels_rev.count(1.0) == counts["insert"] + counts["replace"] and 0.0 not in labels_rev
    # tokens the script leaves alone are neutral and match up one-to-one, in order
    kept_rej = [t for t, v in zip(rejected, labels_rej) if v == 0.5]
    kept_rev = [t for t, v in zip(revised, labels_rev) if v == 0.5]
    assert kept_rej == kept_rev


def test_property_on_random_lists():
    rng = random.Random(0)
    for _ in range(300):
        rejected = [rng.randrange(8) for _ in range(rng.randrange(0, 40))]
        revised = list(rejected)
        for _ in range(rng.randrange(0, 6)):             # a few local edits, like a minimal revision
            pos = rng.randrange(len(revised) + 1)
            action = rng.choice("dir")
            if action == "d" and pos < len(revised):
                del revised[pos]
            elif action == "i":
                revised.insert(pos, rng.randrange(8))
            elif pos < len(revised):
                revised[pos] = rng.randrange(8)
        check_property(rejected, revised)
        check_property(rejected, [rng.randrange(8) for _ in range(rng.randrange(0, 40))])


def test_tensors_are_labelled_like_lists():
    torch = pytest.importorskip("torch")
    a, b = [1, 2, 3, 4, 5], [1, 2, 9, 4, 5, 6]
    assert edit_labels(torch.tensor(a), torch.tensor(b)) == edit_labels(a, b)
    assert edit_labels(torch.tensor(a), torch.tensor(a)) == ([0.5] * 5, [0.5] * 5)


def test_label_pair_on_real_pairs(tokenizer):
    pairs = load_pairs(str(SHIPPED))[0][:40]
    for pair in pairs:
        # chosen as the revision is the offline reviser; also a minimal edit of the rejected response
        minimal = pair.rejected.replace(" the ", " a ", 1) + " Please be careful."
        for revised in (pair.chosen, minimal, pair.rejected):
            rejected_row, revised_row = label_pair(tokenizer, pair.pair_id, pair.prompt, pair.rejected, revised)
            assert (rejected_row.kind, revised_row.kind) == ("rejected", "revised")
            for row, response in ((rejected_row, pair.rejected), (revised_row, revised)):
                assert len(row.input_ids) == len(row.labels)
                start = row.labels.count(-100.0)
                assert row.labels[:start] == [-100.0] * start and -100.0 not in row.labels[start:]
                # Both sequences end with EOS, labelled neutral (the stop action PPO rewards).
                assert row.input_ids[-1] == tokenizer.eos_token_id and row.labels[-1] == 0.5
                assert tokenizer.decode(row.input_ids[:-1]) == pair.prompt + response
            rej_ids = rejected_row.input_ids[rejected_row.labels.count(-100.0):]
            rev_ids = revised_row.input_ids[revised_row.labels.count(-100.0):]
            check_property(rej_ids, rev_ids)
            if revised is pair.rejected:
                assert set(rejected_row.labels + revised_row.labels) == {-100.0, 0.5}


def test_eos_ends_both_sequences_and_is_neutral(tokenizer):
    eos = tokenizer.eos_token_id
    prompt = "\n\nHuman: hi\n\nAssistant:"
    rejected_row, revised_row = label_pair(tokenizer, "p", prompt, " Go away.", " Hello there.")
    for row in (rejected_row, revised_row):
        assert row.input_ids[-1] == eos and row.labels[-1] == 0.5 and eos not in row.input_ids[:-1]
    assert 0.0 in rejected_row.labels and 1.0 in revised_row.labels  # the edits are still labelled
    # A response cut at max_response_len did not end: no EOS on that side, the other keeps its own,
    # and the cut side's labels are those of the same edit script without any EOS.
    long, short = " Once upon a time there was a dragon.", " Once upon a time."
    cut_row, whole_row = label_pair(tokenizer, "p", prompt, long, short, max_response_len=5)
    n_prompt = cut_row.labels.count(-100.0)
    assert len(cut_row.input_ids) == n_prompt + 5 and eos not in cut_row.input_ids
    assert whole_row.input_ids[-1] == eos and whole_row.labels[-1] == 0.5
    assert (cut_row.labels[n_prompt:], whole_row.labels[n_prompt:-1]) == edit_labels(
        cut_row.input_ids[n_prompt:], whole_row.input_ids[n_prompt:-1])


def test_label_pair_truncates(tokenizer):
    prompt = "\n\nHuman: " + "tell me a story " * 30 + "\n\nAssistant:"
    rows = label_pair(tokenizer, "p", prompt, " Once upon a time " * 20, " Once upon a time, " * 20,
                      max_prompt_len=16, max_response_len=24)
    for row in rows:
        assert row.labels[:16] == [-100.0] * 16 and len(row.labels) == 16 + 24


def test_jsonl_round_trip_and_bad_lines(tmp_path):
    rows = [LabeledSequence("abc", "rejected", [5, 6, 7], [-100.0, 0.0, 0.5]),
            LabeledSequence("abc", "revised", [5, 6, 8, 9], [-100.0, 0.5, 1.0, 1.0])]
    path = tmp_path / "label" / "labels.jsonl"
    write_labels(path, rows)
    assert read_labels(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["labels.jsonl"]      # no temp file left behind
    bad = path.read_text().splitlines()
    bad[1] = bad[1].replace('"labels":[-100.0,0.5,1.0,1.0]', '"labels":[-100.0,0.5,1.0]')
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(ValueError, match=r"labels\.jsonl:2: field 'labels' has 3 entries for 4"):
        read_labels(path)
    path.write_text('{"pair_id": "x", "kind": "chosen", "input_ids": [1], "labels": [0.5]}\n')
    with pytest.raises(ValueError, match=r"labels\.jsonl:1: field 'kind'"):
        read_labels(path)
