"""The paper's Figure 6 on one run: every method's policy (SFT, DPO, PPO-seq, ReMax, FIGA, TLCR-fixed, TLCR,
the sign ablations: `tlcr_ray/methods.py`) on held-out prompts, each row when its model exists.

    table = reward_table(cfg)            # also written to <output_dir>/report/reward_table.json

Each policy samples a response to the same held-out RL prompts (same seeds, the PPO sampling
settings); the responses are scored by the sequence RM (clipped score), by the discriminator as a
sum of discrete (`fixed`) token rewards, and as a sum of continuous (2p - 1) token rewards.
Held-out prompts are the tail of the RL partition, which PPO's prompt pool leaves out
(`data.pairs.rl_prompt_pools`, shared with the controller). Sampling uses PPO's stop strings (`ppo.stop`).

Where (`reward_table(cfg, runner)`, `tlcr_ray.eval.runner`): on the driver, all policies one after another
with HF `generate` on its CPU; on a cluster with GPUs, one Ray task per policy on a GPU worker, which
samples with the rollout backend (`ppo.rollout_backend`: vLLM) and scores in the model's dtype. Either
way `sample_and_score` does the work and the driver writes the table.
"""
from __future__ import annotations

import gc

import torch

from tlcr_ray.config import Config, ConfigError
from tlcr_ray.data.pairs import load_split, rl_prompt_pools
from tlcr_ray.data.tokens import encode_prompt_response
from tlcr_ray.eval.answers import eval_engine_kwargs
from tlcr_ray.eval.runner import DRIVER, EvalPlace, EvalRunner, LocalRunner
from tlcr_ray.io import write_json_atomic
from tlcr_ray.layout import RunLayout
from tlcr_ray.methods import METHODS
from tlcr_ray.models import load_head_model, load_tokenizer, resolve_model
from tlcr_ray.rl.batch import pack
from tlcr_ray.rl.rewards import discriminator_probs, sequence_scores, token_rewards
from tlcr_ray.rl.rollout import make_engine


def heldout_prompts(cfg: Config, n: int) -> list[list[int]]:
    """Token ids of the `n` held-out prompts of the RL partition, the ones PPO does not train on
    (`rl_prompt_pools`), left-truncated like PPO's."""
    pairs, _ = load_split(cfg.data, "rl")
    if not pairs:
        raise ValueError(f"{cfg.data.path}: the RL partition is empty; no held-out prompts to evaluate")
    if n < 1:
        raise ConfigError(f"pipeline.eval_prompts={n}: the reward table needs at least one held-out prompt")
    _, held_out = rl_prompt_pools(pairs, n)
    tokenizer = load_tokenizer(resolve_model(cfg.model.tokenizer or cfg.model.base))
    return [encode_prompt_response(tokenizer, p.prompt, "", max_prompt_len=cfg.model.max_prompt_len).prompt_ids
            for p in held_out]


@torch.no_grad()
def score_samples(prompt_ids: list[list[int]], response_ids: list[list[int]], disc, rm, pad_id: int,
                  cfg: Config) -> list[dict]:
    """Per sample: discriminator p per response token, and the three sums of the table."""
    packed = pack(prompt_ids, response_ids, pad_id)
    p = discriminator_probs(disc, packed.input_ids, packed.attention_mask, packed.prompt_len, packed.response_mask)
    mask = packed.response_mask
    continuous = (token_rewards(p, "continuous") * mask).sum(-1)
    discrete = (token_rewards(p, "fixed", cfg.reward.fixed_pos_threshold, cfg.reward.fixed_neg_threshold)
                * mask).sum(-1)
    clip = cfg.reward.sequence_clip
    rm_scores = sequence_scores(rm, packed.input_ids, packed.attention_mask).clamp(-clip, clip) \
        if rm is not None else torch.full((len(prompt_ids),), float("nan"))
    return [{"prompt_ids": prompt_ids[i], "response_ids": response_ids[i],
             "p": [round(x, 4) for x in p[i, :len(response_ids[i])].tolist()],
             "continuous_sum": float(continuous[i]), "discrete_sum": float(discrete[i]),
             "rm_score": float(rm_scores[i])} for i in range(len(prompt_ids))]


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN (no RM)
    return sum(values) / len(values) if values else float("nan")


def load_scorers(cfg: Config, place: EvalPlace = DRIVER) -> tuple:
    """The run's discriminator and sequence RM (None when it has none) on `place`, in eval mode."""
    layout, dtype = RunLayout.of(cfg), place.head_dtype(cfg)
    disc = load_head_model(layout.discriminator, dtype).to(place.device).eval()
    rm = load_head_model(layout.reward_model, dtype).to(place.device).eval() if layout.reward_model.exists() else None
    return disc, rm


def sample_and_score(cfg: Config, methods: list[str], prompts: list[list[int]], *,
                     place: EvalPlace = DRIVER) -> dict[str, list[dict]]:
    """Each method's policy samples a response per prompt and seed on `place` (its backend and device);
    -> {method label: scored samples}."""
    layout = RunLayout.of(cfg)
    disc, rm = load_scorers(cfg, place)
    pad_id = load_tokenizer(resolve_model(cfg.model.tokenizer or cfg.model.base)).pad_token_id
    # The HF backend reads only the dtype and device. +1: as the PPO engines (engine_kwargs_of).
    kwargs = {**eval_engine_kwargs(cfg, cfg.model.max_prompt_len + cfg.model.max_response_len + 1),
              "seed": cfg.ppo.seed, "device": place.device}
    out = {}
    for key in methods:
        method = METHODS[key]
        engine = make_engine(place.backend, str(method.model(layout)), **kwargs)
        scored = []
        for seed in cfg.pipeline.eval_seeds:
            batch = engine.generate(prompts, max_new_tokens=cfg.model.max_response_len,
                                    temperature=cfg.ppo.temperature, top_p=cfg.ppo.top_p, seed=seed,
                                    stop=cfg.ppo.stop)
            scored += score_samples(batch.prompt_ids, batch.response_ids, disc, rm, pad_id, cfg)
        del engine
        gc.collect()  # the next policy's engine needs the memory
        if place.on_gpu:
            torch.cuda.empty_cache()
        out[method.label] = scored
    return out


def reward_table(cfg: Config, runner: EvalRunner | None = None) -> dict:
    """Sample and score each available policy (`runner`: where; None: here); returns {"rows": {...},
    "prompts", "seeds", "samples", "evaluated_on"}, also written to <output_dir>/report/reward_table.json."""
    layout, runner = RunLayout.of(cfg), runner or LocalRunner()
    prompts = heldout_prompts(cfg, cfg.pipeline.eval_prompts)
    present = [key for key, method in METHODS.items() if method.model(layout).exists()]
    groups = [[key] for key in present] if runner.parallel else [present]  # workers: one task per policy
    samples = {}
    for part in runner.run_all([(sample_and_score, (cfg, group, prompts)) for group in groups]):
        samples.update(part)
    rows = {}
    for name, scored in samples.items():
        rows[name] = {key: _mean([s[key] for s in scored]) for key in ("rm_score", "discrete_sum", "continuous_sum")}
        rows[name]["mean_length"] = _mean([len(s["response_ids"]) for s in scored])
    table = {"rows": rows, "prompts": len(prompts), "seeds": list(cfg.pipeline.eval_seeds),
             "samples": samples, "evaluated_on": runner.where}
    write_json_atomic(layout.reward_table, table, indent=None)
    return table
