"""LLM-as-a-judge for the benchmark harness: MT-Bench single-answer grading and pairwise comparison.

    templates = load_templates("data/mt-bench/judge_prompts.jsonl")
    requests = mt_bench_requests(question, answers, templates, reference, judge_model="gpt-4")
    records = judge_all(requests, "runs/demo/eval/mt-bench/judgments.jsonl", cfg.eval, "gpt-4", None)

Every request is cached under a hash of what decides its verdict (judge model, rendered system and
user prompt, parser version), so a rerun sends only what is missing. Each finished judgment is
appended and fsynced; a failed one (HTTP error after the SDK's own retries, timeout, unparsable
reply) is appended with `status: "error"` and a reason, and is requested again on the next run.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from tlcr_ray.config import EvalConfig
from tlcr_ray.io import KeyedJsonl, iter_jsonl
from tlcr_ray.llm_client import DEFAULT_BASE_URL, api_key_from_env, async_client

JUDGE_VERSION = "judge-v1"
"""Bump when the parsers or our pairwise prompt change: old cached judgments are then ignored."""
MT_BENCH_REF_CATEGORIES = ("math", "reasoning", "coding")
"""Categories graded against GPT-4's reference answer (the single-math-v1 templates), as in MT-Bench."""

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_VERDICT = re.compile(r"\[\[\s*(A|B|TIE)\s*\]\]", re.IGNORECASE)

PAIRWISE_SYSTEM = (
    "You compare two replies written by AI assistants for the same user instruction and decide which "
    "one serves the user better. You are fair: the order in which the replies are shown, their length "
    "and the assistants' names must not sway you."
)
PAIRWISE_TEMPLATE = """Read the user's instruction and the two replies below. Judge which reply follows the \
instruction more faithfully and is more helpful, correct, clear and complete. A longer reply is not \
better for being longer.

Explain your reasoning in a few sentences. Then, on the last line, give your decision as exactly one \
of these tokens: [[A]] if reply A is better, [[B]] if reply B is better, [[TIE]] if neither is better.

<instruction>
{instruction}
</instruction>

<reply_A>
{reply_a}
</reply_A>

<reply_B>
{reply_b}
</reply_B>"""


@dataclass
class JudgeRequest:
    key: str
    """Cache key: sha1 of judge model, kind, template, both prompts and JUDGE_VERSION."""
    kind: str
    """`rating` (a 1-10 score) or `pairwise` (A, B or tie)."""
    template: str
    system: str
    prompt: str
    meta: dict = field(default_factory=dict)
    """Benchmark fields copied into the record (question_id, turn, category, model_position...)."""


def make_request(kind: str, template: str, system: str, prompt: str, judge_model: str, meta: dict) -> JudgeRequest:
    blob = json.dumps([JUDGE_VERSION, judge_model, kind, template, system, prompt], ensure_ascii=False)
    key = hashlib.sha1(blob.encode("utf-8")).hexdigest()
    return JudgeRequest(key, kind, template, system, prompt, meta)


def load_templates(path: str | Path) -> dict[str, dict]:
    """MT-Bench's judge_prompts.jsonl -> {name: {system_prompt, prompt_template, ...}}."""
    templates = {}
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict) or "name" not in row:
            raise ValueError(f"{path}:{lineno}: bad judge template row (no 'name')")
        templates[row["name"]] = row
    return templates


def mt_bench_requests(question: dict, answers: list[str], templates: dict[str, dict],
                      reference: list[str] | None, judge_model: str) -> list[JudgeRequest]:
    """Two single-answer grading requests (turn 1, turn 2) for one MT-Bench question.

    Turn 2 is graded on the whole conversation, focusing on the second answer (MT-Bench's
    `*-multi-turn` templates). `reference` (turn 1, turn 2 reference answers) switches to the
    `single-math-v1*` templates.
    """
    q1, q2 = question["turns"][:2]
    fields = {"question": q1, "answer": answers[0], "question_1": q1, "question_2": q2,
              "answer_1": answers[0], "answer_2": answers[1]}
    prefix = "single-v1"
    if reference is not None:
        prefix = "single-math-v1"
        fields.update(ref_answer_1=reference[0], ref_answer_2=reference[1])
    requests = []
    for turn, name in ((1, prefix), (2, f"{prefix}-multi-turn")):
        tpl = templates[name]
        meta = {"question_id": question["question_id"], "category": question["category"], "turn": turn}
        requests.append(make_request("rating", name, tpl["system_prompt"], tpl["prompt_template"].format(**fields),
                                     judge_model, meta))
    return requests


def pairwise_request(item_id: int, instruction: str, output: str, reference: str, judge_model: str,
                     seed: int) -> JudgeRequest:
    """Model answer vs reference in a seeded random order (stable across reruns, so caching works)."""
    digest = hashlib.sha1(f"{seed}:{instruction}".encode("utf-8")).hexdigest()
    model_first = random.Random(digest).random() < 0.5
    reply_a, reply_b = (output, reference) if model_first else (reference, output)
    prompt = PAIRWISE_TEMPLATE.format(instruction=instruction, reply_a=reply_a, reply_b=reply_b)
    meta = {"item": item_id, "model_position": "A" if model_first else "B"}
    return make_request("pairwise", "pairwise-v1", PAIRWISE_SYSTEM, prompt, judge_model, meta)


def parse_rating(text: str | None) -> tuple[float | None, str | None]:
    """The last `[[n]]` in the judgment, 1 <= n <= 10 -> (score, None); otherwise (None, reason).

    The last, not the first: the templates quote "Rating: [[5]]" as an example a judge may echo.
    """
    if not text:
        return None, "unparsable: empty judgment"
    found = _RATING.findall(text)
    if not found:
        return None, "unparsable: no [[rating]] in the judgment"
    score = float(found[-1])
    if not 1.0 <= score <= 10.0:
        return None, f"unparsable: rating {found[-1]} outside 1-10"
    return score, None


def parse_verdict(text: str | None) -> tuple[str | None, str | None]:
    """The last `[[A]]`, `[[B]]` or `[[TIE]]` -> ("A" | "B" | "tie", None); otherwise (None, reason)."""
    if not text:
        return None, "unparsable: empty judgment"
    found = _VERDICT.findall(text)
    if not found:
        return None, "unparsable: no [[A]], [[B]] or [[TIE]] in the judgment"
    verdict = found[-1].upper()
    return ("tie" if verdict == "TIE" else verdict), None


def judge_api_key(cfg: EvalConfig, base_url: str) -> str:
    return api_key_from_env(cfg.api_key_env, base_url, "eval.api_key_env")


async def _judge_one(client, request: JudgeRequest, judge_model: str, cfg: EvalConfig) -> dict:
    import openai

    row = {"key": request.key, "judge_model": judge_model, "template": request.template, **request.meta,
           "status": "error", "reason": None, "judgment": None}
    try:
        reply = await client.chat.completions.create(
            model=judge_model, temperature=0.0, max_tokens=cfg.judge_max_tokens,
            messages=[{"role": "system", "content": request.system}, {"role": "user", "content": request.prompt}])
    except openai.APIError as exc:  # the SDK has already retried 5xx, 429 and timeouts
        row["reason"] = f"request_error: {type(exc).__name__}: {str(exc)[:300]}"
        return row
    text = reply.choices[0].message.content if reply.choices else None
    row["judgment"] = text
    if request.kind == "rating":
        row["score"], row["reason"] = parse_rating(text)
        ok = row["score"] is not None
    else:
        verdict, row["reason"] = parse_verdict(text)
        ok = verdict is not None
        if ok:  # translate the position back: which of the two answers won
            row["verdict"] = verdict
            row["winner"] = "tie" if verdict == "tie" else \
                ("model" if verdict == request.meta["model_position"] else "reference")
    row["status"] = "ok" if ok else "error"
    return row


async def _judge_missing(requests: list[JudgeRequest], cache: KeyedJsonl, cfg: EvalConfig, judge_model: str,
                         base_url: str) -> None:
    client = async_client(base_url, api_key_env=cfg.api_key_env, config_key="eval.api_key_env",
                          timeout_s=cfg.timeout_s, max_retries=cfg.max_retries)
    gate = asyncio.Semaphore(cfg.max_concurrency)
    bar = tqdm(total=len(requests), desc=f"judging ({judge_model})", unit="judgment")

    async def one(request: JudgeRequest) -> None:
        async with gate:
            row = await _judge_one(client, request, judge_model, cfg)
        cache.add(row)  # single event-loop thread: appends never interleave
        bar.update(1)

    try:
        await asyncio.gather(*(one(r) for r in requests))
    finally:
        bar.close()
        await client.close()


def judge_all(requests: list[JudgeRequest], cache_path: str | Path, cfg: EvalConfig, judge_model: str,
              base_url: str | None) -> dict[str, dict]:
    """Judge every request not already judged successfully; -> {key: record} for all `requests`."""
    unique = {r.key: r for r in requests}
    with KeyedJsonl(cache_path) as cache:
        missing = [r for k, r in unique.items() if cache.rows.get(k, {}).get("status") != "ok"]
        if missing:
            asyncio.run(_judge_missing(missing, cache, cfg, judge_model, base_url or DEFAULT_BASE_URL))
        return {k: cache.rows[k] for k in unique}
