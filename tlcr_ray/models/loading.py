"""Loading a tokenizer and a causal-LM policy by folder, hub id or `embedded:` name.

    tokenizer = load_tokenizer("runs/demo/sft/model")      # pad token set, right padding
    policy = load_policy("runs/demo/sft/model", dtype="bfloat16")
"""
from __future__ import annotations

from pathlib import Path

import torch

from tlcr_ray.choices import DTYPE_ALIASES
from tlcr_ray.choices import DTYPES as DTYPE_NAMES
from tlcr_ray.models.embedded import EMBEDDED_PREFIX, embedded_tokenizer_dir, resolve_model

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
"""`model.dtype` names -> torch dtypes (a config has its aliases normalised to these names at load)."""


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask -> [B, T] position ids counted over real tokens only (cumsum(mask) - 1, 0 on
    leading padding), so a left-padded row gets the positions it would have unpadded. Models with
    absolute position embeddings (GPT-2, OPT, ...) need this; rotary ones see only relative positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def vocabulary_mismatch(policy_dir: str | Path, other_dir: str | Path) -> str | None:
    """Why the model folder `other_dir` does not share the policy's vocabulary (None: it does).

    Compares `vocab_size` in the two config.json files and, when both folders carry a tokenizer, the
    two tokenizers' token -> id maps. Reads files only (no weights), so it is cheap to run before start-up.
    """
    import json

    sizes = []
    for folder in (policy_dir, other_dir):
        config = Path(folder) / "config.json"
        sizes.append(json.loads(config.read_text()).get("vocab_size") if config.exists() else None)
    if None not in sizes and sizes[0] != sizes[1]:
        return f"vocab_size {sizes[1]} in {other_dir}/config.json, the policy's is {sizes[0]}"
    has_tokenizer = [any((Path(f) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
                     for f in (policy_dir, other_dir)]
    if all(has_tokenizer):
        vocabs = [load_tokenizer(f).get_vocab() for f in (policy_dir, other_dir)]
        if vocabs[0] != vocabs[1]:
            differ = sum(vocabs[0].get(token) != i for token, i in vocabs[1].items())
            return (f"the tokenizer in {other_dir} maps {differ} of its {len(vocabs[1])} tokens differently "
                    f"from the policy's ({len(vocabs[0])} tokens)")
    return None


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


def enable_gradient_checkpointing(model):
    """HF gradient checkpointing (non-reentrant) on a causal LM, or on a head model's backbone: each
    decoder layer keeps only its input and recomputes the rest in backward. Active in train() mode."""
    target = getattr(model, "backbone", model)
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


DROPOUT_FIELDS = ("dropout", "attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "summary_first_dropout")
"""HF config fields that switch dropout on in train() mode (a functional dropout leaves no module)."""


def has_active_dropout(model) -> bool:
    """Whether train() mode makes `model`'s forward random: an nn.Dropout with p > 0, or a dropout rate in
    the HF config of the model (or of its backbone / policy inside)."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    configs = [getattr(m, "config", None) for m in model.modules()]
    return any(isinstance(getattr(c, f, None), (int, float)) and getattr(c, f) > 0
               for c in configs if c is not None for f in DROPOUT_FIELDS)


def load_policy(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(path), dtype=torch_dtype(dtype))
