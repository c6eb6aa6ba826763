"""Stop strings (ppo.stop): `cut_at_stop` on the SmolLM2 tokenizer, and HFRollout ending a response
that runs into "\\n\\nHuman:" (a scripted tiny model writes one) with EOS and finish reason "stop".
The same check on vLLM: tests/integration/test_vllm_rollout.py."""
from __future__ import annotations

import math

import pytest

from tlcr_ray.rl.rollout.stops import cut_at_stop

STOP = ["\n\nHuman:"]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text, kept", [
    (" Sure.\n\nHuman: and now?", " Sure."),
    ("Hi.\n\n\nHuman: x", "Hi."),           # "\n\n" + "\n": the marker starts inside the "\n\n" token
    ("\n\nHuman: hi", ""),                  # nothing before it: the response is the stop action alone
    (" é\n\nHuman: é", " é"),                # multi-byte characters before the marker stay whole
    (" A.\n\nHuman: b\n\nHuman: c", " A."),  # the first marker counts
])
def test_cut_before_the_marker_and_append_eos(tokenizer, text, kept):
    eos = tokenizer.eos_token_id
    for ids in (ids_of(tokenizer, text), ids_of(tokenizer, text) + [eos]):
        cut, stopped = cut_at_stop(ids, tokenizer, STOP, eos)
        assert stopped and cut == ids_of(tokenizer, kept) + [eos]


def test_no_marker_no_cut(tokenizer):
    eos = tokenizer.eos_token_id
    for text in (" Sure, here you go.", " almost\n\nHum", " Human: not a turn"):
        ids = ids_of(tokenizer, text)
        assert cut_at_stop(ids, tokenizer, STOP, eos) == (ids, False)
        assert cut_at_stop(ids + [eos], tokenizer, STOP, eos) == (ids + [eos], False)
    ids = ids_of(tokenizer, " a\n\nHuman: b")
    assert cut_at_stop(ids, tokenizer, [], eos) == (ids, False)
    # A marker after the EOS is not part of the response.
    after = ids_of(tokenizer, " done") + [eos] + ids_of(tokenizer, "\n\nHuman:")
    assert cut_at_stop(after, tokenizer, STOP, eos) == (after, False)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, tokenizer_dir, tokenizer):
    """A model that answers prompt A with " Sure.\\n\\nHuman: again again ...", prompt B with " x y x y ...",
    and prompt C with EOS at once."""
    from tlcr_ray.testing.tiny_model import build_scripted_llama

    run_on = ids_of(tokenizer, " Sure.\n\n") + ids_of(tokenizer, "Human: again")
    assert tokenizer.decode(run_on) == " Sure.\n\nHuman: again" and len(set(run_on)) == len(run_on)
    x, y = ids_of(tokenizer, " x") + ids_of(tokenizer, " y")
    a, b, c = ids_of(tokenizer, " A") + ids_of(tokenizer, " B") + ids_of(tokenizer, " C")
    script = {a: run_on[0], **dict(zip(run_on, run_on[1:])), run_on[-1]: run_on[-1], b: x, x: y, y: x,
              c: tokenizer.eos_token_id}
    path = build_scripted_llama(tmp_path_factory.mktemp("scripted"), tokenizer_dir, script)
    prompts = [ids_of(tokenizer, "\n\nHuman: hi\n\nAssistant:") + [p] for p in (a, b, c)]
    return str(path), prompts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_rollout_ends_a_response_at_the_stop_string(scripted, tokenizer, temperature):
    from tlcr_ray.rl.rollout.hf import HFRollout

    model_dir, prompts = scripted
    eos = tokenizer.eos_token_id
    engine = HFRollout(model_dir)
    plain = engine.generate(prompts, max_new_tokens=12, temperature=temperature, top_p=1.0, seed=0)
    assert tokenizer.decode(plain.response_ids[0]).startswith(" Sure.\n\nHuman: again again")
    assert plain.finish_reasons == ["length", "length", "stop"]

    batch = engine.generate(prompts, max_new_tokens=12, temperature=temperature, top_p=1.0, seed=0, stop=STOP)
    assert batch.response_ids[0] == ids_of(tokenizer, " Sure.") + [eos]
    assert batch.response_ids[1] == plain.response_ids[1] and batch.response_ids[2] == [eos]
    assert batch.finish_reasons == ["stop", "length", "stop"]
    # Every log-prob, the appended EOS's included, is the engine's own for that token.
    for logps, ids, prompt in zip(batch.logprobs, batch.response_ids, prompts):
        assert len(logps) == len(ids) and all(math.isfinite(v) for v in logps)
        assert logps == pytest.approx(engine.score([prompt], [ids])[0], abs=1e-4)
    assert batch.logprobs[0][-1] < -20  # the scripted model did not want to stop there
