"""The three head models: token discriminator, sequence reward model and PPO critic.

    disc = TokenDiscriminator.from_pretrained(str(embedded_model_dir()))
    p = torch.sigmoid(disc(input_ids, attention_mask))      # [B, T]: P(token t is good)
    save_head_model(disc, "runs/demo/disc/model", tokenizer)

A head model folder is an HF backbone folder (`AutoModel`) plus `head.safetensors` (the Linear head)
and `head.json` (which head it is). Folders are written to a temp name and renamed, so a crash never
leaves a half-written model behind.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tlcr_ray.io import atomic_folder
from tlcr_ray.models.loading import position_ids, resolve_model, torch_dtype

HEAD_FORMAT_VERSION = 1


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
        """input_ids, attention_mask [B, T] -> head output at every position [B, T] (float32).

        Position ids come from the mask (`position_ids`), so a left-padded row is read as if unpadded
        also by models with absolute position embeddings. No KV cache: nothing is generated."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
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


def load_head_model(path: str | Path, dtype: str = "float32", as_kind: str | None = None) -> _HeadModel:
    """Load a folder written by `save_head_model`; the class comes from head.json, or is `as_kind`
    (e.g. "value": a discriminator's or RM's backbone and head weights as a PPO critic)."""
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
    return HEAD_KINDS[as_kind or meta["kind"]](backbone, head)


def load_value_model(path: str | Path, dtype: str = "float32", seed: int | None = None) -> ValueModel:
    """The PPO critic from a folder: a head-model folder (discriminator / sequence RM) gives its backbone
    AND head weights (ppo.critic_init=reward); any other HF folder (the policy) its backbone with a
    fresh head (ppo.critic_init=policy)."""
    if (Path(path) / "head.json").exists():
        return load_head_model(path, dtype, as_kind=ValueModel.kind)
    return ValueModel.from_pretrained(str(path), dtype=dtype, seed=seed)
