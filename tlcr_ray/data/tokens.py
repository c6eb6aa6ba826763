"""Joint tokenization of a (prompt, response) pair: the one place that decides where a response begins.

    enc = encode_prompt_response(tokenizer, prompt, response, max_prompt_len=256, max_response_len=256)
    enc.input_ids[enc.response_start:]        # the response's token ids
    enc.response_offsets[0]                   # (start, end) of its first token, as chars of `response`
    enc = append_eos(enc, tokenizer.eos_token_id)   # + EOS, unless the response was truncated

Tokenizing prompt and response separately and concatenating gives ids the model never sees at
generation time when BPE merges across the boundary ("Hello wor" + "ld" -> "Hello", " world"). So the
pair is tokenized as one text and split by character offset: a token that holds any response character
belongs to the response. Without a merge this equals `tokenize(prompt)` followed by the response tokens.
Needs a fast (Rust) tokenizer for the offset mapping.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Encoded:
    input_ids: list[int]
    """Prompt + response ids, no padding."""
    response_start: int
    """Index in `input_ids` of the first response token (== len(input_ids) for an empty response)."""
    response_offsets: list[tuple[int, int]]
    """(start, end) char span in `response` of each response token; a boundary-merged token starts at 0.
    An appended EOS has the empty span (len(response), len(response))."""
    truncated: bool = False
    """The response had more than `max_response_len` tokens and was cut (such a response gets no EOS)."""

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start:]

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.response_start]


def _bos(tokenizer) -> list[int]:
    # SmolLM2 adds no BOS; Llama-style tokenizers do, and the model expects it at the very start.
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    return []


def encode_prompt_response(tokenizer, prompt: str, response: str, max_prompt_len: int | None = None,
                           max_response_len: int | None = None) -> Encoded:
    """Tokenize prompt+response jointly; left-truncate the prompt and right-truncate the response."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("encode_prompt_response needs a fast tokenizer (offset mapping); "
                         f"got {type(tokenizer).__name__}")
    enc = tokenizer(prompt + response, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    boundary = len(prompt)
    start = next((i for i, (_, end) in enumerate(offsets) if end > boundary), len(ids))
    bos = _bos(tokenizer)
    prompt_ids = bos + ids[:start]
    if max_prompt_len is not None and len(prompt_ids) > max_prompt_len:
        keep = max(max_prompt_len - len(bos), 0)
        prompt_ids = bos + (ids[start - keep:start] if keep else [])
    response_ids = ids[start:]
    response_offsets = [(max(s - boundary, 0), e - boundary) for s, e in offsets[start:]]
    truncated = max_response_len is not None and len(response_ids) > max_response_len
    if truncated:
        response_ids, response_offsets = response_ids[:max_response_len], response_offsets[:max_response_len]
    return Encoded(list(prompt_ids) + list(response_ids), len(prompt_ids), response_offsets, truncated)


def append_eos(enc: Encoded, eos_id: int | None, response_chars: int | None = None) -> Encoded:
    """`enc` with the end-of-sequence token as its last response token (docs/algorithm.md §3).

    A PPO response that stopped ends with the EOS it sampled, so labels, training examples and the
    scoring API end a complete response the same way. Unchanged when the response was truncated (it
    did not end), when there is no EOS id, or when the response already ends with it (its text
    ended with the EOS token's text, which the tokenizer maps to the EOS id). The EOS gets the empty
    character span (n, n), n = `response_chars` (pass len(response)), else the last token's end.
    """
    if eos_id is None or enc.truncated or (enc.response_ids and enc.input_ids[-1] == eos_id):
        return enc
    end = response_chars
    if end is None:
        end = enc.response_offsets[-1][1] if enc.response_offsets else 0
    return Encoded(enc.input_ids + [eos_id], enc.response_start, enc.response_offsets + [(end, end)], False)


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int | None) -> list[list[int]]:
    """Prompt token ids exactly as `encode_prompt_response` splits them (left-truncated)."""
    return [encode_prompt_response(tokenizer, p, "", max_prompt_len=max_prompt_len).prompt_ids for p in prompts]
