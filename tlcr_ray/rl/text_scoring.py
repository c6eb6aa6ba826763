"""Scoring text: (prompt, response) strings -> per-token p and rewards, with each token's characters.

`rewards` is the math on p; this module is the path from text to it, shared by the HTTP API (`serve/`)
and offline scoring.

    model = load_head_model("runs/demo/disc/model"); tokenizer = load_tokenizer("runs/demo/disc/model")
    scored = score_items(model, tokenizer, [("\\n\\nHuman: hi\\n\\nAssistant:", " Hello!")], mode="continuous")
    scored[0].tokens[0].reward, scored[0].sum, scored[0].mean

This is the one scoring path: the HTTP API calls these same functions, so its rewards equal the
library's. Tokenization goes through `data.tokens.encode_prompt_response` (joint tokenization, as in
training) and rewards through `rl.rewards.token_rewards`. A response is scored as finished: it ends
with the tokenizer's EOS, so for the same ids the rewards equal PPO's (`add_eos=False`: unfinished).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tlcr_ray.config import ConfigError
from tlcr_ray.data.tokens import Encoded, append_eos, encode_prompt_response
from tlcr_ray.io import read_json
from tlcr_ray.layout import RunLayout
from tlcr_ray.models import resolve_model
from tlcr_ray.rl.rewards import TOKEN_MODES, token_rewards
from tlcr_ray.training.batching import ids_and_mask


@dataclass
class TokenScore:
    id: int
    text: str
    """The token's characters in the response: response[start:end]."""
    start: int
    end: int
    p: float
    """Discriminator probability that the token is good."""
    reward: float


@dataclass
class ItemScore:
    tokens: list[TokenScore]
    sum: float
    mean: float
    """Mean token reward; 0.0 for a response without tokens."""


def encode_items(tokenizer, pairs: list[tuple[str, str]], max_prompt_len: int | None = None,
                 max_response_len: int | None = None, add_eos: bool = True) -> list[Encoded]:
    """Tokenize each (prompt, response) jointly, exactly as training does.

    `add_eos`: the response is a finished one, so it ends with the tokenizer's EOS (span (len, len),
    text ""), exactly as a PPO response that stopped ends with the EOS it sampled; the ids, and so the
    rewards, are then those of that PPO response. False scores an unfinished response (a PPO row cut
    at `max_response_len`). A response truncated here, or whose text already ends with the EOS
    token's text, gets no second EOS.
    """
    encoded = [encode_prompt_response(tokenizer, prompt, response, max_prompt_len, max_response_len)
               for prompt, response in pairs]
    if add_eos:
        encoded = [append_eos(enc, tokenizer.eos_token_id, len(response))
                   for enc, (_, response) in zip(encoded, pairs)]
    return encoded


@torch.no_grad()
def response_probabilities(model: torch.nn.Module, encoded: list[Encoded], pad_token_id: int,
                           micro_batch_size: int | None = None) -> list[list[float]]:
    """Forwards over the right-padded batch, `micro_batch_size` rows each (None: one); p_t of each
    response token, read at its own position.

    Builds input_ids/attention_mask [B, T] (T = longest sequence); returns B lists of length R_i.
    """
    from tlcr_ray.models.forward import micro_batched

    if not any(e.input_ids for e in encoded):  # nothing to run (the tokenizer drops e.g. some control chars)
        return [[] for _ in encoded]
    device = next(model.parameters()).device
    input_ids, attention_mask = ids_and_mask([e.input_ids for e in encoded], pad_token_id)
    probs = micro_batched(lambda rows: torch.sigmoid(model(input_ids[rows].to(device), attention_mask[rows].to(device))
                                                     .float()).cpu(), len(encoded), micro_batch_size)  # [B, T]
    return [probs[row, enc.response_start: len(enc.input_ids)].tolist() for row, enc in enumerate(encoded)]


def item_score(response: str, enc: Encoded, probs: list[float], mode: str = "continuous",
               pos_threshold: float = 0.6, neg_threshold: float = 0.4) -> ItemScore:
    """Token rewards (rewards.token_rewards on p [1, R]) with ids, text and character spans."""
    if mode not in TOKEN_MODES:
        raise ValueError(f"unknown reward mode {mode!r}; expected one of {', '.join(TOKEN_MODES)}")
    response_ids = enc.input_ids[enc.response_start:]
    if len(probs) != len(response_ids) or len(enc.response_offsets) != len(response_ids):
        raise ValueError(f"{len(probs)} probabilities and {len(enc.response_offsets)} offsets "
                         f"for {len(response_ids)} response tokens")
    if not probs:
        return ItemScore(tokens=[], sum=0.0, mean=0.0)
    p = torch.tensor([probs], dtype=torch.float32)  # [1, R]
    rewards = token_rewards(p, mode, pos_threshold=pos_threshold, neg_threshold=neg_threshold)[0]
    tokens = [TokenScore(id=int(tid), text=response[start:end], start=int(start), end=int(end),
                         p=float(pt), reward=float(rt))
              for tid, (start, end), pt, rt in zip(response_ids, enc.response_offsets, probs, rewards.tolist())]
    total = float(rewards.sum())
    return ItemScore(tokens=tokens, sum=total, mean=total / len(tokens))


def score_items(model: torch.nn.Module, tokenizer, pairs: list[tuple[str, str]], mode: str = "continuous",
                batch_size: int = 16, pos_threshold: float = 0.6, neg_threshold: float = 0.4,
                max_prompt_len: int | None = None, max_response_len: int | None = None,
                add_eos: bool = True) -> list[ItemScore]:
    """Score (prompt, response) pairs in batches of `batch_size`; one ItemScore per pair, in order.
    `add_eos` as in `encode_items`: by default each response ends with EOS, scored like PPO's stop token."""
    encoded = encode_items(tokenizer, pairs, max_prompt_len, max_response_len, add_eos)
    probs: list[list[float]] = []
    for begin in range(0, len(encoded), batch_size):
        probs += response_probabilities(model, encoded[begin: begin + batch_size], tokenizer.pad_token_id)
    return [item_score(response, enc, p, mode, pos_threshold, neg_threshold)
            for (_, response), enc, p in zip(pairs, encoded, probs)]


def resolve_discriminator(cfg, checkpoint: str | None = None, flag: str = "serve.checkpoint") -> Path:
    """The discriminator folder to score with: `checkpoint`, else serve.checkpoint, else the run's own
    `<output_dir>/disc/model`; an error naming `flag` when it is not a token-discriminator folder."""
    path = Path(checkpoint or cfg.serve.checkpoint or RunLayout(cfg.output_dir).stage("disc").model)
    meta = path / "head.json"
    if not meta.exists():
        raise ConfigError(f"{flag}: {path} is not a discriminator folder (no head.json); "
                          "train one with `tlcr train-disc` or pass --checkpoint DIR")
    kind = read_json(meta).get("kind")
    if kind != "token_discriminator":
        raise ConfigError(f"{flag}: {path} holds a {kind!r} head, not a token discriminator")
    return path.resolve()


def tokenizer_folder(cfg, checkpoint: str | Path) -> str:
    """The checkpoint's own tokenizer (save_head_model writes it), else model.tokenizer, else model.base's."""
    if (Path(checkpoint) / "tokenizer_config.json").exists():
        return str(checkpoint)
    return resolve_model(cfg.model.tokenizer or cfg.model.base)
