"""A tiny random-init Llama with the SmolLM2 tokenizer, for tests and benchmarks of the mechanics."""
from __future__ import annotations

from pathlib import Path

import torch

from tlcr_ray.io import atomic_folder
from tlcr_ray.models.loading import load_tokenizer


def build_tiny_llama(path: str | Path, tokenizer_dir: str | Path, seed: int = 0, hidden: int = 64,
                     layers: int = 2) -> Path:
    """A random-init Llama with the SmolLM2 tokenizer (tied embeddings, like SmolLM2), saved at `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = Path(path)
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path
