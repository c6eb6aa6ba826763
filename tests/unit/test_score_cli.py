"""`tlcr score` (tlcr_ray.eval.score_file): offline file scoring, no Ray.

Its numbers are score_items' numbers; a run SIGKILLed mid-way resumes with no lost or duplicated ids;
malformed rows are reported as file:line and either stop the run or are counted and skipped.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tlcr_ray.config import load_config
from tlcr_ray.data.pairs import DataError, split_dialogue
from tlcr_ray.eval.score_file import add_arguments, run_cli
from tlcr_ray.models import load_head_model
from tlcr_ray.rl.text_scoring import score_items

REPO = Path(__file__).resolve().parents[2]
HH = REPO / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
PAIRS = [
    ("\n\nHuman: How do I bake bread?\n\nAssistant:", " Mix flour, water, salt and yeast, then knead and bake."),
    ("\n\nHuman: hi\n\nAssistant:", " Hello!"),
    ("", "No prompt at all, just a response."),
    ("\n\nHuman: Say something with émojis 🎉\n\nAssistant:", " Sure 🎉 — ünïcödé ok?"),
]


def hh_rows(n: int, skip: int = 0) -> list[dict]:
    with gzip.open(HH, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(skip + n), fh)]
    return [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows[skip:]]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def expected_items(rows: list) -> list[tuple[str, str, str]]:
    """(id, prompt, response) of every item of `rows` (dicts), in file order."""
    out = []
    for line, row in enumerate(rows, 1):
        if "response" in row:
            out.append((f"{line}:response", row["prompt"], row["response"]))
        else:
            split = split_dialogue(row["chosen"], row["rejected"])
            out += [(f"{line}:chosen", split.prompt, split.chosen), (f"{line}:rejected", split.prompt, split.rejected)]
    return out


def score(spread_disc_dir, src, out, **flags) -> dict:
    args = argparse.Namespace(checkpoint=spread_disc_dir, input=str(src), output=str(out),
                              mode=flags.pop("mode", "continuous"), batch_size=flags.pop("batch_size", 16),
                              on_bad_row=flags.pop("on_bad_row", None))
    assert not flags
    return run_cli(load_config(None), args)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("mode", ["continuous", "fixed"])
def test_numbers_equal_score_items(spread_disc_dir, spread_disc, tokenizer, tmp_path, mode):
    rows = [{"prompt": p, "response": r} for p, r in PAIRS] + hh_rows(3)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    summary = score(spread_disc_dir, src, tmp_path / "out.jsonl", mode=mode, batch_size=3)
    want_items = expected_items(rows)
    assert summary["items_scored"] == len(want_items) == 10 and summary["bad_rows"] == {}
    got = read_rows(tmp_path / "out.jsonl")
    # The same items in the same batches of 3 as score_items: the numbers are bit-for-bit the library's.
    want = score_items(spread_disc, tokenizer, [(p, r) for _, p, r in want_items], mode=mode, batch_size=3)
    assert [g["id"] for g in got] == [i for i, _, _ in want_items]
    for g, w, (item_id, _, response) in zip(got, want, want_items):
        assert g["mode"] == mode and g["which"] == item_id.split(":")[1] and g["line"] == int(item_id.split(":")[0])
        assert g["tokens"] == [vars(t) for t in w.tokens]
        assert (g["sum"], g["mean"], g["num_tokens"]) == (w.sum, w.mean, len(w.tokens))
        assert all(t["text"] == response[t["start"]:t["end"]] for t in g["tokens"])
    assert summary["response_tokens"] == sum(len(w.tokens) for w in want)


def test_parquet_and_gzip_inputs(spread_disc_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": p, "response": r} for p, r in PAIRS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    score(spread_disc_dir, tmp_path / "in.parquet", tmp_path / "a.jsonl")
    score(spread_disc_dir, tmp_path / "in.jsonl.gz", tmp_path / "b.jsonl")
    a, b = read_rows(tmp_path / "a.jsonl"), read_rows(tmp_path / "b.jsonl")
    assert [r["id"] for r in a] == [f"{i}:response" for i in range(1, 5)] == [r["id"] for r in b]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]


CHILD = textwrap.dedent("""
    import argparse, json, sys, time
    import tlcr_ray.eval.score_file as score_file
    from tlcr_ray.config import load_config

    if sys.argv[5] == "slow":  # a slow forward, so the parent can kill it mid-run
        from tlcr_ray.rl import text_scoring as scoring
        forward = scoring.response_probabilities
        def slow(*a, **k):
            time.sleep(0.3)
            return forward(*a, **k)
        scoring.response_probabilities = slow
    args = argparse.Namespace(checkpoint=sys.argv[1], input=sys.argv[2], output=sys.argv[3], mode="continuous",
                              batch_size=int(sys.argv[4]), on_bad_row=None)
    summary = score_file.run_cli(load_config(None), args)
    print(json.dumps({"summary": summary, "ray_loaded": "ray" in sys.modules}))
""")


def child(spread_disc_dir, src, out, batch_size: int, speed: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", CHILD, spread_disc_dir, str(src), str(out), str(batch_size), speed],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_a_sigkilled_run_resumes_without_lost_or_duplicated_rows(spread_disc_dir, tmp_path):
    rows = [{"prompt": f"\n\nHuman: question {i}?\n\nAssistant:", "response": f" Answer {i}" + " ok" * (i % 5)}
            for i in range(40)] + hh_rows(10)
    want_ids = [i for i, _, _ in expected_items(rows)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"

    proc = child(spread_disc_dir, src, out, 4, "slow")
    deadline = time.monotonic() + 300
    while complete_lines(out) < 12:  # three batches on disk, the run far from done
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the scoring child wrote nothing in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the child this test started
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = read_rows(out)
    assert 12 <= len(before) < len(want_ids)
    assert [r["id"] for r in before] == want_ids[:len(before)]
    # What a kill in the middle of a write leaves: the first bytes of the next row, no newline.
    with open(out, "ab") as fh:
        fh.write(b'{"id": "41:chosen", "line": 41, "which": "cho')

    proc = child(spread_disc_dir, src, out, 4, "fast")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    summary = result["summary"]
    assert result["ray_loaded"] is False, "tlcr score must not load Ray"
    assert summary["torn_bytes_cut"] == len(b'{"id": "41:chosen", "line": 41, "which": "cho')
    assert summary["items_already_done"] == len(before)
    assert summary["items_scored"] == len(want_ids) - len(before)
    after = read_rows(out)  # every line parses: the torn one is gone
    assert [r["id"] for r in after] == want_ids, "each id once, in input order"
    assert after[: len(before)] == before

    # The same numbers as one uninterrupted run (batch boundaries moved, so up to float noise).
    score(spread_disc_dir, src, tmp_path / "whole.jsonl", batch_size=4)
    for got, want in zip(after, read_rows(tmp_path / "whole.jsonl")):
        assert got["id"] == want["id"] and [t["id"] for t in got["tokens"]] == [t["id"] for t in want["tokens"]]
        assert got["sum"] == pytest.approx(want["sum"], abs=1e-4)
        assert [t["p"] for t in got["tokens"]] == pytest.approx([t["p"] for t in want["tokens"]], abs=1e-5)

    # A finished output is a no-op to rerun; other settings are refused, not mixed in.
    again = score(spread_disc_dir, src, out, batch_size=4)
    assert again["items_scored"] == 0 and again["items_already_done"] == len(want_ids)
    assert read_rows(out) == after
    with pytest.raises(DataError, match="other settings .*mode: 'continuous' -> 'fixed'"):
        score(spread_disc_dir, src, out, mode="fixed")


BAD = [
    {"prompt": "p", "response": " fine"},                                       # 1
    '{"prompt": "p", "response": ',                                              # 2 invalid JSON
    {"prompt": "p"},                                                             # 3 no response
    {"chosen": "no turns here", "rejected": "none here either"},                 # 4 does not split
    {"prompt": 7, "response": " x"},                                             # 5 prompt not a string
    {"prompt": "p", "response": ""},                                             # 6 empty response
    {"text": "what?"},                                                           # 7 unknown fields
    "[1, 2]",                                                                    # 8 not an object
    {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},  # 9 fine
]


def test_bad_rows_are_named_by_file_and_line_then_fatal_or_skipped(spread_disc_dir, tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", BAD)
    with pytest.raises(DataError, match=rf"^{src}:2: field '-': invalid JSON .*--on-bad-row skip"):
        score(spread_disc_dir, src, tmp_path / "stop.jsonl")

    summary = score(spread_disc_dir, src, tmp_path / "skip.jsonl", on_bad_row="skip")
    assert summary["bad_rows"] == {"invalid_json": 1, "bad_field_response": 1, "no_assistant_turn": 1,
                                   "bad_field_prompt": 1, "empty_response": 1, "no_known_fields": 1,
                                   "not_an_object": 1}
    assert [e.split(": field")[0] for e in summary["bad_row_examples"]] == [f"{src}:{n}" for n in range(2, 9)]
    assert f"{src}:5: field 'prompt': expected a string, got int" in summary["bad_row_examples"]
    assert [r["id"] for r in read_rows(tmp_path / "skip.jsonl")] == ["1:response", "9:chosen", "9:rejected"]
    assert summary["rows_read"] == 9 and summary["items_scored"] == 3

    # A row longer than the model's position embeddings is a bad row too, caught before any forward.
    limit = load_head_model(spread_disc_dir).config.max_position_embeddings
    long_src = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "", "response": " a" * (limit + 5)},
                                                      {"prompt": "", "response": " ok"}])
    # limit + 5 response tokens, and the EOS every finished response is scored with (as the API does).
    with pytest.raises(DataError, match=rf"{long_src}:1: field 'response': {limit + 6} tokens"):
        score(spread_disc_dir, long_src, tmp_path / "long-out.jsonl")


def test_cli_flags_and_no_ray_import():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "d", "--input", "i.jsonl", "--output", "o.jsonl", "--mode", "fixed",
                              "--batch-size", "8", "--on-bad-row", "skip"])
    assert (args.checkpoint, args.input, args.output, args.mode, args.batch_size, args.on_bad_row) == \
        ("d", "i.jsonl", "o.jsonl", "fixed", 8, "skip")
    defaults = parser.parse_args(["--input", "i.jsonl", "--output", "o.jsonl"])
    assert (defaults.mode, defaults.batch_size, defaults.on_bad_row, defaults.checkpoint) == \
        ("continuous", 16, None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["--input", "i.jsonl", "--output", "o.jsonl", "--mode", "sequence"])
    source = (REPO / "tlcr_ray" / "eval" / "score_file.py").read_text()
    assert "import ray" not in source and "from ray" not in source
