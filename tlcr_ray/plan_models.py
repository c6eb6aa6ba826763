"""Model and GPU shapes for `tlcr plan`: a model folder's config.json or a small offline table; GPU sizes.

    shape = model_shape("meta-llama/Llama-2-7b-hf")     # the table (no hub access)
    shape = model_shape("runs/demo/sft/model")          # its config.json
    shape.params, shape.backbone_params, shape.largest_module

Lookup order: a local folder's config.json; the HF hub cache's snapshot of a hub id
($HF_HOME/hub/models--org--name/snapshots/*/config.json, if it was downloaded before); the table
below, matched by name (case-insensitive, any organisation prefix, any -hf/-chat/-instruct suffix).
The table's numbers are those of each model's public config.json.

Parameter count of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2), d = head_dim:
    embed  V·h                                  (+ lm_head V·h unless tie_word_embeddings)
    layer  h·a·d (q) + 2·h·k·d (k, v) + a·d·h (o) + 3·h·I (gate, up, down) + 2·h (norms)
           (+ a·d + 2·k·d q/k/v biases for Qwen2)
    final  h (norm)
Llama-2-7B: 131.1M + 32 × 202.4M + 4096 + 131.1M = 6.738B.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tlcr_ray.choices import GPUS
from tlcr_ray.config import EMBEDDED_MODEL, ConfigError


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int = 0
    """0: hidden // heads."""
    qkv_bias: bool = False
    source: str = "table"

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        h, d = self.hidden, self.d
        attn = h * self.heads * d + 2 * h * self.kv_heads * d + self.heads * d * h
        bias = (self.heads * d + 2 * self.kv_heads * d) if self.qkv_bias else 0
        return attn + bias + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        """The causal LM (policy, reference, SFT)."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    @property
    def backbone_params(self) -> int:
        """A head model (discriminator, RM, critic): the backbone without lm_head + Linear(h, 1)."""
        return self.vocab * self.hidden + self.layers * self.layer_params + self.hidden + self.hidden + 1

    @property
    def largest_module(self) -> int:
        """Parameters of the largest single module (what ZeRO-3 gathers at once; DeepSpeed's estimator)."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate, self.hidden * self.heads * self.d)

    def kv_bytes_per_token(self, elem: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.d * elem


# name pattern (matched against the lower-cased last path component) -> shape
TABLE: list[tuple[str, ModelShape]] = [
    (r"smollm2-135m", ModelShape("SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True, 64)),
    (r"llama-2-7b", ModelShape("Llama-2-7B", 4096, 32, 32, 32, 11008, 32000, False)),
    (r"llama-2-13b", ModelShape("Llama-2-13B", 5120, 40, 40, 40, 13824, 32000, False)),
    (r"llama-3(\.1)?-8b", ModelShape("Llama-3-8B", 4096, 32, 32, 8, 14336, 128256, False)),
    (r"mistral-7b", ModelShape("Mistral-7B", 4096, 32, 32, 8, 14336, 32000, False)),
    (r"qwen2\.5-7b", ModelShape("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True)),
]


def shape_from_config(config: dict, name: str, source: str) -> ModelShape:
    try:
        heads = config["num_attention_heads"]
        return ModelShape(name=name, hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=heads,
                          kv_heads=config.get("num_key_value_heads") or heads,
                          intermediate=config["intermediate_size"], vocab=config["vocab_size"],
                          tied=bool(config.get("tie_word_embeddings", False)), head_dim=config.get("head_dim") or 0,
                          qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")),
                          source=source)
    except KeyError as exc:
        raise ConfigError(f"{source}: no {exc.args[0]} (tlcr plan knows Llama-family configs only)") from None


def _hub_cache_config(hub_id: str) -> Path | None:
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    found = sorted((home / "hub" / f"models--{hub_id.replace('/', '--')}" / "snapshots").glob("*/config.json"))
    return found[-1] if found else None


def model_shape(base: str) -> ModelShape:
    """The shape of `model.base` (a folder, a hub id or the embedded model); ConfigError if unknown."""
    if base == EMBEDDED_MODEL:
        return TABLE[0][1]
    folder = Path(base).expanduser()
    config = folder / "config.json" if folder.is_dir() else _hub_cache_config(base)
    if config is not None and config.exists():
        return shape_from_config(json.loads(config.read_text()), folder.name or base, str(config))
    key = base.rstrip("/").split("/")[-1].lower()
    for pattern, shape in TABLE:
        if re.search(pattern, key):
            return shape
    known = ", ".join(s.name for _, s in TABLE)
    raise ConfigError(f"model.base {base!r}: no config.json there (nor in the HF cache) and not in the shape table "
                      f"of tlcr_ray/plan_models.py ({known}); point model.base at a folder with config.json")


GPU_MEMORY_GIB = dict(zip(GPUS, (39.4, 79.1, 79.1, 139.8)))
"""What torch.cuda reports as total_memory for each `--gpu` / config `gpu` (nvidia-smi's size less
the driver's reserve, e.g. 81920 MiB -> ~79.1 GiB on an A100-80GB), rounded down."""


def gpu_bytes(name: str) -> int:
    if name not in GPU_MEMORY_GIB:
        raise ConfigError(f"gpu {name!r}: expected one of {', '.join(GPU_MEMORY_GIB)}")
    return int(GPU_MEMORY_GIB[name] * 2**30)


def host_memory() -> int | None:
    """This machine's RAM (what CPU groups are planned against); None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().total)


def local_cuda_memory() -> int | None:
    """total_memory of cuda:0 when torch is importable and sees a GPU (else None)."""
    try:
        import torch
    except ImportError:
        return None
    return int(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
