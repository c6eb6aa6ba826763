"""The supervised stages in pure torch: examples, dynamic-padding collate, losses, the lr schedule.

    sft   chosen responses of the SFT partition; cross-entropy on response tokens only
    disc  Levenshtein token labels; BCE with soft targets 0 / 0.5 / 1, mean over labelled tokens
    rm    pairs of the reward partition; Bradley-Terry loss -log sigmoid(s_chosen - s_rejected)

`actors/trainer.py` runs these under Ray Train + DeepSpeed; nothing here knows about either, so a
plain torch loop (see tests/test_train.py) trains the same way:

    batch = collate("disc", examples[:4], pad_id=tokenizer.pad_token_id)
    loss, stats = compute_loss("disc", model, batch)
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tlcr_ray.models import SequenceRewardModel, TokenDiscriminator, load_policy, save_head_model

IGNORE = -100
STAGES = ("sft", "disc", "rm")


# ---------------------------------------------------------------- examples

def truncate(input_ids: list[int], targets: list, response_start: int, max_len: int) -> tuple[list[int], list]:
    """Fit a sequence into `max_len`: drop prompt tokens from the left first, then cut the response's end."""
    excess = max(0, len(input_ids) - max_len)
    left = min(excess, response_start)
    return input_ids[left:][:max_len], targets[left:][:max_len]


def _encode(tokenizer, model_cfg, prompt: str, response: str, add_eos: bool):
    from tlcr_ray.tokens import encode_prompt_response

    enc = encode_prompt_response(tokenizer, prompt, response, model_cfg.max_prompt_len, model_cfg.max_response_len)
    ids = list(enc.input_ids)
    # The end-of-turn token teaches the policy to stop and gives the RM one fixed place to read its score.
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, enc.response_start


def sft_examples(pairs, tokenizer, model_cfg, max_len: int) -> list[dict]:
    """Prompt + chosen response (+ eos); `labels` = token ids on the response, IGNORE on the prompt."""
    out = []
    for pair in pairs:
        ids, start = _encode(tokenizer, model_cfg, pair.prompt, pair.chosen, add_eos=True)
        labels = [IGNORE] * start + ids[start:]
        ids, labels = truncate(ids, labels, start, max_len)
        if any(label != IGNORE for label in labels[1:]):  # position 0 has nothing before it to predict from
            out.append({"pair_id": pair.pair_id, "input_ids": ids, "labels": labels})
    return out


def disc_examples(rows, max_len: int) -> list[dict]:
    """LabeledSequence rows -> {input_ids, targets}: targets 0 / 0.5 / 1 on response tokens, IGNORE elsewhere."""
    out = []
    for row in rows:
        if len(row.input_ids) != len(row.labels):
            raise ValueError(f"labels for pair {row.pair_id} ({row.kind}): {len(row.labels)} labels "
                             f"for {len(row.input_ids)} tokens")
        start = next((i for i, t in enumerate(row.labels) if t != IGNORE), len(row.labels))
        ids, targets = truncate(list(row.input_ids), [float(t) for t in row.labels], start, max_len)
        if any(t != IGNORE for t in targets):
            out.append({"pair_id": row.pair_id, "input_ids": ids, "targets": targets})
    return out


def rm_examples(pairs, tokenizer, model_cfg, max_len: int) -> list[dict]:
    """Each pair -> {chosen_ids, rejected_ids}, both prompt + response + eos (the score is read at the eos)."""
    out = []
    for pair in pairs:
        sides = {}
        for side in ("chosen", "rejected"):
            ids, start = _encode(tokenizer, model_cfg, pair.prompt, getattr(pair, side), add_eos=True)
            sides[f"{side}_ids"], _ = truncate(ids, ids, start, max_len)
        out.append({"pair_id": pair.pair_id, **sides})
    return out


def is_heldout(pair_id: str, fraction: float, seed: int) -> bool:
    """Deterministic held-out membership by pair id, so training and `tlcr eval` agree without a file."""
    # Salted: data.partition orders pairs by sha1(f"{seed}:{pair_id}"), and an unsalted hash here would
    # make a partition's first pairs (the ones `max_pairs` keeps) all held out.
    digest = hashlib.sha1(f"heldout:{seed}:{pair_id}".encode()).hexdigest()
    return int(digest[:12], 16) / 16**12 < fraction


def split_heldout(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """-> (train, heldout); both sequences of one labelled pair land on the same side."""
    train = [e for e in examples if not is_heldout(e["pair_id"], fraction, seed)]
    heldout = [e for e in examples if is_heldout(e["pair_id"], fraction, seed)]
    return train, heldout


def stage_init(cfg, stage: str) -> tuple[str, str]:
    """-> (model folder or hub id to start from, a line saying why). disc/rm start from the SFT model."""
    train_cfg = getattr(cfg, stage)
    if train_cfg.init_from:
        return train_cfg.init_from, f"{stage}: starting from {stage}.init_from = {train_cfg.init_from}"
    if stage == "sft":
        return cfg.model.base, f"sft: starting from model.base = {cfg.model.base}"
    sft_model = cfg.stage_dir("sft") / "model"
    if (sft_model / "config.json").exists():
        return str(sft_model), f"{stage}: starting from the SFT model {sft_model}"
    return cfg.model.base, f"{stage}: no SFT model at {sft_model}; starting from model.base = {cfg.model.base}"


def labels_path(cfg) -> Path:
    return Path(cfg.disc.labels_path or cfg.stage_dir("label") / "labels.jsonl")


def stage_examples(cfg, stage: str, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """The stage's examples split into (train, heldout) by pair id, plus where they came from."""
    train_cfg = getattr(cfg, stage)
    if stage == "disc":
        from tlcr_ray.labels import read_labels

        path = labels_path(cfg)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no token labels; run `tlcr label` with this config first")
        rows = read_labels(path)
        examples, stats = disc_examples(rows, train_cfg.max_len), {"labels": str(path), "sequences": len(rows)}
    else:
        from tlcr_ray.data import load_split

        pairs, stats = load_split(cfg.data, "sft" if stage == "sft" else "reward")
        build = sft_examples if stage == "sft" else rm_examples
        examples = build(pairs, tokenizer, cfg.model, train_cfg.max_len)
    train, heldout = split_heldout(examples, train_cfg.eval_fraction, train_cfg.seed)
    if not train:
        raise ValueError(f"{stage}: no training examples ({stats})")
    return train, heldout, stats


# ---------------------------------------------------------------- batches

def pad(seqs: list[list], value) -> torch.Tensor:
    """Right-pad to the longest sequence of this batch -> [B, T_max]."""
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs])


def _ids_and_mask(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = pad([[1] * len(s) for s in seqs], 0)
    return pad(seqs, pad_id), mask


def collate(stage: str, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """sft: input_ids, attention_mask, labels [B, T]; disc: ... targets [B, T] (float);
    rm: input_ids, attention_mask [2B, T] with the B chosen sequences first."""
    if stage == "sft":
        ids, mask = _ids_and_mask([e["input_ids"] for e in examples], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": pad([e["labels"] for e in examples], IGNORE)}
    if stage == "disc":
        ids, mask = _ids_and_mask([e["input_ids"] for e in examples], pad_id)
        targets = pad([e["targets"] for e in examples], float(IGNORE)).float()
        return {"input_ids": ids, "attention_mask": mask, "targets": targets}
    if stage == "rm":
        seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        ids, mask = _ids_and_mask(seqs, pad_id)
        return {"input_ids": ids, "attention_mask": mask}
    raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")


def micro_batches_per_epoch(num_examples: int, micro_batch_size: int, world_size: int) -> int:
    per_worker = num_examples // world_size
    if per_worker == 0:
        raise ValueError(f"{num_examples} training examples cannot feed {world_size} workers")
    return math.ceil(per_worker / micro_batch_size)


def micro_batches(examples: list[dict], micro_batch_size: int, rank: int, world_size: int, seed: int,
                  start: int = 0) -> Iterator[list[dict]]:
    """Endless micro-batches for one worker, reshuffled each epoch; `start` skips ahead (resume).

    Every worker gets the same number per epoch, so the collectives of data-parallel ranks stay in step.
    """
    per_epoch = micro_batches_per_epoch(len(examples), micro_batch_size, world_size)
    per_worker = len(examples) // world_size
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        shard = order[rank::world_size][:per_worker]
        for j in range(offset, per_epoch):
            yield [examples[i] for i in shard[j * micro_batch_size:(j + 1) * micro_batch_size]]
        index = (epoch + 1) * per_epoch


def total_steps(num_examples: int, train_cfg, world_size: int) -> int:
    """Optimizer steps of the run: `max_steps`, else `epochs` worth of micro-batches / grad_accum."""
    if train_cfg.max_steps is not None:
        return train_cfg.max_steps
    per_epoch = micro_batches_per_epoch(num_examples, train_cfg.micro_batch_size, world_size)
    return max(1, int(train_cfg.epochs * per_epoch / train_cfg.grad_accum))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step `step`: linear warm-up, then constant or cosine to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr_schedule {schedule!r}; expected constant or cosine")


def deepspeed_config(train_cfg) -> dict:
    """The DeepSpeed config of one stage (the optimizer and lr schedule are passed in as torch objects)."""
    if train_cfg.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16; got {train_cfg.precision!r}")
    return {
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "gradient_clipping": train_cfg.max_grad_norm,
        "zero_optimization": {"stage": train_cfg.zero_stage},
        "bf16": {"enabled": train_cfg.precision == "bf16"},
        "fp16": {"enabled": train_cfg.precision == "fp16"},
        # A plain torch AdamW: DeepSpeed's own Adam JIT-compiles for a minute or more on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the head bias are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- losses

@dataclass
class StepStats:
    """Sums over micro-batches; `correct / counted` is the stage's token (or pair) accuracy."""

    loss: float = 0.0
    correct: int = 0
    counted: int = 0
    tokens: int = 0
    micro_batches: int = 0

    def add(self, loss: float, correct: int, counted: int, tokens: int) -> None:
        self.loss += loss
        self.correct += correct
        self.counted += counted
        self.tokens += tokens
        self.micro_batches += 1

    def summary(self) -> dict[str, float]:
        return {"loss": self.loss / max(1, self.micro_batches), "accuracy": self.correct / max(1, self.counted),
                "tokens": self.tokens}


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """logits [B, T, V], labels [B, T] -> (mean CE over response tokens, correct next tokens, counted)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    valid = labels != IGNORE
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss, int(correct), int(valid.sum())


def disc_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """logits, targets [B, T] -> (BCE mean over labelled tokens, correct non-neutral tokens, counted).

    Accuracy counts only tokens labelled 0 or 1 (as in the paper); neutral 0.5 tokens train but are not scored.
    """
    labelled = targets != IGNORE
    loss = F.binary_cross_entropy_with_logits(logits[labelled], targets[labelled])
    decided = labelled & (targets != 0.5)
    correct = ((logits > 0) == (targets > 0.5)) & decided
    return loss, int(correct.sum()), int(decided.sum())


def rm_loss(scores: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """scores [2B] (chosen first) -> (mean -log sigmoid(chosen - rejected), pairs ranked right, pairs)."""
    chosen, rejected = scores.float().chunk(2)
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), int((margin > 0).sum()), margin.numel()


def compute_loss(stage: str, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """One forward of `model` on a collated batch -> (loss, correct, counted)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if stage == "sft":
        return sft_loss(model(input_ids=ids, attention_mask=mask).logits, batch["labels"])
    if stage == "disc":
        return disc_loss(model(ids, mask), batch["targets"])
    if stage == "rm":
        return rm_loss(model(ids, mask))
    raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")


# ---------------------------------------------------------------- models per stage

def build_model(stage: str, init_path: str, dtype: str = "float32", seed: int = 0) -> nn.Module:
    """sft: the causal LM itself; disc / rm: its backbone with a fresh head."""
    if stage == "sft":
        return load_policy(init_path, dtype)
    cls = {"disc": TokenDiscriminator, "rm": SequenceRewardModel}[stage]
    return cls.from_pretrained(init_path, dtype=dtype, seed=seed)


def export_model(stage: str, model: nn.Module, path, tokenizer, state_dict: dict | None = None) -> None:
    """Write the stage's model as an HF folder (atomically); `state_dict` overrides the live weights."""
    if stage == "sft":
        from tlcr_ray.models import atomic_folder

        with atomic_folder(path) as tmp:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
    else:
        save_head_model(model, path, tokenizer, state_dict=state_dict)
