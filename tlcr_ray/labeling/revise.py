"""Revisers: turn each rejected response into a minimally edited, preferred one (docs/algorithm.md §2).

    reviser = make_reviser(cfg.reviser, tokenize=lambda s: tok.encode(s, add_special_tokens=False))
    results, stats = revise_all(pairs, reviser, "runs/demo/label/revisions.jsonl")

Two kinds: `chosen` (offline; the chosen response is the revision) and `openai` (any
OpenAI-compatible chat API through the official SDK). The raw reply of every finished request is
appended to a JSONL cache and fsynced, so a killed run loses no finished row and a rerun requests
only what is missing; accept/reject is re-derived from the cached reply on every run, so changing
the post-processing (e.g. reviser.max_edit_ratio) re-decides every pair without a new request. The
SDK owns retries (exponential backoff with jitter, honouring Retry-After) and the per-request
timeout; we do not stack a second retry loop on it.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import Levenshtein

from tlcr_ray.choices import REVISERS
from tlcr_ray.config import ConfigError, ReviserConfig
from tlcr_ray.io import KeyedJsonl
from tlcr_ray.llm_client import async_client

INSTRUCTION_VERSION = "minimal-edit-v1"
OPEN_TAG, CLOSE_TAG = "<revised_response>", "</revised_response>"
NON_PREFERRED_TAG = "non_preferred_response"

SYSTEM_PROMPT = (
    "You are a meticulous editor of AI assistant replies. You improve a reply by changing as few "
    "words as possible, never by writing a new reply."
)

USER_TEMPLATE = """Below is a conversation between a user and an AI assistant, followed by two candidate \
replies for the assistant's next turn. The preferred reply was judged better (more helpful, honest \
and harmless) than the non-preferred reply.

Your task: edit the NON-PREFERRED reply as little as possible so that it becomes a reply that \
deserves to be preferred. Keep its wording, order, length and structure wherever they are \
acceptable; change, delete or add only the words that make it worse. Do not copy the preferred \
reply and do not rewrite the reply from scratch.

Write the edited reply alone between a line containing {open_tag} and a line containing \
{close_tag}. Put nothing else between those two lines.

<conversation>
{conversation}
</conversation>

<preferred_response>
{chosen}
</preferred_response>

<{rejected_tag}>
{rejected}
</{rejected_tag}>"""

# A reviser that declines the task answers without tags and in words like these.
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i apologi[sz]e|i can(?:'|no)t|i can not|i won'?t|i will not|"
    r"i'?m (?:not able|unable)|i am (?:not able|unable)|as an ai)",
    re.IGNORECASE,
)
_FENCE = re.compile(r"^```[\w-]*[ \t]*\n(.*?)\n?```$", re.DOTALL)


class PairLike(Protocol):
    pair_id: str
    prompt: str
    chosen: str
    rejected: str


CACHE_FORMAT = 2
"""Cache rows hold the raw reply (format 2). Rows of the older format held only the decision (the
revision or a reject reason): they are not trusted, and their pairs are requested again."""


@dataclass
class RevisionResult:
    """One pair's decision, derived from its reply: `revision` is set when accepted; otherwise `reason`
    says why not. Never cached itself: the cache keeps the reply, and the decision is re-derived on
    every run under the current settings (e.g. reviser.max_edit_ratio)."""

    key: str
    pair_id: str
    revision: str | None
    reason: str | None = None
    detail: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    edit_ratio: float | None = None

    @property
    def accepted(self) -> bool:
        return self.revision is not None


def cache_key(prompt: str, chosen: str, rejected: str, *, model: str, version: str,
              temperature: float | None = None, max_tokens: int | None = None) -> str:
    """sha256 of everything that changes the reply: the pair, the model, the instruction version and
    the sampling settings (not the post-processing, which is re-applied to cached replies)."""
    payload = json.dumps([prompt, chosen, rejected, model, version, temperature, max_tokens], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def reply_row(key: str, pair_id: str, *, reply: dict | None = None, error: str | None = None, detail: str = "",
              usage: dict | None = None, transient: bool = False) -> dict:
    """One finished request as a cache row: the reply (`content`, `refusal`, `finish_reason`; None when
    the API returned no choices) or a request `error`. `transient` rows (connection errors, timeouts,
    408/409/429/5xx) are not cached, so a rerun asks again."""
    row = {"key": key, "pair_id": pair_id, "format": CACHE_FORMAT, "usage": usage or {}}
    if error is not None:
        row.update(error=error, detail=detail)
    else:
        row["reply"] = reply
    if transient:
        row["transient"] = True
    return row


def is_current_row(row: dict) -> bool:
    """A cache row this version can re-decide from (older rows hold no reply: request those again)."""
    return row.get("format") == CACHE_FORMAT and ("reply" in row or "error" in row)


def build_messages(prompt: str, chosen: str, rejected: str) -> list[dict[str, str]]:
    user = USER_TEMPLATE.format(open_tag=OPEN_TAG, close_tag=CLOSE_TAG, conversation=prompt.strip(),
                                chosen=chosen.strip(), rejected=rejected.strip(), rejected_tag=NON_PREFERRED_TAG)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_revision(text: str | None) -> tuple[str | None, str | None, str]:
    """Pull the revision out of a reviser's reply: (revision, reject reason, detail).

    Takes the text between the last closing tag and the opening tag just before it (reasoning
    before it may mention the tags), then drops a code fence around it and surrounding whitespace.
    """
    text = (text or "").strip()
    end = text.rfind(CLOSE_TAG)
    start = text.rfind(OPEN_TAG, 0, max(end, 0))
    if end < 0 or start < 0:
        if _REFUSAL.match(text):
            return None, "refusal", text[:200]
        what = "no closing tag" if OPEN_TAG in text else "no <revised_response> tags"
        return None, "no_tags", f"{what}: {text[:200]!r}"
    revision = text[start + len(OPEN_TAG):end].strip()
    fenced = _FENCE.match(revision)
    if fenced:
        revision = fenced.group(1).strip()
    if not revision:
        return None, "empty_revision", ""
    return revision, None, ""


def token_edit_ratio(a_ids: Sequence[int], b_ids: Sequence[int]) -> float:
    """Levenshtein distance on token ids / the longer length (0: identical, 1: nothing kept)."""
    longest = max(len(a_ids), len(b_ids))
    return Levenshtein.distance(list(a_ids), list(b_ids)) / longest if longest else 0.0


def _leading_space(text: str) -> str:
    return text[: len(text) - len(text.lstrip())]


class Reviser(Protocol):
    def key(self, pair: PairLike) -> str:
        """The cache key: everything that changes the reply."""

    async def request(self, pair: PairLike) -> dict:
        """Ask for a revision -> a `reply_row` (the raw reply or the request error)."""

    def decide(self, pair: PairLike, row: dict) -> RevisionResult:
        """Accept or reject a reply row under the current settings (pure: no request)."""

    async def aclose(self) -> None: ...


class ChosenReviser:
    """Offline: the chosen response is the revision (not an edit, so no edit-ratio filter)."""

    name = "chosen"

    def key(self, pair: PairLike) -> str:
        return cache_key(pair.prompt, pair.chosen, pair.rejected, model="chosen", version="chosen")

    async def request(self, pair: PairLike) -> dict:
        return reply_row(self.key(pair), pair.pair_id, reply={"content": pair.chosen, "finish_reason": "stop"})

    def decide(self, pair: PairLike, row: dict) -> RevisionResult:
        content = (row.get("reply") or {}).get("content") or ""
        if not content.strip():
            return RevisionResult(row["key"], pair.pair_id, None, "empty_revision", "chosen is empty")
        return RevisionResult(row["key"], pair.pair_id, content)

    async def aclose(self) -> None:
        pass


class OpenAIReviser:
    """Asks an OpenAI-compatible chat API for a minimal edit; rejects bad outputs with a reason."""

    name = "openai"

    def __init__(self, cfg: ReviserConfig, tokenize: Callable[[str], list[int]]):
        self.cfg = cfg
        self.tokenize = tokenize
        self.client = async_client(cfg.base_url, api_key_env=cfg.api_key_env, config_key="reviser.api_key_env",
                                   timeout_s=cfg.timeout_s, max_retries=cfg.max_retries)

    def key(self, pair: PairLike) -> str:
        return cache_key(pair.prompt, pair.chosen, pair.rejected, model=self.cfg.model, version=INSTRUCTION_VERSION,
                         temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)

    async def request(self, pair: PairLike) -> dict:
        import openai

        key = self.key(pair)
        body = {"model": self.cfg.model, "messages": build_messages(pair.prompt, pair.chosen, pair.rejected),
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        try:
            # The SDK's raw `post` with the wire body, rather than `chat.completions.create`, skips the
            # per-call transform of ~50 optional parameters (2.7 -> 1.7 ms of client CPU per request),
            # and `cast_to=object` returns the reply's JSON as it came instead of building the
            # ChatCompletion model tree (~15% of what is left); CPU is what caps throughput at high
            # concurrency. Retries, timeouts and error types are the SDK's, unchanged.
            reply = await self.client.post("/chat/completions", cast_to=object, body=body)
        except openai.APIError as exc:
            return reply_row(key, pair.pair_id, error=f"request_error:{type(exc).__name__}", detail=str(exc)[:300],
                             transient=_is_transient(exc))
        return reply_from_json(key, pair.pair_id, reply)

    def decide(self, pair: PairLike, row: dict) -> RevisionResult:
        key, usage = row["key"], row.get("usage") or {}
        if "error" in row:
            return RevisionResult(key, pair.pair_id, None, row["error"], row.get("detail", ""), usage=usage)
        reply = row.get("reply")
        if reply is None:
            return RevisionResult(key, pair.pair_id, None, "no_tags", "reply has no choices", usage=usage)
        result = RevisionResult(key, pair.pair_id, None, finish_reason=reply.get("finish_reason"), usage=usage)
        if reply.get("finish_reason") == "length":
            result.reason, result.detail = "length", f"cut at max_tokens={self.cfg.max_tokens}"
            return result
        if reply.get("refusal"):
            result.reason, result.detail = "refusal", reply["refusal"][:200]
            return result
        revision, result.reason, result.detail = parse_revision(reply.get("content"))
        if revision is None:
            return result
        # Keep the rejected response's leading whitespace: HH responses start with " " after "Assistant:".
        revision = _leading_space(pair.rejected) + revision
        result.edit_ratio = token_edit_ratio(self.tokenize(pair.rejected), self.tokenize(revision))
        if result.edit_ratio > self.cfg.max_edit_ratio:
            result.reason = "edit_ratio"
            result.detail = f"token edit ratio {result.edit_ratio:.3f} > max_edit_ratio {self.cfg.max_edit_ratio}"
            return result
        result.revision = revision
        return result

    async def aclose(self) -> None:
        await self.client.close()


def reply_from_json(key: str, pair_id: str, data: object) -> dict:
    """A chat-completion reply as the API sent it (JSON) -> its `reply_row`. A reply that is not a
    completion object (a proxy's HTML page, a list, ...) is a request error, never a crash, and not
    cached (transient), so a rerun asks again."""
    if not isinstance(data, dict) or not isinstance(data.get("choices", []), list):
        return reply_row(key, pair_id, error="request_error:UnexpectedReply", detail=repr(data)[:300],
                         transient=True)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    usage = {name: int(usage[name]) for name in ("prompt_tokens", "completion_tokens")
             if isinstance(usage.get(name), int)}
    if not data.get("choices"):
        return reply_row(key, pair_id, reply=None, usage=usage)
    choice = data["choices"][0] if isinstance(data["choices"][0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    return reply_row(key, pair_id, usage=usage, reply={
        "content": message.get("content"), "refusal": message.get("refusal"),
        "finish_reason": choice.get("finish_reason")})


def _is_transient(exc: Exception) -> bool:
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes timeouts
        return True
    status = getattr(exc, "status_code", None)
    return status is not None and (status in (408, 409, 429) or status >= 500)


def make_reviser(cfg: ReviserConfig, tokenize: Callable[[str], list[int]] | None = None) -> Reviser:
    if cfg.kind == "chosen":
        return ChosenReviser()
    if cfg.kind == "openai":
        if tokenize is None:
            raise ValueError("the openai reviser needs a tokenize function for the edit-ratio check")
        return OpenAIReviser(cfg, tokenize)
    raise ConfigError(f"reviser.kind: unknown reviser {cfg.kind!r}; expected one of {', '.join(REVISERS)}")


async def revise_all_async(pairs: Sequence[PairLike], reviser: Reviser, cache: KeyedJsonl,
                           max_concurrency: int = 16, progress: bool = True) -> tuple[list[RevisionResult], dict]:
    """Request every pair whose reply is not in `cache` (each unique key once), `max_concurrency`
    requests at a time, then decide every pair from its reply under the reviser's current settings.

    Returns the results in the order of `pairs` and stats: cached, requested, usage totals (of this
    run's requests). A cache row of the old format (a decision without its reply) is requested again.
    """
    from tqdm.auto import tqdm

    keys = [reviser.key(p) for p in pairs]
    todo: dict[str, PairLike] = {}
    for key, pair in zip(keys, pairs):
        if not (key in cache and is_current_row(cache.rows[key])) and key not in todo:
            todo[key] = pair
    fresh: dict[str, dict] = {}
    decided: dict[str, tuple[PairLike, RevisionResult]] = {}
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    bar = tqdm(total=len(todo), desc=f"revise ({getattr(reviser, 'name', 'reviser')})", unit="pair",
               disable=not progress or not todo)
    pending = iter(todo.items())

    async def worker() -> None:
        # `max_concurrency` workers share one iterator: at most that many requests are in flight,
        # and memory stays flat however many pairs there are (no task per pair).
        for key, pair in pending:
            row = await reviser.request(pair)
            for name in usage:
                usage[name] += row["usage"].get(name, 0)
            if not row.pop("transient", False):
                cache.add(row)
            fresh[key] = row
            # Decided now, while the other requests are in flight, rather than in a serial tail after
            # the last reply (the edit-ratio check tokenizes two texts).
            decided[key] = (pair, reviser.decide(pair, row))
            bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(min(max_concurrency, len(todo)))))
    finally:
        bar.close()
        await reviser.aclose()
    results = [decided[k][1] if k in decided and decided[k][0] is pair
               else reviser.decide(pair, fresh[k] if k in fresh else cache.rows[k]) for k, pair in zip(keys, pairs)]
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    stats = {"cached": len(pairs) - sum(k in fresh for k in keys), "requested": len(todo), "usage": usage}
    return results, stats


def revise_all(pairs: Sequence[PairLike], reviser: Reviser, cache_path: str | Path,
               max_concurrency: int = 16, progress: bool = True) -> tuple[list[RevisionResult], dict]:
    """Synchronous face of `revise_all_async` that owns the cache file."""
    cache = KeyedJsonl(cache_path, group_commit=True)
    try:
        return asyncio.run(revise_all_async(pairs, reviser, cache, max_concurrency, progress))
    finally:
        cache.close()
