"""Revisers: turn each rejected response into a minimally edited, preferred one (docs/algorithm.md §2).

    reviser = make_reviser(cfg.reviser, tokenize=lambda s: tok.encode(s, add_special_tokens=False))
    results, stats = revise_all(pairs, reviser, "runs/demo/label/revisions.jsonl")

Two kinds: `chosen` (offline; the chosen response is the revision) and `openai` (any
OpenAI-compatible chat API through the official SDK). Every finished result, accepted or
rejected, is appended to a JSONL cache and fsynced, so a killed run loses no finished row and a
rerun requests only what is missing. The SDK owns retries (exponential backoff with jitter,
honouring Retry-After) and the per-request timeout; we do not stack a second retry loop on it.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import Levenshtein

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


@dataclass
class RevisionResult:
    """One finished pair: `revision` is set when accepted; otherwise `reason` says why not."""

    key: str
    pair_id: str
    revision: str | None
    reason: str | None = None
    detail: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    edit_ratio: float | None = None
    cacheable: bool = True
    """False for transient request failures, so a rerun asks again instead of trusting the cache."""

    @property
    def accepted(self) -> bool:
        return self.revision is not None

    def to_row(self) -> dict:
        row = asdict(self)
        row.pop("cacheable")
        return row


def cache_key(prompt: str, chosen: str, rejected: str, model: str, version: str) -> str:
    payload = json.dumps([prompt, chosen, rejected, model, version], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


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
    def key(self, pair: PairLike) -> str: ...

    async def revise(self, pair: PairLike) -> RevisionResult: ...

    async def aclose(self) -> None: ...


class ChosenReviser:
    """Offline: the chosen response is the revision (not an edit, so no edit-ratio filter)."""

    name = "chosen"

    def key(self, pair: PairLike) -> str:
        return cache_key(pair.prompt, pair.chosen, pair.rejected, "chosen", "chosen")

    async def revise(self, pair: PairLike) -> RevisionResult:
        if not pair.chosen.strip():
            return RevisionResult(self.key(pair), pair.pair_id, None, "empty_revision", "chosen is empty")
        return RevisionResult(self.key(pair), pair.pair_id, pair.chosen)

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
        return cache_key(pair.prompt, pair.chosen, pair.rejected, self.cfg.model, INSTRUCTION_VERSION)

    async def revise(self, pair: PairLike) -> RevisionResult:
        import openai
        from openai.types.chat import ChatCompletion

        key = self.key(pair)
        body = {"model": self.cfg.model, "messages": build_messages(pair.prompt, pair.chosen, pair.rejected),
                "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}
        try:
            # The SDK's raw `post` with the wire body, rather than `chat.completions.create`, skips the
            # per-call transform of ~50 optional parameters: 2.7 -> 1.7 ms of client CPU per request
            # measured here, and CPU is what caps throughput at high concurrency. Retries, timeouts,
            # error types and response parsing are the same code path.
            reply = await self.client.post("/chat/completions", cast_to=ChatCompletion, body=body)
        except openai.APIError as exc:
            return RevisionResult(key, pair.pair_id, None, f"request_error:{type(exc).__name__}",
                                  str(exc)[:300], cacheable=not _is_transient(exc))
        usage = {"prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": reply.usage.completion_tokens} \
            if reply.usage else {}
        if not reply.choices:
            return RevisionResult(key, pair.pair_id, None, "no_tags", "reply has no choices", usage=usage)
        choice = reply.choices[0]
        result = RevisionResult(key, pair.pair_id, None, finish_reason=choice.finish_reason, usage=usage)
        if choice.finish_reason == "length":
            result.reason, result.detail = "length", f"cut at max_tokens={self.cfg.max_tokens}"
            return result
        if getattr(choice.message, "refusal", None):
            result.reason, result.detail = "refusal", choice.message.refusal[:200]
            return result
        revision, result.reason, result.detail = parse_revision(choice.message.content)
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
    raise ConfigError(f"reviser.kind: unknown reviser {cfg.kind!r}; expected chosen or openai")


def result_from_row(row: dict) -> RevisionResult:
    return RevisionResult(**{k: v for k, v in row.items() if k in RevisionResult.__dataclass_fields__})


async def revise_all_async(pairs: Sequence[PairLike], reviser: Reviser, cache: KeyedJsonl,
                           max_concurrency: int = 16, progress: bool = True) -> tuple[list[RevisionResult], dict]:
    """Revise every pair not in `cache` (each unique key once), `max_concurrency` requests at a time.

    Returns the results in the order of `pairs` and stats: cached, requested, usage totals.
    """
    from tqdm.auto import tqdm

    keys = [reviser.key(p) for p in pairs]
    todo: dict[str, PairLike] = {}
    for key, pair in zip(keys, pairs):
        if key not in cache and key not in todo:
            todo[key] = pair
    fresh: dict[str, RevisionResult] = {}
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    bar = tqdm(total=len(todo), desc=f"revise ({getattr(reviser, 'name', 'reviser')})", unit="pair",
               disable=not progress or not todo)
    pending = iter(todo.items())

    async def worker() -> None:
        # `max_concurrency` workers share one iterator: at most that many requests are in flight,
        # and memory stays flat however many pairs there are (no task per pair).
        for key, pair in pending:
            result = await reviser.revise(pair)
            for name in usage:
                usage[name] += result.usage.get(name, 0)
            if result.cacheable:
                cache.add(result.to_row())
            fresh[key] = result
            bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(min(max_concurrency, len(todo)))))
    finally:
        bar.close()
        await reviser.aclose()
    results = [fresh[k] if k in fresh else result_from_row(cache.rows[k]) for k in keys]
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
