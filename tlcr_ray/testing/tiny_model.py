"""A tiny random-init Llama with the SmolLM2 tokenizer, for tests and benchmarks of the mechanics."""
from __future__ import annotations

from pathlib import Path

import torch

from tlcr_ray.io import atomic_folder
from tlcr_ray.models.loading import load_tokenizer


def build_tiny_llama(path: str | Path, tokenizer_dir: str | Path, seed: int = 0, hidden: int = 64,
                     layers: int = 2, atomic: bool = True) -> Path:
    """A random-init Llama with the SmolLM2 tokenizer (tied embeddings, like SmolLM2), saved at `path`
    (`atomic=False`: straight into `path`, for a caller that already writes into a temp folder)."""
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
    if not atomic:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def build_scripted_llama(path: str | Path, tokenizer_dir: str | Path, script: dict[int, int], hidden: int = 64,
                         margin: float = 30.0) -> Path:
    """A Llama whose next token depends only on the current one: after token a it puts logit `margin`
    on `script[a]` and 0 on every other token, so greedy (and, in effect, sampled) generation follows
    the script. Attention and MLP outputs are zeroed (the residual stream is the token's embedding),
    each scripted token's embedding is its own basis vector, and the untied LM head maps them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = sorted(set(script) | set(script.values()))
    if len(tokens) > hidden:
        raise ValueError(f"{len(tokens)} scripted tokens need hidden >= {len(tokens)}, got {hidden}")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        basis = {token: k for k, token in enumerate(tokens)}
        for token, k in basis.items():
            model.model.embed_tokens.weight[token].zero_()
            model.model.embed_tokens.weight[token, k] = 1.0
        # RMSNorm turns the basis vector e_k into sqrt(hidden) e_k: the head row of b reads it as `margin`.
        for a, b in script.items():
            model.lm_head.weight[b, basis[a]] = margin / hidden ** 0.5
    path = Path(path)
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path
