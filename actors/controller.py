"""PPO controller: owns the loop over the actor groups, checkpoints, and survives lost actors.

    tlcr ppo --config configs/demo.yaml [--set reward.mode=sequence]
    ray job submit --working-dir . -- python -m tlcr_ray.cli ppo --config configs/tiny.yaml

A step: prompts -> rollout -> (reward || reference || learner old log-probs/values) -> advantages
-> learner update -> weights to the rollout actors. The batch and the tensors travel as object refs,
each put once. Writes <output_dir>/ppo-<mode>/{metrics.jsonl, tb/, checkpoints/, model}
(`tlcr_ray.layout`). The pure pieces (sampling, state, metrics) are `tlcr_ray.rl.loop_state`.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import ray
import torch
from ray.exceptions import RayActorError
from tqdm import tqdm

from actors.groups import ActorGroups, get_all
from tlcr_ray.config import Config, ConfigError
from tlcr_ray.data.pairs import load_split, rl_prompt_pools
from tlcr_ray.data.tokens import encode_prompts
from tlcr_ray.io import atomic_folder, read_json, write_json_atomic
from tlcr_ray.layout import RunLayout
from tlcr_ray.local_ray import ensure_ray
from tlcr_ray.models import load_tokenizer, resolve_model, vocabulary_mismatch
from tlcr_ray.plan import require_fit
from tlcr_ray.rl.batch import RolloutBatch, merge_batches, split_rows
from tlcr_ray.rl.loop_state import (heldout_metrics, initial_state, response_mask, sample_prompts, saved_state,
                                    step_metrics, sync_check)
from tlcr_ray.rl.ppo_math import KL_ESTIMATORS, advantages_from_rollout, remax_advantages
from tlcr_ray.rl.rewards import MODES, apply_missing_eos_penalty
from tlcr_ray.tracking import CheckpointDir, MetricsLog

ACTOR_LOST = (RayActorError,)  # ActorDiedError and ActorUnavailableError are subclasses


class PPOLoop:
    """One attempt of the PPO loop over live actor groups; raises on a lost actor (`run` recovers)."""

    def __init__(self, cfg: Config, groups: ActorGroups, prompts: list[list[int]], pad_id: int,
                 ckpts: CheckpointDir, metrics: MetricsLog, heldout: tuple[list[list[int]], object] | None = None):
        """`heldout`: (held-out prompt ids, the tokenizer) for the `ppo.heldout_every` probe, or None."""
        self.cfg, self.ppo, self.groups, self.prompts, self.pad_id = cfg, cfg.ppo, groups, prompts, pad_id
        self.ckpts, self.metrics, self.heldout = ckpts, metrics, heldout
        self.synced = False

    def probe_heldout(self) -> dict:
        """Sample one reply per held-out prompt on rollout 0 (fixed seeds, in rollout-sized batches) -> the
        `heldout_*` metrics."""
        prompt_ids, tokenizer = self.heldout
        ppo, size = self.ppo, self.ppo.prompts_per_step  # a rollout batch's size: its memory is known to fit
        responses, seconds = [], 0.0
        for k in range(0, len(prompt_ids), size):
            batch, s = ray.get(self.groups.rollouts[0].generate.remote(
                prompt_ids[k:k + size], self.cfg.model.max_response_len, ppo.temperature, ppo.top_p,
                ppo.heldout_seed + k, ppo.stop))
            responses += batch.response_ids
            seconds += s
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
        return {**heldout_metrics(texts, [len(ids) for ids in responses]), "time_heldout": seconds}

    def step(self, state: dict) -> dict:
        ppo, g = self.ppo, self.groups
        t_start = time.perf_counter()
        prompt_ids = sample_prompts(self.prompts, ppo.prompts_per_step, ppo.seed, state)
        seed = int(state["rng"].integers(2**31))
        remax = ppo.algorithm == "remax"
        sample_refs = self._generate(prompt_ids, ppo.temperature, seed)
        # ReMax's baseline: each prompt's greedy response, generated beside the samples (docs/algorithm.md §10).
        greedy_refs = self._generate(prompt_ids, 0.0, seed) if remax else []
        gen, greedy = get_all(sample_refs), get_all(greedy_refs)
        batch = merge_batches([b for b, _ in gen])
        t_generated = time.perf_counter()
        batch_ref = ray.put(batch)
        score_refs = self._score(batch_ref, len(prompt_ids))
        if remax:
            greedy_batch = merge_batches([b for b, _ in greedy])
            greedy_score_refs = self._score(ray.put(greedy_batch), len(prompt_ids))
        full_kl = ppo.kl_estimator == "full"
        ref_refs = [r.logprobs.remote(batch_ref, self.pad_id, rows, full_kl)
                    for r, rows in zip(g.references, split_rows(len(prompt_ids), len(g.references)))]
        eval_refs = g.learners.evaluate(batch_ref, self.pad_id)
        done = get_all(score_refs + ref_refs + eval_refs)
        scores, refs = done[:len(score_refs)], done[len(score_refs):len(score_refs) + len(ref_refs)]
        evals = done[len(score_refs) + len(ref_refs):]
        t_scored = time.perf_counter()
        cat = lambda parts, key: torch.cat([p[key] for p in parts])  # noqa: E731
        rewards = cat(scores, "rewards")
        mask = response_mask(batch.response_ids, rewards.shape[1])
        rewards = self._penalized(rewards, mask, batch.finish_reasons)
        old_logprobs, ref_logprobs, values = cat(evals, "logprobs"), cat(refs, "logprobs"), cat(evals, "values")
        kl_inputs = dict(kl_estimator=ppo.kl_estimator, logits=cat(evals, "logits") if full_kl else None,
                         ref_logits=cat(refs, "logits") if full_kl else None, temperature=ppo.temperature)
        baseline = None
        if remax:  # the greedy response's total reward, by the same reward function as the sample's
            greedy_rewards = cat(get_all(greedy_score_refs), "rewards")
            greedy_mask = response_mask(greedy_batch.response_ids, greedy_rewards.shape[1])
            baseline = self._penalized(greedy_rewards, greedy_mask, greedy_batch.finish_reasons).sum(1)
            adv = remax_advantages(rewards, baseline, old_logprobs, ref_logprobs, mask, kl_coef=ppo.kl_coef,
                                   gamma=ppo.gamma, **kl_inputs)
        else:
            adv = advantages_from_rollout(rewards, old_logprobs, ref_logprobs, values, mask, kl_coef=ppo.kl_coef,
                                          gamma=ppo.gamma, lam=ppo.lam, whiten=ppo.whiten_advantages, **kl_inputs)
        del kl_inputs
        entropy = cat(evals, "entropy")
        eval_seconds, ref_seconds = max(e["seconds"] for e in evals), max(r["seconds"] for r in refs)
        del done, evals, refs  # drops a full-KL step's [batch, R, vocab] logits before the update
        t_adv = time.perf_counter()
        train = get_all(g.learners.train(batch_ref, self.pad_id, ray.put(adv["advantages"]),
                                         ray.put(adv["returns"]), ray.put(old_logprobs), ray.put(values)))
        t_trained = time.perf_counter()
        # Checked on this attempt's first sync (fresh or recreated engines), then every Nth step.
        check = ppo.sync_check and (not self.synced or (state["step"] + 1) % ppo.sync_check_every == 0)
        sync = self.sync_weights(batch, check)
        self.synced = True
        t_end = time.perf_counter()

        n_tokens = mask.sum().item()
        remax_metrics = {} if baseline is None else {
            "reward_baseline": baseline.mean().item(),  # mean total reward of the greedy responses
            "reward_minus_baseline": (rewards.sum(1) - baseline).mean().item(),
            "response_len_greedy": greedy_mask.sum(1).float().mean().item(),
        }
        return {
            **step_metrics(rewards, mask, adv, old_logprobs, ref_logprobs, values, entropy, batch.finish_reasons,
                           train),
            **remax_metrics,
            "time_generate": max(s for _, s in gen + greedy),
            "time_score": max(s["seconds"] for s in scores),
            "time_reference": ref_seconds,
            "time_learner_eval": eval_seconds,
            "time_train": max(t["seconds"] for t in train),
            "time_sync": sync.pop("seconds"),
            "time_stage_generate": t_generated - t_start,
            "time_stage_score": t_scored - t_generated,
            "time_stage_advantages": t_adv - t_scored,
            "time_stage_train": t_trained - t_adv,
            "time_stage_sync": t_end - t_trained,
            "time_step": t_end - t_start,
            "tokens_per_s": n_tokens / (t_end - t_start),
            **sync,
        }

    def _generate(self, prompt_ids: list[list[int]], temperature: float, seed: int) -> list:
        """Refs of one `generate` per rollout engine over its share of the prompts -> (RolloutBatch, seconds)."""
        chunks = split_rows(len(prompt_ids), len(self.groups.rollouts))
        return [r.generate.remote([prompt_ids[i] for i in rows], self.cfg.model.max_response_len,
                                          temperature, self.ppo.top_p, seed + k, self.ppo.stop)
                for k, (r, rows) in enumerate(zip(self.groups.rollouts, chunks))]

    def _score(self, batch_ref, n_rows: int) -> list:
        """Object refs of the reward scorers' results over their shares of a batch's rows."""
        return [s.score.remote(batch_ref, self.pad_id, rows)
                for s, rows in zip(self.groups.scorers, split_rows(n_rows, len(self.groups.scorers)))]

    def _penalized(self, rewards: torch.Tensor, mask: torch.Tensor, finish_reasons: list[str]) -> torch.Tensor:
        """With ppo.truncated=penalize, a row cut at max_response_len (no EOS) loses a fixed amount at its end."""
        if self.ppo.truncated != "penalize":
            return rewards
        return apply_missing_eos_penalty(rewards, mask, finish_reasons, self.ppo.missing_eos_penalty)

    def sync_weights(self, batch: RolloutBatch, check: bool) -> dict:
        """Updated learner weights -> every rollout engine.

        object_store: rank 0's CPU state dict, one object put once by the return, loaded by each engine.
        nccl: rank 0 broadcasts from GPU while each vLLM engine receives (issued together).
        With `check` (ppo.sync_check, on the first sync and every ppo.sync_check_every steps: three
        extra forwards) the batch's first sequence is scored on rollout 0 before and after the load and
        on the learner: `sync_logprob_err` (rollout vs learner, ~0 when the sync worked) and
        `sync_logprob_change` (rollout before vs after, > 0 when the update reached the engine).
        """
        g = self.groups
        probe = ([batch.prompt_ids[0]], [batch.response_ids[0]])
        before = g.rollouts[0].score.remote(*probe) if check else None  # runs before the load
        start = time.perf_counter()
        if g.sync_method == "nccl":
            sends = g.learners.send_weights()  # collective under ZeRO-3
            loads = [r.receive_weights.remote(g.weight_update_info) for r in g.rollouts]
            compute = max(get_all(loads + sends)[:len(loads)])
        else:
            state_refs = g.learners.full_state_dict()  # collective under ZeRO-3
            loads = [r.load_state_dict.remote(state_refs[0]) for r in g.rollouts]
            compute = max(get_all(loads + state_refs[1:])[:len(loads)])
        out = {"seconds": time.perf_counter() - start, "time_sync_load": compute}
        if check:
            learner_lp = get_all(g.learners.score(*probe, self.pad_id))[0][0]
            rollout_before, rollout_after = (lp[0] for lp in get_all([before, g.rollouts[0].score.remote(*probe)]))
            out.update(sync_check(learner_lp, rollout_before, rollout_after))
        return out

    def checkpoint(self, state: dict) -> Path:
        with self.ckpts.writing(state["step"]) as tmp:
            get_all(self.groups.learners.save_checkpoint(str(tmp)))
            write_json_atomic(tmp / "controller.json", saved_state(state, RunLayout.ppo_run_name(self.cfg)))
        return self.ckpts.latest()

    def run(self, state: dict) -> None:
        with tqdm(total=self.ppo.steps, initial=state["step"], desc=f"ppo-{RunLayout.ppo_run_name(self.cfg)}",
                  unit="step", dynamic_ncols=True) as bar:
            every = self.ppo.heldout_every if self.heldout else 0
            if every and state["step"] == 0:  # the initial policy's value: the curve's step 0
                self.metrics.write(0, self.probe_heldout())
            while state["step"] < self.ppo.steps:
                row = self.step(state)
                state["step"] += 1
                if every and (state["step"] % every == 0 or state["step"] == self.ppo.steps):
                    row.update(self.probe_heldout())  # after the sync: the updated policy
                # Metrics first: a crash before the checkpoint completes rolls both back together.
                self.metrics.write(state["step"], row)
                if state["step"] % self.ppo.checkpoint_every == 0 or state["step"] == self.ppo.steps:
                    self.checkpoint(state)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_token_mean']:.3f}", kl=f"{row['kl']:.3f}",
                                s=f"{row['time_step']:.1f}")


def _resolve_paths(cfg: Config) -> tuple[str, str]:
    mode = cfg.reward.mode
    if mode not in MODES:
        raise ConfigError(f"reward.mode {mode!r}: expected one of {', '.join(MODES)}")
    layout = RunLayout.of(cfg)
    if mode == "sequence":
        reward, key = str(layout.reward_model), "reward.reward_model"
    else:
        reward, key = str(layout.discriminator), "reward.discriminator"
    policy = resolve_model(layout.initial_policy)
    for path, name in ((policy, "ppo.policy"), (reward, key)):
        if not Path(path).exists():
            raise ConfigError(f"{name}: {path} does not exist (run the earlier stage or set {name})")
    # The reward model scores the policy's token ids (and may seed the critic): same vocabulary or nothing.
    mismatch = vocabulary_mismatch(policy, reward)
    if mismatch:
        raise ConfigError(f"{key}: {reward} does not share the policy's vocabulary ({policy}): {mismatch}")
    return policy, reward


def run(cfg: Config, args=None) -> dict:
    """`tlcr ppo`: the whole run, resuming from the last checkpoint and surviving lost actors."""
    # A GPU config that cannot fit is refused before Ray or any model starts (`tlcr plan`, tlcr_ray/plan.py).
    require_fit(cfg, [f"ppo.{g}" for g in ("rollout", "reward", "reference", "learner")
                      if getattr(cfg.ppo, g).num_gpus > 0], "ppo")
    policy_dir, reward_dir = _resolve_paths(cfg)
    paths = RunLayout.of(cfg).ppo(RunLayout.ppo_run_name(cfg))
    run_dir = paths.dir
    ckpts = CheckpointDir(paths.checkpoints, keep=cfg.ppo.keep_checkpoints)
    if cfg.ppo.resume == "never":
        shutil.rmtree(ckpts.root, ignore_errors=True)
    elif cfg.ppo.resume != "auto":
        raise ConfigError(f"ppo.resume {cfg.ppo.resume!r}: expected auto or never")
    if cfg.ppo.kl_estimator not in KL_ESTIMATORS:
        raise ConfigError(f"ppo.kl_estimator {cfg.ppo.kl_estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")
    if cfg.ppo.sync_check_every < 1:
        raise ConfigError(f"ppo.sync_check_every: must be >= 1, got {cfg.ppo.sync_check_every}")
    tokenizer = load_tokenizer(cfg.model.tokenizer or policy_dir)
    rl_pairs, _ = load_split(cfg.data, "rl")
    if not rl_pairs:
        raise ConfigError(f"data.path {cfg.data.path}: the rl partition has no prompts")
    # The report's held-out prompts (pipeline.eval_prompts) are carved out: PPO never trains on them.
    pairs, held_out = rl_prompt_pools(rl_pairs, cfg.pipeline.eval_prompts)
    prompts = encode_prompts(tokenizer, [p.prompt for p in pairs], cfg.model.max_prompt_len)
    heldout = None
    if cfg.ppo.heldout_every and held_out:
        heldout = (encode_prompts(tokenizer, [p.prompt for p in held_out], cfg.model.max_prompt_len), tokenizer)
    ensure_ray()
    failures, started = 0, time.perf_counter()
    while True:
        ckpt = ckpts.latest()
        state = initial_state(cfg.ppo.seed, read_json(ckpt / "controller.json") if ckpt else None)
        metrics = MetricsLog(run_dir, resume_step=state["step"])
        groups = None
        try:
            groups = ActorGroups(cfg, policy_dir, str(ckpt / "hf") if ckpt else policy_dir, reward_dir, failures)
            if ckpt is not None:
                get_all(groups.learners.load_checkpoint(str(ckpt)))
            PPOLoop(cfg, groups, prompts, tokenizer.pad_token_id, ckpts, metrics, heldout).run(state)
            with atomic_folder(paths.model) as tmp:
                get_all(groups.learners.export_hf(str(tmp)))
            break
        except ACTOR_LOST as exc:
            failures += 1
            if failures > cfg.ppo.max_failures:
                raise RuntimeError(f"ppo: {failures} actor losses exceed ppo.max_failures={cfg.ppo.max_failures}") from exc
            print(f"ppo: lost an actor ({type(exc).__name__}); recreating the groups and resuming from "
                  f"{ckpts.latest() or 'the initial policy'} (failure {failures}/{cfg.ppo.max_failures})", flush=True)
        finally:
            metrics.close()
            if groups is not None:
                groups.shutdown()
    rows = metrics.rows()
    last = rows[-1] if rows else {}
    return {"stage": "ppo", "mode": cfg.reward.mode, "steps": state["step"], "failures_recovered": failures,
            "run_dir": str(run_dir), "model": str(paths.model), "wall_s": round(time.perf_counter() - started, 1),
            "final": {k: last.get(k) for k in ("reward_token_mean", "kl", "response_len", "time_step")}}
