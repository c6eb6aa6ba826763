"""`tlcr label` end to end: the chosen reviser in process, and kill-and-resume of the openai reviser
against a slow test server running in its own process (counting requests)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import yaml

from tlcr_ray.cli import main as tlcr_main
from tlcr_ray.config import load_config
from tlcr_ray.data.pairs import load_split
from tlcr_ray.labeling.labels import read_labels
from tlcr_ray.labeling.revise import INSTRUCTION_VERSION, build_messages, cache_key
from tlcr_ray.testing.openai_server import OpenAITestServer, edit_handler, messages_digest

REPO = Path(__file__).resolve().parents[2]
N_PAIRS = 24


def write_config(tmp_path: Path, tokenizer_dir: str, **reviser) -> Path:
    path = tmp_path / "label.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "data": {"max_pairs": N_PAIRS},
        "model": {"tokenizer": tokenizer_dir, "max_prompt_len": 128, "max_response_len": 128},
        "reviser": reviser,
    }))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_label_with_the_chosen_reviser(tmp_path, tokenizer_dir, capsys):
    config = write_config(tmp_path, tokenizer_dir, kind="chosen")
    assert tlcr_main(["label", "--config", str(config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    out = tmp_path / "run" / "label"
    summary = json.loads((out / "summary.json").read_text())
    assert printed == summary
    assert summary["split"] == "reward" and summary["pairs"] == N_PAIRS
    assert summary["revised"] + sum(summary["quarantined"].values()) == N_PAIRS
    assert summary["requested"] == N_PAIRS and summary["tokens_used"]["total_tokens"] == 0

    rows = read_labels(out / "labels.jsonl")
    assert len(rows) == 2 * summary["revised"]
    pairs, _ = load_split(load_config(config).data)
    revised_ids = {p.pair_id for p in pairs} - {q["pair_id"] for q in read_jsonl(out / "quarantine.jsonl")}
    assert [r.pair_id for r in rows[::2]] == [p.pair_id for p in pairs if p.pair_id in revised_ids]
    counts = Counter(label for row in rows for label in row.labels if label != -100.0)
    assert summary["token_labels"] == {"0": counts[0.0], "0.5": counts[0.5], "1": counts[1.0]}
    assert counts[0.0] > 0 and counts[1.0] > 0  # chosen differs from rejected: deletions and insertions
    for row in rows:
        assert len(row.labels) == len(row.input_ids) and row.labels[0] == -100.0
        assert set(row.labels) - {-100.0} <= ({0.0, 0.5} if row.kind == "rejected" else {0.5, 1.0})

    # A rerun takes every revision from the cache and writes the same labels.
    assert tlcr_main(["label", "--config", str(config)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["from_cache"] == N_PAIRS and again["requested"] == 0
    assert again["token_labels"] == summary["token_labels"]
    assert len(read_jsonl(out / "revisions.jsonl")) == N_PAIRS


def test_raising_max_edit_ratio_relabels_cached_replies_without_new_requests(tmp_path, tokenizer_dir, capsys):
    """The cache keeps each reply, not the decision: a rerun under a looser reviser.max_edit_ratio accepts
    revisions the first run rejected, and asks the server nothing."""
    with OpenAITestServer(edit_handler()) as srv:  # appends one sentence: the edit ratio depends on the length
        config = write_config(tmp_path, tokenizer_dir, kind="openai", base_url=srv.base_url, model="test-model",
                              max_edit_ratio=0.15)
        assert tlcr_main(["label", "--config", str(config)]) == 0
        strict = json.loads(capsys.readouterr().out)
        asked = srv.request_count
        assert asked == N_PAIRS and strict["requested"] == N_PAIRS
        assert strict["quarantined"].get("edit_ratio", 0) > 0 and strict["revised"] > 0

        assert tlcr_main(["label", "--config", str(config), "--set", "reviser.max_edit_ratio=0.95"]) == 0
        loose = json.loads(capsys.readouterr().out)
        assert srv.request_count == asked  # zero new requests
        assert loose["requested"] == 0 and loose["from_cache"] == N_PAIRS
        assert loose["revised"] == N_PAIRS > strict["revised"]
        assert loose["label_rows"] == 2 * N_PAIRS > strict["label_rows"]
        assert len(read_labels(tmp_path / "run" / "label" / "labels.jsonl")) == 2 * N_PAIRS

        # Back to the strict ratio: the same decisions as the first run, still from the cache.
        assert tlcr_main(["label", "--config", str(config)]) == 0
        again = json.loads(capsys.readouterr().out)
        assert srv.request_count == asked and again["revised"] == strict["revised"]
        assert again["quarantined"] == strict["quarantined"]


@pytest.fixture
def slow_server():
    """The scripted reviser (`edit` mode) as its own process, 0.4 s per reply."""
    proc = subprocess.Popen([sys.executable, "-m", "tlcr_ray.testing.openai_server", "--mode", "edit", "--delay", "0.4"],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    ready = proc.stdout.readline().split()
    assert ready and ready[0] == "READY", "test server did not start"
    yield ready[1]
    proc.terminate()
    proc.wait(timeout=30)


def server_digests(base_url: str) -> list[str]:
    return requests.get(base_url.removesuffix("/v1") + "/_test/stats", timeout=10).json()["digests"]


@pytest.mark.slow
def test_label_survives_sigkill_and_resumes_without_rerequesting(tmp_path, tokenizer_dir, slow_server):
    config = write_config(tmp_path, tokenizer_dir, kind="openai", base_url=slow_server, model="test-model",
                          max_concurrency=2, max_edit_ratio=0.95)
    cache = tmp_path / "run" / "label" / "revisions.jsonl"
    command = [sys.executable, "-m", "tlcr_ray.cli", "label", "--config", str(config)]
    env = {**os.environ, "TQDM_DISABLE": "1"}

    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (cache.exists() and len(cache.read_text().splitlines()) >= 6):
        assert first.poll() is None, f"tlcr label exited early: {first.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no revisions were cached in time"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stderr.close()
    with cache.open("a") as fh:
        fh.write('{"key": "torn-by-the-kill", "pai')  # as if the kill hit mid-write

    finished = {row["key"] for row in read_jsonl_prefix(cache)}
    assert 6 <= len(finished) < N_PAIRS, "the kill should land mid-run"
    requests_before = len(server_digests(slow_server))

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)

    pairs, _ = load_split(load_config(config).data)
    digest_of = {cache_key(p.prompt, p.chosen, p.rejected, model="test-model", version=INSTRUCTION_VERSION,
                           temperature=0.0, max_tokens=1024):
                 messages_digest(build_messages(p.prompt, p.chosen, p.rejected)) for p in pairs}
    rerun_requests = server_digests(slow_server)[requests_before:]
    # Finished rows were not asked again; every other row was asked exactly once.
    assert sorted(rerun_requests) == sorted(digest_of[k] for k in digest_of if k not in finished)
    assert summary["from_cache"] == len(finished) and summary["requested"] == N_PAIRS - len(finished)

    rows = read_jsonl(cache)
    keys = Counter(row["key"] for row in rows)
    assert set(keys) == set(digest_of) and max(keys.values()) == 1  # complete, nothing duplicated
    out = cache.parent
    labeled = {r.pair_id for r in read_labels(out / "labels.jsonl")}
    quarantined = {q["pair_id"] for q in read_jsonl(out / "quarantine.jsonl")}
    assert labeled | quarantined == {p.pair_id for p in pairs} and not labeled & quarantined
    assert summary["revised"] == len(labeled) > 0


def read_jsonl_prefix(path: Path) -> list[dict]:
    """Rows of a JSONL file whose last line may be torn."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows
