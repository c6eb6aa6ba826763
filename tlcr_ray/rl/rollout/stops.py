"""Stop strings on token ids: where a generated response ends when it runs into a marker (`ppo.stop`).

    ids, stopped = cut_at_stop(response_ids, tokenizer, ["\\n\\nHuman:"], eos_id=tokenizer.eos_token_id)

Sampling from HH-format prompts continues past the answer into an invented "\\n\\nHuman:" turn. A
response that contains a stop string ends before it: its ids are cut before the token in which the
first marker starts (a marker that starts inside a token takes that whole token with it), and the
EOS id is appended, so the row is an ordinary stopped response (finish reason "stop", EOS last,
docs/algorithm.md §6). Both rollout backends apply this same function to what they generated; their
own stop mechanisms only save the compute of the tokens after the marker.
"""
from __future__ import annotations


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def contains_stop(tokenizer, ids: list[int], stops: list[str]) -> bool:
    """Whether the decoded `ids` contain any of `stops`."""
    text = _decode(tokenizer, ids)
    return any(stop in text for stop in stops)


def window_tokens(stops: list[str]) -> int:
    """How many trailing tokens always hold a stop string that has just been completed: a token
    decodes to at least one byte, and the token the marker starts in may hold bytes before it."""
    return max((len(stop.encode("utf-8")) for stop in stops), default=0) + 1


def cut_at_stop(ids: list[int], tokenizer, stops: list[str], eos_id: int) -> tuple[list[int], bool]:
    """-> (ids cut before the first stop string + [eos_id], True), or (ids unchanged, False) when the
    response (up to its first EOS, if any) contains none of `stops`."""
    ids = list(ids)
    if not stops:
        return ids, False
    body = ids[:ids.index(eos_id)] if eos_id in ids else ids
    if not contains_stop(tokenizer, body, stops):
        return ids, False
    # k: the fewest tokens whose text holds a marker; the marker starts at `start` of that text.
    k = next(k for k in range(1, len(body) + 1) if contains_stop(tokenizer, body[:k], stops))
    text = _decode(tokenizer, body[:k])
    start = min(text.find(stop) for stop in stops if stop in text)
    before = text[:start]
    # The longest prefix of tokens whose text lies wholly before the marker (a prefix ending in half a
    # character decodes to U+FFFD, is no prefix of `before`, and is skipped).
    j = next(j for j in range(k - 1, -1, -1) if before.startswith(_decode(tokenizer, body[:j])))
    return body[:j] + [eos_id], True
