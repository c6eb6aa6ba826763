"""Training examples of the supervised stages, and the held-out split by pair id.

    sft   chosen responses of the SFT partition; labels = the response's token ids (IGNORE on the prompt)
    disc  Levenshtein token labels; targets 0 / 0.5 / 1 on response tokens (docs/algorithm.md §3)
    rm    pairs of the reward partition; chosen and rejected sequences, scored at their last token
    dpo   the same pairs; chosen and rejected sequences with `labels` on their response tokens (docs/algorithm.md §10)
    figa  the Levenshtein-labelled sequences; `labels` on response tokens and FIGA's per-token `weights` (§10)

    train, heldout, stats = stage_examples(cfg, "disc", tokenizer)
"""
from __future__ import annotations

import hashlib

from tlcr_ray.layout import RunLayout

IGNORE = -100


def truncate(input_ids: list[int], targets: list, response_start: int, max_len: int) -> tuple[list[int], list]:
    """Fit a sequence into `max_len`: drop prompt tokens from the left first, then cut the response's end
    (a final EOS goes first, so a response cut here does not end with one)."""
    excess = max(0, len(input_ids) - max_len)
    left = min(excess, response_start)
    return input_ids[left:][:max_len], targets[left:][:max_len]


def encode_example(tokenizer, model_cfg, prompt: str, response: str, add_eos: bool):
    from tlcr_ray.data.tokens import append_eos, encode_prompt_response

    enc = encode_prompt_response(tokenizer, prompt, response, model_cfg.max_prompt_len, model_cfg.max_response_len)
    # The end-of-turn token teaches the policy to stop and gives the RM one fixed place to read its score.
    # A response cut at max_response_len gets none (it did not end: an EOS would teach stopping mid-sentence),
    # and `truncate` to max_len drops it with any response token it cuts.
    if add_eos:
        enc = append_eos(enc, tokenizer.eos_token_id)
    return list(enc.input_ids), enc.response_start


def takes_rejected(pair_id: str, fraction: float, seed: int) -> bool:
    """Whether SFT trains on this pair's rejected response (`sft.rejected_fraction`), by a seeded hash."""
    digest = hashlib.sha1(f"sft-rejected:{seed}:{pair_id}".encode()).hexdigest()
    return int(digest[:12], 16) / 16**12 < fraction


def sft_examples(pairs, tokenizer, model_cfg, max_len: int, rejected_fraction: float = 0.0,
                 seed: int = 0) -> list[dict]:
    """Prompt + chosen response (+ eos); `labels` = token ids on the response, IGNORE on the prompt. A
    `rejected_fraction` share of the pairs (`takes_rejected`) trains on the rejected response instead."""
    out = []
    for pair in pairs:
        response = pair.rejected if takes_rejected(pair.pair_id, rejected_fraction, seed) else pair.chosen
        ids, start = encode_example(tokenizer, model_cfg, pair.prompt, response, add_eos=True)
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
            ids, start = encode_example(tokenizer, model_cfg, pair.prompt, getattr(pair, side), add_eos=True)
            sides[f"{side}_ids"], _ = truncate(ids, ids, start, max_len)
        out.append({"pair_id": pair.pair_id, **sides})
    return out


def dpo_examples(pairs, tokenizer, model_cfg, max_len: int) -> list[dict]:
    """Each pair -> {chosen_ids, chosen_labels, rejected_ids, rejected_labels}: prompt + response + eos,
    labels = token ids on the response (IGNORE on the prompt), as SFT's."""
    out = []
    for pair in pairs:
        example = {"pair_id": pair.pair_id}
        for side in ("chosen", "rejected"):
            ids, start = encode_example(tokenizer, model_cfg, pair.prompt, getattr(pair, side), add_eos=True)
            ids, labels = truncate(ids, [IGNORE] * start + ids[start:], start, max_len)
            example[f"{side}_ids"], example[f"{side}_labels"] = ids, labels
        if all(any(t != IGNORE for t in example[f"{side}_labels"][1:]) for side in ("chosen", "rejected")):
            out.append(example)
    return out


def figa_examples(rows, eos_id: int | None, max_len: int, figa_cfg) -> list[dict]:
    """LabeledSequence rows -> {input_ids, labels, weights}: labels = token ids on the response, weights =
    FIGA's per-token weight of each (`figa.token_weights`); sequences whose weights are all 0 are dropped."""
    from tlcr_ray.training.figa import token_weights

    out = []
    for row in rows:
        start = next((i for i, t in enumerate(row.labels) if t != IGNORE), len(row.labels))
        ends = eos_id is not None and len(row.input_ids) > start and row.input_ids[-1] == eos_id
        weights = token_weights(row.labels, row.kind, ends, figa_cfg.alpha, figa_cfg.beta, figa_cfg.gamma)
        ids = list(row.input_ids)
        cut_ids, labels = truncate(ids, [IGNORE] * start + ids[start:], start, max_len)
        _, weights = truncate(ids, weights, start, max_len)
        if any(w != 0 for w in weights[1:]):
            out.append({"pair_id": row.pair_id, "kind": row.kind, "input_ids": cut_ids, "labels": labels,
                        "weights": weights})
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
    """-> (model folder or hub id to start from, a line saying why). Every stage but SFT starts from the SFT
    model (DPO also uses it as its reference)."""
    train_cfg = getattr(cfg, stage)
    if train_cfg.init_from:
        return train_cfg.init_from, f"{stage}: starting from {stage}.init_from = {train_cfg.init_from}"
    if stage == "sft":
        return cfg.model.base, f"sft: starting from model.base = {cfg.model.base}"
    sft_model = RunLayout.of(cfg).sft_model
    if (sft_model / "config.json").exists():
        return str(sft_model), f"{stage}: starting from the SFT model {sft_model}"
    return cfg.model.base, f"{stage}: no SFT model at {sft_model}; starting from model.base = {cfg.model.base}"


def stage_examples(cfg, stage: str, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """The stage's examples split into (train, heldout) by pair id, plus where they came from."""
    train_cfg = getattr(cfg, stage)
    if stage in ("disc", "figa"):
        from tlcr_ray.labeling.labels import read_labels

        path = RunLayout.of(cfg).labels
        if not path.exists():
            raise FileNotFoundError(f"{path}: no token labels; run `tlcr label` with this config first")
        rows = read_labels(path)
        examples = disc_examples(rows, train_cfg.max_len) if stage == "disc" else \
            figa_examples(rows, tokenizer.eos_token_id, train_cfg.max_len, train_cfg)
        stats = {"labels": str(path), "sequences": len(rows)}
    else:
        from tlcr_ray.data.pairs import load_split

        pairs, stats = load_split(cfg.data, "sft" if stage == "sft" else "reward")
        if stage == "dpo" and train_cfg.max_pairs is not None:
            pairs = pairs[:train_cfg.max_pairs]
            stats = {**stats, "dpo_max_pairs": train_cfg.max_pairs}
        if stage == "sft":
            examples = sft_examples(pairs, tokenizer, cfg.model, train_cfg.max_len, train_cfg.rejected_fraction,
                                    train_cfg.seed)
        else:
            build = {"rm": rm_examples, "dpo": dpo_examples}[stage]
            examples = build(pairs, tokenizer, cfg.model, train_cfg.max_len)
    train, heldout = split_heldout(examples, train_cfg.eval_fraction, train_cfg.seed)
    if not train:
        raise ValueError(f"{stage}: no training examples ({stats})")
    return train, heldout, stats
