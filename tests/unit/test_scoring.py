"""tlcr_ray.rl.text_scoring: the library scoring path the HTTP API must reproduce."""
from __future__ import annotations

import pytest
import torch

from tlcr_ray.models import TokenDiscriminator, load_head_model, save_head_model
from tlcr_ray.rl.text_scoring import encode_items, item_score, response_probabilities, score_items

PAIRS = [
    ("\n\nHuman: How do I bake bread?\n\nAssistant:", " Mix flour, water, salt and yeast, then knead and bake."),
    ("\n\nHuman: hi\n\nAssistant:", " Hello!"),
    ("", "No prompt at all, just a response."),
    ("\n\nHuman: Say something with émojis 🎉\n\nAssistant:", " Sure 🎉 — ünïcödé ok?"),
    ("\n\nHuman: Count\n\nAssistant:", " 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"),
]


@pytest.fixture(scope="module")
def disc(tiny_model_dir, tokenizer, tmp_path_factory):
    """A saved-and-reloaded tiny discriminator whose head is scaled up so p spreads over (0, 1)."""
    model = TokenDiscriminator.from_pretrained(tiny_model_dir, seed=0)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.weight, std=2.0)
    path = save_head_model(model, tmp_path_factory.mktemp("disc") / "model", tokenizer=tokenizer)
    return load_head_model(path).eval()


def unbatched_probs(model, input_ids: list[int], response_start: int) -> list[float]:
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids))
    return torch.sigmoid(logits[0, response_start:]).tolist()


def test_rewards_equal_an_unpadded_forward_and_2p_minus_1(disc, tokenizer):
    scored = score_items(disc, tokenizer, PAIRS, mode="continuous", batch_size=3)
    for (prompt, response), item, enc in zip(PAIRS, scored, encode_items(tokenizer, PAIRS)):
        expected_p = unbatched_probs(disc, enc.input_ids, enc.response_start)
        assert len(item.tokens) == len(expected_p) == len(enc.input_ids) - enc.response_start > 0
        for tok, p in zip(item.tokens, expected_p):
            assert tok.p == pytest.approx(p, abs=1e-5)
            assert tok.reward == pytest.approx(2 * p - 1, abs=1e-5)
        assert item.sum == pytest.approx(sum(t.reward for t in item.tokens), abs=1e-5)
        assert item.mean == pytest.approx(item.sum / len(item.tokens), abs=1e-6)
    spread = [t.p for item in scored for t in item.tokens]
    assert max(spread) - min(spread) > 0.3, "the head should give distinct probabilities"


def test_batch_size_does_not_change_scores(disc, tokenizer):
    one = score_items(disc, tokenizer, PAIRS, batch_size=1)
    many = score_items(disc, tokenizer, PAIRS, batch_size=16)
    for a, b in zip(one, many):
        assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
        assert torch.allclose(torch.tensor([t.p for t in a.tokens]), torch.tensor([t.p for t in b.tokens]), atol=1e-5)


def test_tokens_carry_ids_and_character_spans_of_the_response(disc, tokenizer):
    for (prompt, response), item in zip(PAIRS, score_items(disc, tokenizer, PAIRS)):
        enc = encode_items(tokenizer, [(prompt, response)])[0]
        assert [t.id for t in item.tokens] == enc.input_ids[enc.response_start:]
        assert all(t.text == response[t.start:t.end] for t in item.tokens)
        # Byte-level BPE can split one character over several tokens; they share its span.
        assert item.tokens[0].start == 0 and item.tokens[-1].end == len(response)
        assert all(a.end <= b.end and a.start <= b.start for a, b in zip(item.tokens, item.tokens[1:]))
        if response.isascii():
            assert "".join(t.text for t in item.tokens) == response
        # A finished response ends with the EOS token: no characters, at the end of the response.
        eos = item.tokens[-1]
        assert (eos.id, eos.text, eos.start, eos.end) == (tokenizer.eos_token_id, "", len(response), len(response))
        assert tokenizer.decode([t.id for t in item.tokens[:-1]]) == response
        unfinished = score_items(disc, tokenizer, [(prompt, response)], add_eos=False)[0]
        assert [t.id for t in unfinished.tokens] == [t.id for t in item.tokens[:-1]]


@pytest.mark.parametrize("mode", ["fixed", "no_negative", "no_positive"])
def test_modes_follow_the_design(disc, tokenizer, mode):
    continuous = score_items(disc, tokenizer, PAIRS, mode="continuous")
    other = score_items(disc, tokenizer, PAIRS, mode=mode)
    for a, b in zip(continuous, other):
        for ta, tb in zip(a.tokens, b.tokens):
            assert ta.p == tb.p
            if mode == "fixed":
                assert tb.reward == (1.0 if ta.p >= 0.6 else -1.0 if ta.p <= 0.4 else 0.0)
            elif mode == "no_negative":
                assert tb.reward == pytest.approx(max(ta.reward, 0.0), abs=1e-6)
            else:
                assert tb.reward == pytest.approx(min(ta.reward, 0.0), abs=1e-6)


def test_unknown_mode_and_empty_response(disc, tokenizer):
    enc = encode_items(tokenizer, [("\n\nHuman: hi\n\nAssistant:", "")], add_eos=False)[0]
    probs = response_probabilities(disc, [enc], tokenizer.pad_token_id)
    assert probs == [[]]
    empty = item_score("", enc, probs[0])
    assert (empty.tokens, empty.sum, empty.mean) == ([], 0.0, 0.0)
    dropped = encode_items(tokenizer, [("", "\x1d")], add_eos=False)[0]  # a control character the tokenizer drops
    assert dropped.input_ids == [] and score_items(disc, tokenizer, [("", "\x1d")], add_eos=False)[0].tokens == []
    # Finished, an empty response is the stop action alone, as a PPO response that stops at once.
    (stop_only,) = score_items(disc, tokenizer, [("\n\nHuman: hi\n\nAssistant:", "")])
    assert [(t.id, t.text, t.start, t.end) for t in stop_only.tokens] == [(tokenizer.eos_token_id, "", 0, 0)]
    with pytest.raises(ValueError, match="unknown reward mode 'sequence'"):
        item_score("", enc, probs[0], mode="sequence")


@pytest.mark.parametrize("mode", ["continuous", "fixed"])
def test_ppo_rewards_equal_the_api_rewards_for_the_same_response(disc, tokenizer, mode):
    """The reward actor's path (pack -> discriminator_probs -> token_rewards) on a PPO response that
    stopped (EOS last) and the text API's path on its decoded text give the same ids and rewards;
    likewise a response cut at max_response_len (no EOS) against add_eos=False."""
    from tlcr_ray.data.tokens import encode_prompt_response, encode_prompts
    from tlcr_ray.rl.batch import pack
    from tlcr_ray.rl.rewards import discriminator_probs, token_rewards

    eos = tokenizer.eos_token_id
    for prompt, text in [pair for pair in PAIRS if pair[0]]:  # PPO prompts are never empty
        prompt_ids = encode_prompts(tokenizer, [prompt], max_prompt_len=256)[0]
        body = encode_prompt_response(tokenizer, prompt, text).response_ids
        for response_ids, add_eos in ((body + [eos], True), (body, False)):
            packed = pack([prompt_ids], [response_ids], tokenizer.pad_token_id)
            p = discriminator_probs(disc, packed.input_ids, packed.attention_mask, packed.prompt_len,
                                    packed.response_mask)
            ppo = (token_rewards(p, mode) * packed.response_mask)[0]
            decoded = tokenizer.decode(response_ids, skip_special_tokens=True)
            (api,) = score_items(disc, tokenizer, [(prompt, decoded)], mode=mode, add_eos=add_eos)
            assert [t.id for t in api.tokens] == response_ids
            assert torch.allclose(torch.tensor([t.reward for t in api.tokens]), ppo, atol=1e-6)
