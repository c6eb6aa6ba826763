"""Buckets and the streamed HF writer without DeepSpeed (ZeRO-0..2 and single-process paths)."""
from __future__ import annotations

import json

import torch

from tlcr_ray.training.gather import param_bytes, plan_buckets, state_buckets, tied_names, write_hf_folder


def _tiny(tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, tie_word_embeddings=tie))


def test_buckets_are_bounded_and_cover_every_name_once():
    model = _tiny()
    bucket = 20_000
    largest = max(param_bytes(p) for p in model.parameters())
    buckets = plan_buckets(model, bucket)
    names = [n for b in buckets for n, _ in b]
    assert names == list(model.state_dict())
    for b in buckets:
        distinct = {id(t): t for _, t in b}.values()
        assert sum(param_bytes(t) for t in distinct) <= max(bucket, largest)
    assert len(buckets) > 3


def test_tied_lm_head_is_named_in_the_stream_and_skipped_in_folders():
    model = _tiny()
    assert tied_names(model) == {"lm_head.weight"}
    streamed = {}
    for b in state_buckets(model, zero3=False, rank=0, bucket_bytes=20_000):
        streamed.update(b)
    assert torch.equal(streamed["lm_head.weight"], streamed["model.embed_tokens.weight"])
    assert [b for b in state_buckets(model, zero3=False, rank=1, bucket_bytes=20_000)] == [None] * len(
        plan_buckets(model, 20_000))


def test_streamed_folder_reloads_identically_in_the_requested_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    for tie in (True, False):
        model = _tiny(tie)
        path = tmp_path / f"m{tie}"
        write_hf_folder(state_buckets(model, zero3=False, rank=0, bucket_bytes=20_000, skip=tied_names(model)),
                        path, module=model, rank=0, extra={"step": 3})
        back = AutoModelForCausalLM.from_pretrained(path)
        for k, v in model.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k
        assert json.loads((path / "tlcr_export.json").read_text())["step"] == 3
    half = tmp_path / "bf16"
    write_hf_folder(state_buckets(model, zero3=False, rank=0, bucket_bytes=20_000, dtype=torch.bfloat16),
                    half, module=model, rank=0, dtype=torch.bfloat16)
    back = AutoModelForCausalLM.from_pretrained(half, dtype=torch.bfloat16)
    assert back.config.dtype == torch.bfloat16
    assert torch.equal(back.state_dict()["model.norm.weight"], model.state_dict()["model.norm.weight"].bfloat16())
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    assert size(half) < 0.55 * size(tmp_path / "mFalse")


def test_head_model_folder_round_trips(tmp_path):
    from tlcr_ray.models import TokenDiscriminator, load_head_model

    src = tmp_path / "base"
    _tiny().save_pretrained(src)
    disc = TokenDiscriminator.from_pretrained(str(src), seed=1)
    write_hf_folder(state_buckets(disc, zero3=False, rank=0, bucket_bytes=20_000, skip=tied_names(disc)),
                    tmp_path / "disc", module=disc, rank=0)
    back = load_head_model(tmp_path / "disc")
    assert type(back) is TokenDiscriminator
    for k, v in disc.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_oom_found_inside_wrappers_and_the_cli_exits_with_the_message(monkeypatch, capsys):
    from tlcr_ray import cli
    from tlcr_ray.oom import EXIT_CODE, OutOfMemory, find_oom

    try:
        torch.empty(1 << 50, dtype=torch.uint8)
    except RuntimeError as exc:
        real = exc
    wrapper = RuntimeError("task failed")
    wrapper.cause = real
    assert find_oom(wrapper) is real
    assert find_oom(ValueError("shape mismatch")) is None
    monkeypatch.setattr(cli, "dispatch", lambda args: (_ for _ in ()).throw(OutOfMemory("sft ran out of memory: x", "sft")))
    assert cli.main(["sft"]) == EXIT_CODE != 0
    assert capsys.readouterr().err.strip() == "tlcr: sft ran out of memory: x"
