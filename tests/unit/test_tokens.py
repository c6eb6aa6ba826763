"""Joint tokenization with the real SmolLM2 tokenizer: boundary merges, offsets, truncation."""
from __future__ import annotations

import pytest

from tlcr_ray.data.tokens import encode_prompt_response


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_offsets(enc, response: str) -> None:
    """Response token spans lie in the response, in order, and cover it without gaps."""
    offsets = enc.response_offsets
    assert len(offsets) == len(enc.response_ids) and offsets[0][0] == 0 and offsets[-1][1] == len(response)
    assert all(0 <= s <= e <= len(response) for s, e in offsets)
    assert all(nxt[0] <= cur[1] and nxt[0] >= cur[0] for cur, nxt in zip(offsets, offsets[1:]))


@pytest.mark.parametrize("prompt, response", [
    ("\n\nHuman: can you help?\n\nAssistant:", " I'm sorry, I can't help with that."),
    ("\n\nHuman: hi\n\nAssistant:", "  Two leading spaces, as in HH."),
    ("", "no prompt at all"),
])
def test_no_merge_equals_prompt_ids_then_response(tokenizer, prompt, response):
    enc = encode_prompt_response(tokenizer, prompt, response)
    assert enc.input_ids == ids(tokenizer, prompt + response)
    assert enc.prompt_ids == ids(tokenizer, prompt)        # the prompt's own ids are a prefix
    check_offsets(enc, response)
    assert tokenizer.decode(enc.response_ids) == response


@pytest.mark.parametrize("prompt, response, merged", [
    ("Hello wor", "ld and more", " world"),               # a word split across the boundary
    ("\n\nHuman: smile\n\nAssistant:", "::)", "::"),       # punctuation merging with the prompt's ':'
])
def test_boundary_merge_splits_at_char_offset(tokenizer, prompt, response, merged):
    enc = encode_prompt_response(tokenizer, prompt, response)
    joint = ids(tokenizer, prompt + response)
    assert enc.input_ids == joint                          # the model sees the joint ids, not a concat
    assert joint[: len(ids(tokenizer, prompt))] != ids(tokenizer, prompt)
    assert tokenizer.decode([enc.response_ids[0]]) == merged  # the merged token belongs to the response
    assert tokenizer.decode(enc.prompt_ids) + tokenizer.decode(enc.response_ids) == prompt + response
    assert enc.response_offsets[0][0] == 0
    check_offsets(enc, response)


def test_truncation_left_prompt_right_response(tokenizer):
    prompt = "\n\nHuman: " + " ".join(f"word{i}" for i in range(40)) + "\n\nAssistant:"
    response = " " + " ".join(f"reply{i}" for i in range(40))
    full = encode_prompt_response(tokenizer, prompt, response)
    cut = encode_prompt_response(tokenizer, prompt, response, max_prompt_len=10, max_response_len=7)
    assert cut.prompt_ids == full.prompt_ids[-10:] and cut.response_start == 10
    assert cut.response_ids == full.response_ids[:7]
    assert cut.response_offsets == full.response_offsets[:7]
    assert tokenizer.decode(cut.prompt_ids).endswith("\n\nAssistant:")
    short = encode_prompt_response(tokenizer, "a b", " c", max_prompt_len=100, max_response_len=100)
    assert short.input_ids == ids(tokenizer, "a b c")


def test_empty_response_and_unicode(tokenizer):
    enc = encode_prompt_response(tokenizer, "\n\nAssistant:", "")
    assert enc.response_start == len(enc.input_ids) and enc.response_ids == [] and enc.response_offsets == []
    response = " café 日本語 ok"
    enc = encode_prompt_response(tokenizer, "Q:", response)
    assert tokenizer.decode(enc.response_ids) == response
    check_offsets(enc, response)
