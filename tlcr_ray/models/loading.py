"""Loading a tokenizer and a causal-LM policy by folder, hub id or `embedded:` name.

    tokenizer = load_tokenizer("runs/demo/sft/model")      # pad token set, right padding
    policy = load_policy("runs/demo/sft/model", dtype="bfloat16")
"""
from __future__ import annotations

from pathlib import Path

import torch

from tlcr_ray.models.embedded import EMBEDDED_PREFIX, embedded_tokenizer_dir, resolve_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(path: str | Path):
    """Tokenizer with a pad token (eos when the model has none) and right padding."""
    from transformers import AutoTokenizer

    path = str(path)
    if path.startswith(EMBEDDED_PREFIX):
        path = str(embedded_tokenizer_dir())
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_policy(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=torch_dtype(dtype))
