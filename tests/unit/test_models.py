"""Head models: shapes, where the sequence score is read, and save -> load round trips."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tlcr_ray.io import atomic_folder
from tlcr_ray.models import (
    HEAD_KINDS,
    SequenceRewardModel,
    TokenDiscriminator,
    ValueModel,
    load_head_model,
    load_policy,
    load_tokenizer,
    resolve_model,
    save_head_model,
)


def _batch(tokenizer):
    enc = tokenizer(["Hello there, how are you?", "Fine"], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_tokenizer_pads_right(tokenizer):
    assert tokenizer.pad_token_id is not None
    ids, mask = _batch(tokenizer)
    assert mask[1, 0] == 1 and mask[1, -1] == 0


def test_tiny_llama_loads_with_tied_embeddings(tiny_model_dir, tokenizer):
    policy = load_policy(tiny_model_dir)
    assert policy.config.hidden_size == 64 and policy.config.num_hidden_layers == 2
    assert policy.config.vocab_size == len(tokenizer)
    assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    assert load_tokenizer(tiny_model_dir).pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("cls", [TokenDiscriminator, SequenceRewardModel, ValueModel])
def test_head_round_trip_is_identical(cls, tiny_model_dir, tokenizer, tmp_path):
    model = cls.from_pretrained(tiny_model_dir, seed=1).eval()
    with torch.no_grad():
        model.head.bias.fill_(0.25)  # a non-default head value must survive the trip
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        before = model(ids, mask)
    save_head_model(model, tmp_path / "m", tokenizer)
    assert json.loads((tmp_path / "m" / "head.json").read_text())["kind"] == cls.kind
    loaded = load_head_model(tmp_path / "m").eval()
    assert type(loaded) is cls
    with torch.no_grad():
        after = loaded(ids, mask)
    assert torch.equal(before, after)
    assert load_tokenizer(str(tmp_path / "m")).pad_token_id == tokenizer.pad_token_id


def test_output_shapes(tiny_model_dir, tokenizer):
    ids, mask = _batch(tokenizer)
    assert TokenDiscriminator.from_pretrained(tiny_model_dir)(ids, mask).shape == ids.shape
    assert ValueModel.from_pretrained(tiny_model_dir)(ids, mask).shape == ids.shape
    assert SequenceRewardModel.from_pretrained(tiny_model_dir)(ids, mask).shape == (2,)


def test_sequence_score_is_read_at_last_real_token(tiny_model_dir, tokenizer):
    rm = SequenceRewardModel.from_pretrained(tiny_model_dir).eval()
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        batched = rm(ids, mask)
        short_len = int(mask[1].sum())
        alone = rm(ids[1:, :short_len], mask[1:, :short_len])
        per_position = rm.position_outputs(ids, mask)
    assert torch.allclose(batched[1], alone[0], atol=1e-5)
    assert batched[0] == per_position[0, -1]


def test_resolve_model_errors_and_passthrough(tiny_model_dir, monkeypatch):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    assert resolve_model(Path(tiny_model_dir).name) == tiny_model_dir  # relative folders come back absolute
    assert resolve_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model("./no/such/folder")
    with pytest.raises(ValueError, match="unknown embedded model"):
        resolve_model("embedded:gpt-5")


def test_load_head_model_names_bad_folder(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="head.json"):
        load_head_model(tiny_model_dir)
    (tmp_path / "head.json").write_text('{"kind": "mystery"}')
    with pytest.raises(ValueError, match="unknown head kind"):
        load_head_model(tmp_path)


def test_atomic_folder_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("second")
            raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_head_kinds_registry():
    assert set(HEAD_KINDS) == {"token_discriminator", "sequence_reward", "value"}
