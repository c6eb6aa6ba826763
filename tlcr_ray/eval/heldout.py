"""Held-out evaluation of the token discriminator, the sequence reward model and the DPO policy.

    tlcr eval disc --config configs/demo.yaml      # -> <output_dir>/disc/eval.json
    tlcr eval rm   --config configs/demo.yaml      # -> <output_dir>/rm/eval.json
    tlcr eval dpo  --config configs/demo.yaml      # -> <output_dir>/dpo/eval.json (implicit reward margins)

The held-out pairs are the ones training left out (`training.is_heldout` by pair id, with the stage's
`eval_fraction` and `seed`), so no split file needs to be kept in step. Where: `run_cli(cfg, args, runner)`
runs `evaluate_<stage>` on the driver's CPU, or in a Ray task on a GPU worker in the model's dtype when
the cluster has GPUs (`tlcr_ray.eval.runner`); the driver writes eval.json either way.
"""
from __future__ import annotations

import dataclasses
import sys

import torch
from tqdm import tqdm

from tlcr_ray import training as stages
from tlcr_ray.eval.runner import DRIVER, EvalPlace, EvalRunner, run_one
from tlcr_ray.io import write_json_atomic
from tlcr_ray.layout import RunLayout
from tlcr_ray.models import load_head_model, load_tokenizer
from tlcr_ray.rl.rewards import token_rewards


def _batches(items: list, size: int, desc: str):
    return tqdm([items[i:i + size] for i in range(0, len(items), size)], desc=desc, unit="batch", file=sys.stderr,
                leave=False)


def _on(model, batch: dict) -> dict:
    """The batch's tensors on the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _auc(low: torch.Tensor, high: torch.Tensor) -> float | None:
    """P(a score of `low` < a score of `high`), ties counting half (the Mann-Whitney AUC); None if either is empty."""
    if not len(low) or not len(high):
        return None
    high = high.sort().values
    above = len(high) - torch.searchsorted(high, low, right=True)
    tied = torch.searchsorted(high, low, right=True) - torch.searchsorted(high, low, right=False)
    return float((above.sum() + 0.5 * tied.sum()) / (len(low) * len(high)))


@torch.no_grad()
def disc_token_metrics(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Accuracy over non-neutral labelled tokens (p > 0.5 <=> label 1), the recall of each class, and
    `negative_vs_neutral_auc`: how well p ranks the negative tokens (label 0) below the neutral ones
    (0.5 is chance). On the planted benchmark the negatives are exactly the planted tokens, so this is
    the discriminator's separation of planted from other tokens, which a discriminator that calls
    every token bad (negative recall 1) does not have."""
    model.eval()
    counts = {"pos": 0, "pos_hit": 0, "neg": 0, "neg_hit": 0}
    neg_logits, neutral_logits = [], []
    for chunk in _batches(examples, batch_size, "eval disc tokens"):
        batch = _on(model, stages.collate("disc", chunk, pad_id))
        logits = model(batch["input_ids"], batch["attention_mask"]).float()
        predicted_good = logits > 0
        targets = batch["targets"]
        counts["pos"] += int((targets == 1).sum())
        counts["pos_hit"] += int(((targets == 1) & predicted_good).sum())
        counts["neg"] += int((targets == 0).sum())
        counts["neg_hit"] += int(((targets == 0) & ~predicted_good).sum())
        neg_logits.append(logits[targets == 0].cpu())
        neutral_logits.append(logits[targets == 0.5].cpu())
    decided = counts["pos"] + counts["neg"]
    return {
        "token_accuracy": (counts["pos_hit"] + counts["neg_hit"]) / decided if decided else None,
        "positive_recall": counts["pos_hit"] / counts["pos"] if counts["pos"] else None,
        "negative_recall": counts["neg_hit"] / counts["neg"] if counts["neg"] else None,
        "negative_vs_neutral_auc": _auc(torch.cat(neg_logits), torch.cat(neutral_logits)) if examples else None,
        "positive_tokens": counts["pos"], "negative_tokens": counts["neg"], "sequences": len(examples),
    }


@torch.no_grad()
def mean_token_rewards(model, tokenizer, prompts: list[str], responses: list[str], model_cfg, max_len: int,
                       batch_size: int = 8, add_eos: bool = True) -> list[float]:
    """Mean continuous token reward r_t = 2 p_t - 1 over each response's tokens (docs/algorithm.md §5) -> [N].

    With `add_eos` a response that was not truncated ends with the tokenizer's EOS, scored like the
    EOS of a finished PPO response (and like the HTTP API scores it)."""
    from tlcr_ray.data.tokens import append_eos, encode_prompt_response

    model.eval()
    items = []
    for prompt, response in zip(prompts, responses):
        enc = encode_prompt_response(tokenizer, prompt, response, model_cfg.max_prompt_len, model_cfg.max_response_len)
        if add_eos:
            enc = append_eos(enc, tokenizer.eos_token_id)
        marks = [0] * enc.response_start + [1] * (len(enc.input_ids) - enc.response_start)
        ids, marks = stages.truncate(enc.input_ids, marks, enc.response_start, max_len)
        items.append((ids, marks))
    means = []
    for chunk in _batches(items, batch_size, "eval disc pairs"):
        ids = stages.pad([c[0] for c in chunk], tokenizer.pad_token_id)
        attention = stages.pad([[1] * len(c[0]) for c in chunk], 0)
        response = stages.pad([c[1] for c in chunk], 0).bool()  # [B, T]
        device = next(model.parameters()).device
        rewards = token_rewards(torch.sigmoid(model(ids.to(device), attention.to(device)).float().cpu()), "continuous")
        counts = response.sum(1).clamp(min=1)
        means.extend(((rewards * response).sum(1) / counts).tolist())
    return means


@torch.no_grad()
def rm_pair_metrics(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Pairwise accuracy (score(chosen) > score(rejected)) and the mean margin."""
    model.eval()
    right, margins = 0, []
    for chunk in _batches(examples, batch_size, "eval rm"):
        batch = _on(model, stages.collate("rm", chunk, pad_id))
        chosen, rejected = model(batch["input_ids"], batch["attention_mask"]).float().chunk(2)
        right += int((chosen > rejected).sum())
        margins.extend((chosen - rejected).tolist())
    return {"pairwise_accuracy": right / len(examples) if examples else None,
            "mean_margin": sum(margins) / len(margins) if margins else None, "pairs": len(examples)}


def _heldout_pairs(cfg, pair_ids: set[str]):
    from tlcr_ray.data.pairs import load_split

    every, _ = load_split(dataclasses.replace(cfg.data, max_pairs=None), "all")
    return [p for p in every if p.pair_id in pair_ids]


def _load_heldout(cfg, stage: str, model_dir, place: EvalPlace) -> tuple:
    """The stage's model (on `place`) and tokenizer, and the examples its training left out -> (model,
    tokenizer, heldout, stats)."""
    model = load_head_model(model_dir, place.head_dtype(cfg)).to(place.device)
    tokenizer = load_tokenizer(str(model_dir))
    _, heldout, stats = stages.stage_examples(cfg, stage, tokenizer)
    if not heldout:
        fraction = getattr(cfg, stage).eval_fraction
        raise ValueError(f"{stage}: no held-out {'labelled ' if stage == 'disc' else ''}pairs "
                         f"({stage}.eval_fraction={fraction})")
    return model, tokenizer, heldout, stats


def evaluate_disc(cfg, *, place: EvalPlace = DRIVER) -> dict:
    model_dir = RunLayout.of(cfg).discriminator
    model, tokenizer, heldout, stats = _load_heldout(cfg, "disc", model_dir, place)
    batch = cfg.disc.micro_batch_size
    result = {"model": str(model_dir), "labels": stats.get("labels"), "eval_fraction": cfg.disc.eval_fraction,
              **disc_token_metrics(model, heldout, tokenizer.pad_token_id, batch)}
    pairs = _heldout_pairs(cfg, {e["pair_id"] for e in heldout})
    if pairs:
        prompts = [p.prompt for p in pairs]
        chosen = mean_token_rewards(model, tokenizer, prompts, [p.chosen for p in pairs], cfg.model,
                                    cfg.disc.max_len, batch)
        rejected = mean_token_rewards(model, tokenizer, prompts, [p.rejected for p in pairs], cfg.model,
                                      cfg.disc.max_len, batch)
        result["chosen_vs_rejected_accuracy"] = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
        result["mean_reward_chosen"] = sum(chosen) / len(pairs)
        result["mean_reward_rejected"] = sum(rejected) / len(pairs)
    result["heldout_pairs"] = len(pairs)
    return result


def evaluate_rm(cfg, *, place: EvalPlace = DRIVER) -> dict:
    model_dir = RunLayout.of(cfg).reward_model
    model, tokenizer, heldout, _ = _load_heldout(cfg, "rm", model_dir, place)
    return {"model": str(model_dir), "eval_fraction": cfg.rm.eval_fraction,
            **rm_pair_metrics(model, heldout, tokenizer.pad_token_id, cfg.rm.micro_batch_size)}


@torch.no_grad()
def dpo_pair_metrics(policy, examples: list[dict], pad_id: int, beta: float, batch_size: int = 8) -> dict:
    """Examples with `ref_logps` -> the share with an implicit reward margin > 0 (the DPO policy prefers
    the chosen response more than the reference does) and the mean margin, as the RM's metrics."""
    from tlcr_ray.training.dpo import implicit_margins, response_logps

    policy.eval()
    margins = []
    for chunk in _batches(examples, batch_size, "eval dpo"):
        batch = _on(policy, stages.collate("dpo", chunk, pad_id))
        logps = response_logps(policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"])
        margins.extend(implicit_margins(logps, batch["ref_logps"], beta).tolist())
    return {"pairwise_accuracy": sum(m > 0 for m in margins) / len(margins) if margins else None,
            "mean_margin": sum(margins) / len(margins) if margins else None, "pairs": len(examples)}


def evaluate_dpo(cfg, *, place: EvalPlace = DRIVER) -> dict:
    """The DPO policy on its held-out pairs, with the reference log-probs training cached (computed with
    the SFT model on `place` when the cache is missing or stale)."""
    from tlcr_ray.models import load_policy, resolve_model
    from tlcr_ray.training import dpo

    layout = RunLayout.of(cfg)
    model_dir = layout.stage("dpo").model
    tokenizer = load_tokenizer(str(model_dir))
    train, heldout, _ = stages.stage_examples(cfg, "dpo", tokenizer)
    if not heldout:
        raise ValueError(f"dpo: no held-out pairs (dpo.eval_fraction={cfg.dpo.eval_fraction})")
    reference = resolve_model(stages.stage_init(cfg, "dpo")[0])

    def compute(examples):
        return dpo.compute_reference_logps(load_policy(reference, cfg.model.dtype).to(place.device), examples,
                                           tokenizer.pad_token_id, cfg.dpo.micro_batch_size, place.device)

    dpo.attach(heldout, dpo.cached_reference_logps(layout.dpo_reference_logps, train + heldout, reference, compute))
    policy = load_policy(str(model_dir), cfg.model.dtype).to(place.device)
    return {"model": str(model_dir), "reference": reference, "beta": cfg.dpo.beta, "eval_fraction": cfg.dpo.eval_fraction,
            **dpo_pair_metrics(policy, heldout, tokenizer.pad_token_id, cfg.dpo.beta, cfg.dpo.micro_batch_size)}


def run_cli(cfg, args, runner: EvalRunner | None = None) -> dict:
    """`tlcr eval disc|rm|dpo`: evaluate where `runner` says (None: here) and write
    <output_dir>/<stage>/eval.json (atomically, here)."""
    result = run_one(runner, {"disc": evaluate_disc, "rm": evaluate_rm, "dpo": evaluate_dpo}[args.target], cfg)
    out = write_json_atomic(RunLayout.of(cfg).stage(args.target).eval, result)
    return {"eval": str(out), **result}
