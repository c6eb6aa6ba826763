"""Benchmark harness: tiny model answers, judged by our OpenAI-compatible test server on 127.0.0.1."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from tlcr_ray.cli import main as tlcr_main
from tlcr_ray.config import ConfigError, load_config
from tlcr_ray.eval.benchmarks import REPO_DATA, load_alpaca_reference, load_mt_bench, run_alpaca_eval, run_mt_bench
from tlcr_ray.eval.judge import pairwise_request, parse_rating, parse_verdict
from tlcr_ray.testing.openai_server import OpenAITestServer, Reply

MULTI_TURN_MARK = "<|The Start of Assistant A's Conversation with User|>"
REFERENCE_MARK = "Reference Answer"
# One question each from a plain category and two graded against GPT-4's reference answers.
PICKED_IDS = (81, 101, 111)


@pytest.fixture(scope="module")
def mt_bench_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mt-bench")
    shutil.copytree(REPO_DATA / "mt-bench", folder, dirs_exist_ok=True)
    rows = [json.loads(line) for line in (folder / "question.jsonl").read_text().splitlines()]
    picked = [r for r in rows if r["question_id"] in PICKED_IDS]
    (folder / "question.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    return folder


def make_cfg(tmp_path: Path, base_url: str, **eval_overrides) -> object:
    overrides = [f"output_dir={tmp_path / 'run'}", "eval.judge_model=test-judge", f"eval.judge_base_url={base_url}",
                 "eval.max_new_tokens=4", "eval.batch_size=4", "eval.max_retries=0", "eval.timeout_s=10"]
    overrides += [f"eval.{k}={v}" for k, v in eval_overrides.items()]
    return load_config(None, overrides)


def user_text(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def question_of(body: dict, questions: list[dict]) -> dict:
    text = user_text(body)
    return next(q for q in questions if q["turns"][0] in text)


def test_parsers():
    assert parse_rating("Good answer. Rating: [[7]]") == (7.0, None)
    assert parse_rating('Format "Rating: [[5]]" ... final: [[8.5]]')[0] == 8.5  # the last one wins
    assert parse_rating("Rating: [[11]]")[0] is None and "outside" in parse_rating("[[11]]")[1]
    assert parse_rating("I would give it a seven.")[1].startswith("unparsable")
    assert parse_rating(None)[1] == "unparsable: empty judgment"
    assert parse_verdict("B is better. [[B]]") == ("B", None)
    assert parse_verdict("Equal. [[tie]]") == ("tie", None)
    assert parse_verdict("[[C]]")[0] is None


def test_pairwise_order_is_random_but_stable():
    items = load_alpaca_reference(REPO_DATA / "alpaca-eval" / "gpt4_1106_preview_outputs.json")[:200]
    positions = [pairwise_request(i, it["instruction"], "m", it["output"], "j", 0).meta["model_position"]
                 for i, it in enumerate(items)]
    assert 70 <= positions.count("A") <= 130  # both orders used, about half each
    again = [pairwise_request(i, it["instruction"], "m", it["output"], "j", 0).meta["model_position"]
             for i, it in enumerate(items)]
    assert positions == again  # same order on a rerun, so cached judgments are found


def test_mt_bench_scores_per_turn_and_rerun_sends_nothing(tmp_path, tiny_model_dir, mt_bench_dir):
    questions, references, _ = load_mt_bench(mt_bench_dir)
    seen: list[dict] = []
    lock = threading.Lock()

    def judge(body: dict) -> Reply:
        text = user_text(body)
        q = question_of(body, questions)
        with lock:
            seen.append({"qid": q["question_id"], "multi": MULTI_TURN_MARK in text, "text": text,
                         "system": body["messages"][0]["content"]})
        return Reply(text="Fine but short. Rating: [[3]]" if MULTI_TURN_MARK in text else
                     'As the format says, "Rating: [[5]]". My rating: [[7]]')

    with OpenAITestServer(judge) as srv:
        # Sampling: the greedy tiny model only repeats "\n", which strips to an empty answer.
        cfg = make_cfg(tmp_path, srv.base_url, mt_bench_dir=str(mt_bench_dir), temperature=1.0)
        result = run_mt_bench(cfg, tiny_model_dir)
        assert srv.request_count == 2 * len(PICKED_IDS)
    assert (result["turn_1"], result["turn_2"], result["score"]) == (7.0, 3.0, 5.0)
    assert result["complete"] and result["judged"] == 6 and result["judge_errors"] == 0
    assert result["by_category"]["math"] == {"score": 5.0, "turn_1": 7.0, "turn_2": 3.0, "judged": 2}
    assert set(result["by_category"]) == {"writing", "reasoning", "math"}
    assert json.loads((tmp_path / "run" / "eval" / "mt-bench.json").read_text())["score"] == 5.0

    # Reference answers go only into the math/reasoning prompts; turn 2 shows the model's own turn-1 answer.
    for s in seen:
        assert (REFERENCE_MARK in s["text"]) == (s["qid"] != 81)
        if s["qid"] == 111:
            assert references[111][0] in s["text"]
    answers = [json.loads(line) for line in (tmp_path / "run" / "eval" / "mt-bench" / "answers.jsonl").open()]
    assert len(answers) == 6
    first = {a["messages"][0]["content"]: a["answer"] for a in answers if len(a["messages"]) == 1}
    for a in (a for a in answers if len(a["messages"]) == 3):
        assert a["messages"][1] == {"role": "assistant", "content": first[a["messages"][0]["content"]]}
        assert a["answer"]  # sampled, so not empty
        judged = next(s["text"] for s in seen if s["multi"] and a["answer"] in s["text"])
        assert f"### Assistant A:\n{a['messages'][1]['content']}\n" in judged

    with OpenAITestServer(judge) as srv:
        again = run_mt_bench(make_cfg(tmp_path, srv.base_url, mt_bench_dir=str(mt_bench_dir), temperature=1.0),
                             tiny_model_dir)
        assert srv.request_count == 0
    assert again["score"] == 5.0
    assert len((tmp_path / "run" / "eval" / "mt-bench" / "answers.jsonl").read_text().splitlines()) == 6


def test_judge_errors_are_recorded_and_retried(tmp_path, tiny_model_dir, mt_bench_dir):
    questions, _, _ = load_mt_bench(mt_bench_dir)
    calls: dict[tuple[int, bool], int] = {}
    lock = threading.Lock()

    def flaky(body: dict) -> Reply:
        q = question_of(body, questions)
        key = (q["question_id"], MULTI_TURN_MARK in user_text(body))
        with lock:
            calls[key] = calls.get(key, 0) + 1
        if key == (81, False):
            return Reply(status=500, error="judge overloaded")
        if key == (101, True):
            return Reply(text="I refuse to grade this.")
        if key == (111, False):
            return Reply(text="[[9]]", delay=5.0)  # longer than the client timeout
        return Reply(text="Rating: [[6]]")

    with OpenAITestServer(flaky) as srv:
        cfg = make_cfg(tmp_path, srv.base_url, mt_bench_dir=str(mt_bench_dir), max_retries=1, timeout_s=0.5)
        result = run_mt_bench(cfg, tiny_model_dir)
    assert calls[(81, False)] == 2  # the SDK's one retry, no second retry loop stacked on it
    assert result["judged"] == 3 and result["judge_errors"] == 3 and not result["complete"]
    assert result["score"] == 6.0
    reasons = {(e["question_id"], e["turn"]): e["reason"] for e in result["errors"]}
    assert "InternalServerError" in reasons[(81, 1)]
    assert reasons[(101, 2)].startswith("unparsable")
    assert "Timeout" in reasons[(111, 1)]
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / "mt-bench" / "judgments.jsonl").open()]
    assert sum(r["status"] == "error" for r in rows) == 3

    with OpenAITestServer(lambda body: Reply(text="[[8]]")) as srv:
        fixed = run_mt_bench(make_cfg(tmp_path, srv.base_url, mt_bench_dir=str(mt_bench_dir)), tiny_model_dir)
        assert srv.request_count == 3  # only the failed judgments are asked again
    assert fixed["complete"] and fixed["judged"] == 6
    assert fixed["score"] == pytest.approx((3 * 6 + 3 * 8) / 6, abs=1e-4)


def test_alpaca_win_rate_via_cli(tmp_path, tiny_model_dir):
    items = load_alpaca_reference(REPO_DATA / "alpaca-eval" / "gpt4_1106_preview_outputs.json")[:4]
    scripted = {items[0]["instruction"]: "model", items[1]["instruction"]: "model",
                items[2]["instruction"]: "tie", items[3]["instruction"]: "reference"}
    shown_first: list[str] = []

    def judge(body: dict) -> str:
        text = user_text(body)
        item = next(it for it in items if f"<instruction>\n{it['instruction']}\n</instruction>" in text)
        reference_is_a = f"<reply_A>\n{item['output']}\n</reply_A>" in text
        shown_first.append("reference" if reference_is_a else "model")
        outcome = scripted[item["instruction"]]
        if outcome == "tie":
            return "Both are equally poor. [[TIE]]"
        model_letter, reference_letter = ("B", "A") if reference_is_a else ("A", "B")
        return f"Decision: [[{model_letter if outcome == 'model' else reference_letter}]]"

    with OpenAITestServer(judge) as srv:
        argv = ["eval", "alpaca-eval", "--model", tiny_model_dir, "--judge-base-url", srv.base_url,
                "--judge-model", "test-judge", "--limit", "4", "--set", f"output_dir={tmp_path / 'run'}",
                "--set", "eval.max_new_tokens=4", "--set", "eval.max_retries=0"]
        assert tlcr_main(argv) == 0
        assert srv.request_count == 4
    result = json.loads((tmp_path / "run" / "eval" / "alpaca-eval.json").read_text())
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(62.5)
    assert result["stderr"] == pytest.approx(100 * (0.6875 / 3 / 4) ** 0.5, abs=1e-3)
    assert result["model_shown_first"] == shown_first.count("model")
    assert result["complete"] and result["questions"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / "alpaca-eval" / "judgments.jsonl").open()]
    assert sorted(r["item"] for r in rows) == [0, 1, 2, 3]
    for r in rows:
        assert r["winner"] == scripted[items[r["item"]]["instruction"]]


def test_missing_judge_key_fails_before_generation(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = load_config(None, [f"output_dir={tmp_path}", "eval.limit=1"])
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        run_alpaca_eval(cfg, "/nonexistent-model-folder")
    assert not (tmp_path / "eval").exists()


def test_a_base_model_without_chat_template_is_prompted_in_hh_format(tmp_path, tiny_model_dir, mt_bench_dir):
    """Llama-2-7b-hf has no chat template: its benchmark prompts are the HH dialogues SFT trained it on."""
    from tlcr_ray.data.pairs import hh_dialogue
    from tlcr_ray.eval.benchmarks import chat_prompt
    from tlcr_ray.models import load_tokenizer

    turns = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": " Hello. "},
             {"role": "user", "content": "Why?"}]
    assert hh_dialogue(turns) == "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Why?\n\nAssistant:"
    with pytest.raises(ValueError, match="role"):
        hh_dialogue([{"role": "tool", "content": "x"}])
    base = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, base)
    tok = load_tokenizer(str(base))
    assert tok.chat_template  # the tiny model's SmolLM2 tokenizer has one: it is used as is
    assert chat_prompt(tok, turns[:1]) == tok.apply_chat_template(turns[:1], add_generation_prompt=True, tokenize=False)
    tok.chat_template = None
    tok.save_pretrained(str(base))
    for leftover in base.glob("chat_template.*"):
        leftover.unlink()
    assert not load_tokenizer(str(base)).chat_template
    assert chat_prompt(load_tokenizer(str(base)), turns) == hh_dialogue(turns)

    prompts: list[str] = []

    def judge(body: dict) -> Reply:
        prompts.append(user_text(body))
        return Reply(text="Rating: [[4]]")

    with OpenAITestServer(judge) as srv:
        result = run_mt_bench(make_cfg(tmp_path, srv.base_url, mt_bench_dir=str(mt_bench_dir), temperature=1.0,
                                       limit=1), str(base))
    assert result["judged"] == 2 and result["judge_errors"] == 0  # answered (no ValueError) and judged
    answers = [json.loads(line) for line in (tmp_path / "run" / "eval" / "mt-bench" / "answers.jsonl").open()]
    assert answers and all("\n\nHuman:" not in a["answer"] for a in answers)
