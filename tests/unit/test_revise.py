"""The reviser against a real OpenAI-compatible HTTP server on 127.0.0.1, through the real SDK."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict

import pytest
from openai import OpenAI

from tlcr_ray.config import ConfigError, ReviserConfig
from tlcr_ray.data.pairs import PreferencePair
from tlcr_ray.labeling.labels import label_pair
from tlcr_ray.labeling.revise import (
    CLOSE_TAG,
    OPEN_TAG,
    build_messages,
    make_reviser,
    parse_revision,
    revise_all,
    token_edit_ratio,
)
from tlcr_ray.testing.openai_server import OpenAITestServer, Reply, edit_handler

PROMPT = "\n\nHuman: How do I keep my houseplants alive?\n\nAssistant:"
CHOSEN = " Water them when the top inch of soil is dry and give them bright, indirect light."
REJECTED = " Just water them every day and keep them in a dark closet so they rest, it works for everyone."
GOOD = "Just water them when the soil is dry and keep them in bright, indirect light, it works for most plants."


def tagged(body: str) -> str:
    return f"{OPEN_TAG}\n{body}\n{CLOSE_TAG}"


def make_pair(case: str) -> PreferencePair:
    # The case name rides in the prompt, so the scripted server knows how to answer this pair.
    return PreferencePair(pair_id=case, prompt=PROMPT.replace("alive?", f"alive? ({case})"),
                          chosen=CHOSEN, rejected=REJECTED, source=f"test:{case}")


class ScriptedReviser:
    """Answers each case its own way and records the arrival times of each case's attempts."""

    def __init__(self):
        self.attempts: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()

    def __call__(self, body: dict) -> Reply:
        user = body["messages"][-1]["content"]
        case = user.split("alive? (", 1)[1].split(")", 1)[0]
        with self.lock:
            self.attempts[case].append(time.monotonic())
            attempt = len(self.attempts[case])
        if case == "good":
            return Reply(tagged(GOOD))
        if case == "fenced":
            fenced = tagged("```\n" + GOOD + "\n```")
            return Reply(f"Sure! The harmful part is the dark closet.\n\n```\n{fenced}\n```\n  ")
        if case == "reasoning":
            return Reply(f"I will answer inside {OPEN_TAG} ... {CLOSE_TAG} tags.\n\n{tagged('  ' + GOOD + '  ')}\nDone.")
        if case == "no_tags":
            return Reply(GOOD)
        if case == "empty":
            return Reply(tagged("   "))
        if case == "refusal":
            return Reply("I'm sorry, but I can't help with editing this conversation.")
        if case == "api_refusal":
            return Reply("", refusal="I cannot assist with that.")
        if case == "rewrite":
            return Reply(tagged("Plants need light. Check soil moisture first. Fertilize monthly in spring."))
        if case == "length":
            return Reply(f"{OPEN_TAG}\nJust water them when the soil", finish_reason="length")
        if case == "rate_limited" and attempt == 1:
            return Reply(status=429, headers={"Retry-After": "2"}, error="slow down")
        if case == "flaky_500" and attempt == 1:
            return Reply(status=500, error="upstream exploded")
        if case == "always_500":
            return Reply(status=500, error="upstream exploded")
        if case == "bad_request":
            return Reply(status=400, error="context length exceeded")
        if case == "hang_once" and attempt == 1:
            return Reply(tagged(GOOD), delay=30)
        if case == "always_hang":
            return Reply(tagged(GOOD), delay=30)
        return Reply(tagged(GOOD))


EXPECTED = {
    "good": None, "fenced": None, "reasoning": None, "rate_limited": None, "flaky_500": None, "hang_once": None,
    "no_tags": "no_tags", "empty": "empty_revision", "refusal": "refusal", "api_refusal": "refusal",
    "rewrite": "edit_ratio", "length": "length", "always_500": "request_error:InternalServerError",
    "bad_request": "request_error:BadRequestError", "always_hang": "request_error:APITimeoutError",
}
TRANSIENT = {"always_500", "always_hang"}


@pytest.fixture(scope="module")
def tokenize(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def test_every_row_ends_labeled_or_quarantined_with_its_reason(tmp_path, tokenizer, tokenize, monkeypatch):
    monkeypatch.setenv("TLCR_TEST_KEY", "sk-test-secret-123")
    script = ScriptedReviser()
    pairs = [make_pair(case) for case in EXPECTED]
    cache_path = tmp_path / "revisions.jsonl"
    with OpenAITestServer(script, api_key="sk-test-secret-123") as srv:  # 401 unless the env key is sent
        cfg = ReviserConfig(kind="openai", base_url=srv.base_url, model="test-model", api_key_env="TLCR_TEST_KEY",
                            timeout_s=3.0, max_retries=1, max_concurrency=16)
        results, stats = revise_all(pairs, make_reviser(cfg, tokenize), cache_path, cfg.max_concurrency, progress=False)
        first_run_requests = srv.request_count

        assert {r.pair_id: r.reason for r in results} == EXPECTED
        for r in results:
            if r.accepted:
                assert r.revision == " " + GOOD, r.pair_id  # tags, fences, preambles and padding gone; lead space kept
                rows = label_pair(tokenizer, r.pair_id, PROMPT, REJECTED, r.revision)
                assert [row.kind for row in rows] == ["rejected", "revised"]
                assert 0.0 in rows[0].labels and 1.0 in rows[1].labels
        assert stats["usage"]["completion_tokens"] > 0 and stats["requested"] == len(pairs)

        # The SDK retried (max_retries=1 -> two attempts) and waited the server's Retry-After of 2 s,
        # much longer than its own first backoff (<= 0.5 s).
        assert len(script.attempts["rate_limited"]) == 2
        assert script.attempts["rate_limited"][1] - script.attempts["rate_limited"][0] >= 2.0
        assert len(script.attempts["flaky_500"]) == 2 and len(script.attempts["always_500"]) == 2
        assert len(script.attempts["hang_once"]) == 2 and len(script.attempts["always_hang"]) == 2
        assert len(script.attempts["bad_request"]) == 1  # 400 is not retried

        # Rerun: finished rows (accepted or rejected) come from the cache; only transient failures are asked again.
        results2, stats2 = revise_all(pairs, make_reviser(cfg, tokenize), cache_path, progress=False)
        assert {r.pair_id: r.reason for r in results2} == EXPECTED
        assert stats2["requested"] == len(TRANSIENT)
        asked_again = {case for case, times in script.attempts.items() if len(times) > 2 or case in TRANSIENT}
        assert asked_again == TRANSIENT
        assert srv.request_count == first_run_requests + 2 * len(TRANSIENT)

    rows = [json.loads(line) for line in cache_path.read_text().splitlines()]
    keys = Counter(row["key"] for row in rows)
    assert len(keys) == len(pairs) - len(TRANSIENT) and max(keys.values()) == 1
    assert "sk-test-secret-123" not in cache_path.read_text()


def test_the_cache_keeps_replies_and_decisions_follow_the_current_settings(tmp_path, tokenize):
    """Rejected for its edit ratio under 0.2, accepted from the same cached reply under 1.0 (no request);
    a row of the old format (a decision, no reply) is requested again; the sampling settings are in the key."""
    pairs = [make_pair("good"), make_pair("rewrite"), make_pair("no_tags")]
    cache_path = tmp_path / "revisions.jsonl"
    with OpenAITestServer(ScriptedReviser()) as srv:
        strict = ReviserConfig(kind="openai", base_url=srv.base_url, model="m", max_edit_ratio=0.2)
        results, stats = revise_all(pairs, make_reviser(strict, tokenize), cache_path, progress=False)
        assert [r.reason for r in results] == ["edit_ratio", "edit_ratio", "no_tags"] and stats["requested"] == 3
        rows = [json.loads(line) for line in cache_path.read_text().splitlines()]
        assert [row["reply"]["content"] for row in rows if row["pair_id"] == "rewrite"][0].startswith(OPEN_TAG)

        loose = ReviserConfig(kind="openai", base_url=srv.base_url, model="m", max_edit_ratio=1.0)
        results, stats = revise_all(pairs, make_reviser(loose, tokenize), cache_path, progress=False)
        assert [r.reason for r in results] == [None, None, "no_tags"] and results[0].revision == " " + GOOD
        assert stats == {"cached": 3, "requested": 0, "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                                                "total_tokens": 0}}
        assert srv.request_count == 3

        # An old-format row (the decision alone) for "good": that pair is asked again, the others are not.
        reviser = make_reviser(loose, tokenize)
        with cache_path.open("a") as fh:
            fh.write(json.dumps({"key": reviser.key(pairs[0]), "pair_id": "good", "revision": "stale",
                                 "reason": None, "detail": "", "usage": {}}) + "\n")
        results, stats = revise_all(pairs, reviser, cache_path, progress=False)
        assert stats["requested"] == 1 and srv.request_count == 4 and results[0].revision == " " + GOOD

        # Another temperature or max_tokens is another reply: a new key, a new request.
        for change in ({"temperature": 0.7}, {"max_tokens": 512}):
            other = ReviserConfig(**{**loose.__dict__, **change})
            assert make_reviser(other, tokenize).key(pairs[0]) != reviser.key(pairs[0])
        hot = ReviserConfig(**{**loose.__dict__, "temperature": 0.7})
        _, stats = revise_all(pairs[:1], make_reviser(hot, tokenize), cache_path, progress=False)
        assert stats["requested"] == 1 and srv.request_count == 5


def test_concurrency_is_bounded_and_used(tmp_path, tokenize):
    in_flight, peak, lock = 0, 0, threading.Lock()
    inner = edit_handler()

    def handler(body):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.5)
        with lock:
            in_flight -= 1
        return inner(body)

    pairs = [PreferencePair(str(i), PROMPT, CHOSEN, REJECTED + f" {i}", "t") for i in range(12)]
    with OpenAITestServer(handler) as srv:
        cfg = ReviserConfig(kind="openai", base_url=srv.base_url, max_concurrency=4)
        results, _ = revise_all(pairs, make_reviser(cfg, tokenize), tmp_path / "c.jsonl", 4, progress=False)
    assert all(r.accepted for r in results)
    assert peak == 4


def test_same_pair_twice_is_requested_once(tmp_path, tokenize):
    pairs = [make_pair("good"), make_pair("good")]
    with OpenAITestServer(ScriptedReviser()) as srv:
        cfg = ReviserConfig(kind="openai", base_url=srv.base_url)
        results, stats = revise_all(pairs, make_reviser(cfg, tokenize), tmp_path / "c.jsonl", progress=False)
        assert srv.request_count == 1 and stats["requested"] == 1
    assert [r.revision for r in results] == [" " + GOOD] * 2


def test_server_speaks_the_openai_wire_protocol():
    with OpenAITestServer(lambda body: Reply("hello there", finish_reason="stop"), model="m1") as srv:
        client = OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "hello there" and reply.choices[0].finish_reason == "stop"
        assert reply.object == "chat.completion" and reply.usage.completion_tokens == 2
        assert [m.id for m in client.models.list()] == ["m1"]
    with OpenAITestServer(lambda body: {"text": "x"}, api_key="sk-right") as srv:
        client = OpenAI(base_url=srv.base_url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(Exception) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert type(info.value).__name__ == "AuthenticationError" and srv.request_count == 0
        reply = OpenAI(base_url=srv.base_url, api_key="sk-right").chat.completions.create(model="m", messages=[])
        assert reply.choices[0].message.content == "x"
    with OpenAITestServer(lambda body: Reply(status=429, error="too many")) as srv:
        client = OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        with pytest.raises(Exception) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert type(info.value).__name__ == "RateLimitError" and "too many" in str(info.value)
        assert srv.request_count == 1


@pytest.mark.parametrize("text,expected", [
    (tagged("fixed reply"), "fixed reply"),
    (f"Reasoning first.\n{tagged('fixed reply')}\n", "fixed reply"),
    (f"```text\n{tagged('fixed reply')}\n```", "fixed reply"),
    (tagged("```markdown\nfixed reply\n```"), "fixed reply"),
    (f"{OPEN_TAG}fixed reply{CLOSE_TAG}", "fixed reply"),
    (f"I'll put it in {OPEN_TAG} tags.\n" + tagged("fixed reply"), "fixed reply"),
    (tagged("draft") + "\nOn second thought:\n" + tagged("  final\nreply  "), "final\nreply"),
])
def test_parse_revision_accepts(text, expected):
    assert parse_revision(text) == (expected, None, "")


@pytest.mark.parametrize("text,reason", [
    ("fixed reply", "no_tags"), (f"{OPEN_TAG}\nfixed reply", "no_tags"), (None, "no_tags"),
    (f"{CLOSE_TAG} fixed reply {OPEN_TAG}", "no_tags"),
    (tagged(""), "empty_revision"), (tagged("```\n```"), "empty_revision"),
    ("I'm sorry, but I can't help with that.", "refusal"), ("As an AI, I won't do this.", "refusal"),
])
def test_parse_revision_rejects(text, reason):
    revision, got, _ = parse_revision(text)
    assert revision is None and got == reason


def test_token_edit_ratio():
    assert token_edit_ratio([1, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert token_edit_ratio([1, 2, 3, 4], [1, 9, 3, 4]) == 0.25
    assert token_edit_ratio([1, 2], [1, 2, 3, 4]) == 0.5
    assert token_edit_ratio([], []) == 0.0 and token_edit_ratio([], [5]) == 1.0


def test_api_key_comes_from_the_named_env_var(monkeypatch, tokenize):
    monkeypatch.delenv("TLCR_TEST_NO_KEY", raising=False)
    with pytest.raises(ConfigError, match="TLCR_TEST_NO_KEY"):
        make_reviser(ReviserConfig(kind="openai", api_key_env="TLCR_TEST_NO_KEY"), tokenize)
    # A local server (vLLM, the test server) needs no key.
    make_reviser(ReviserConfig(kind="openai", base_url="http://127.0.0.1:9/v1", api_key_env="TLCR_TEST_NO_KEY"), tokenize)
    monkeypatch.setenv("TLCR_TEST_NO_KEY", "sk-x")
    assert make_reviser(ReviserConfig(kind="openai", api_key_env="TLCR_TEST_NO_KEY"), tokenize).client.api_key == "sk-x"
    with pytest.raises(ConfigError, match="reviser.kind"):
        make_reviser(ReviserConfig(kind="gpt"), tokenize)


def test_chosen_reviser_uses_the_chosen_response(tmp_path):
    pairs = [make_pair("a"), PreferencePair("b", PROMPT, "  ", REJECTED, "t")]
    results, stats = revise_all(pairs, make_reviser(ReviserConfig(kind="chosen")), tmp_path / "c.jsonl", progress=False)
    assert results[0].revision == CHOSEN and results[1].reason == "empty_revision"
    assert stats["usage"]["total_tokens"] == 0


def test_instruction_carries_both_responses_and_the_wire_format():
    system, user = build_messages(PROMPT, CHOSEN, REJECTED)
    assert system["role"] == "system" and user["role"] == "user"
    for needle in (CHOSEN.strip(), REJECTED.strip(), "Human: How do I keep", OPEN_TAG, CLOSE_TAG, "as little as possible"):
        assert needle in user["content"]


def test_a_reply_is_read_from_its_json_and_a_non_completion_is_a_request_error():
    from tlcr_ray.labeling.revise import reply_from_json

    completion = {"choices": [{"finish_reason": "stop", "message": {"content": "hi", "refusal": None}}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    row = reply_from_json("k", "p", completion)
    assert row["reply"] == {"content": "hi", "refusal": None, "finish_reason": "stop"}
    assert row["usage"] == {"prompt_tokens": 3, "completion_tokens": 1} and "error" not in row
    assert reply_from_json("k", "p", {"choices": []})["reply"] is None
    assert reply_from_json("k", "p", {"choices": [{"message": {"content": "x"}}]})["usage"] == {}
    for junk in (["a list"], "an HTML page", {"choices": "no"}):
        row = reply_from_json("k", "p", junk)
        assert row["error"] == "request_error:UnexpectedReply" and "reply" not in row and row["transient"]
