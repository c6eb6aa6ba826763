"""Left padding must not move positions: with a model that has ABSOLUTE position embeddings (GPT-2),
the packed (left-padded) batch gives the same log-probs, discriminator p and HF generations as each
row alone, because every forward passes position ids counted from the attention mask."""
from __future__ import annotations

import pytest
import torch

from tlcr_ray.models import TokenDiscriminator, load_policy, position_ids
from tlcr_ray.rl.batch import pack, policy_logprobs, response_logits_of, token_logprobs
from tlcr_ray.rl.rewards import discriminator_probs

PROMPTS = [[11, 12, 13, 14, 15, 16, 17, 18, 19], [21, 22, 23]]  # the second row gets 6 columns of left padding
RESPONSES = [[31, 32, 33], [41, 42, 43, 44, 45]]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=256,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():  # make the position embeddings matter as much as the token embeddings
        model.transformer.wpe.weight.normal_(std=0.5)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def one_by_one(fn):
    """fn(packed) -> [rows, R]: each row packed alone (no padding), cut to its own response length."""
    return [fn(pack([p], [r], pad_id=0))[0, :len(r)] for p, r in zip(PROMPTS, RESPONSES)]


def assert_rows_match(batched: torch.Tensor, alone: list[torch.Tensor]):
    for row, (single, resp) in enumerate(zip(alone, RESPONSES)):
        assert torch.allclose(batched[row, :len(resp)], single, atol=1e-5), (row, batched[row], single)


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def test_left_padded_logprobs_match_unpadded(gpt2_dir):
    model = load_policy(gpt2_dir).eval()
    packed = pack(PROMPTS, RESPONSES, pad_id=0)
    assert packed.attention_mask[1, :6].sum() == 0  # row 1 really is left-padded
    assert_rows_match(policy_logprobs(model, packed), one_by_one(lambda p: policy_logprobs(model, p)))

    def via_positions(p):
        with torch.no_grad():
            return token_logprobs(response_logits_of(model, p, torch.device("cpu")), p.response_ids)

    assert_rows_match(via_positions(packed), one_by_one(via_positions))


def test_left_padded_discriminator_p_matches_unpadded(gpt2_dir):
    disc = TokenDiscriminator.from_pretrained(gpt2_dir, seed=0).eval()

    def probs(p):
        return discriminator_probs(disc, p.input_ids, p.attention_mask, p.prompt_len, p.response_mask)

    assert_rows_match(probs(pack(PROMPTS, RESPONSES, pad_id=0)), one_by_one(probs))


def test_hf_generate_left_padded_matches_unpadded(gpt2_dir):
    """HF generate derives the positions from the attention mask itself (transformers >= 4.x)."""
    from tlcr_ray.rl.rollout.hf import HFRollout

    engine = HFRollout(gpt2_dir)
    kwargs = {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    batch = engine.generate(PROMPTS, **kwargs)
    for row, prompt in enumerate(PROMPTS):
        alone = engine.generate([prompt], **kwargs)
        assert batch.response_ids[row] == alone.response_ids[0]
        assert torch.allclose(torch.tensor(batch.logprobs[row]), torch.tensor(alone.logprobs[0]), atol=1e-4)
    # ... and the engine's own scoring (response_logits_of) agrees with its sampling log-probs.
    scored = engine.score(PROMPTS, batch.response_ids)
    for row in range(len(PROMPTS)):
        assert torch.allclose(torch.tensor(scored[row]), torch.tensor(batch.logprobs[row]), atol=1e-4)
