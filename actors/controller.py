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
from actors.phases import PhaseHooks
from ray_init import ensure_ray
from tlcr_ray.config import Config, ConfigError
from tlcr_ray.data.pairs import load_split, rl_prompt_pools
from tlcr_ray.data.tokens import encode_prompts
from tlcr_ray.io import read_json, write_json_atomic
from tlcr_ray.layout import RunLayout
from tlcr_ray.models import load_tokenizer, resolve_model, vocabulary_mismatch
from tlcr_ray.placement import ppo_placement
from tlcr_ray.oom import OutOfMemory, find_oom, oom_message
from tlcr_ray.plan import require_fit
from tlcr_ray.rl.batch import RolloutBatch, merge_batches, split_rows
from tlcr_ray.rl.loop_state import (heldout_metrics, initial_state, response_mask, rollout_logprobs, sample_prompts,
                                    saved_state, step_metrics, sync_check)
from tlcr_ray.rl.ppo_math import KL_ESTIMATORS, advantages_from_rollout, remax_advantages
from tlcr_ray.rl.rewards import MODES, apply_missing_eos_penalty
from tlcr_ray.rl.rollout import resolve_backend
from tlcr_ray.tracking import CheckpointDir, MetricsLog, read_step_rows

ACTOR_LOST = (RayActorError,)  # ActorDiedError and ActorUnavailableError are subclasses


def _cat(parts: list[dict], key: str) -> torch.Tensor:
    """One tensor from the actors' row blocks, in order."""
    return torch.cat([p[key] for p in parts])


class PPOLoop:
    """One attempt of the PPO loop over live actor groups; raises on a lost actor (`run` recovers)."""

    def __init__(self, cfg: Config, groups: ActorGroups, prompts: list[list[int]], pad_id: int,
                 ckpts: CheckpointDir, metrics: MetricsLog, export_dir: Path | None = None,
                 heldout: tuple[list[list[int]], object] | None = None):
        """`export_dir`: where ppo.export_every writes the policy (replaced each time). `heldout`: (held-out
        prompt ids, the tokenizer) for the `ppo.heldout_every` probe, or None."""
        self.cfg, self.ppo, self.groups, self.prompts, self.pad_id = cfg, cfg.ppo, groups, prompts, pad_id
        self.ckpts, self.metrics, self.export_dir, self.heldout = ckpts, metrics, export_dir, heldout
        self.synced = False
        self.hooks = PhaseHooks.for_groups(groups, metrics)  # ppo.colocate all's sleep/offload; else no-ops
        self.fused = groups.learners.fuses_evaluation()  # ppo.fuse_evaluation on a one-pass update

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
        self.hooks.step = state["step"] + 1
        prompt_ids = sample_prompts(self.prompts, ppo.prompts_per_step, ppo.seed, state)
        seed = int(state["rng"].integers(2**31))
        remax = ppo.algorithm == "remax"
        sample_refs = self._generate(prompt_ids, ppo.temperature, seed)
        # ReMax's baseline: each prompt's greedy response, generated beside the samples (docs/algorithm.md §10).
        greedy_refs = self._generate(prompt_ids, 0.0, seed) if remax else []
        gen, greedy = get_all(sample_refs), get_all(greedy_refs)
        batch = merge_batches([b for b, _ in gen])
        t_generated = time.perf_counter()
        t_phases = self.hooks.after_generate()
        batch_ref = ray.put(batch)
        score_refs = self._score(batch_ref, len(prompt_ids))
        if remax:
            greedy_batch = merge_batches([b for b, _ in greedy])
            greedy_score_refs = self._score(ray.put(greedy_batch), len(prompt_ids))
        ref_refs = [r.logprobs.remote(batch_ref, self.pad_id, rows)
                    for r, rows in zip(g.references, split_rows(len(prompt_ids), len(g.references)))]
        from_rollout = ppo.old_logprobs == "rollout"  # the HF engine's sampling log-probs: no policy forward
        # ppo.fuse_evaluation: the one-pass update's own forwards give the old log-probs and values.
        eval_refs = [] if self.fused else g.learners.evaluate(batch_ref, self.pad_id, not from_rollout)
        done = get_all(score_refs + ref_refs + eval_refs)
        scores, refs = done[:len(score_refs)], done[len(score_refs):len(score_refs) + len(ref_refs)]
        evals = done[len(score_refs) + len(ref_refs):]
        t_scored = time.perf_counter()
        rewards = _cat(scores, "rewards")
        mask = response_mask(batch.response_ids, rewards.shape[1])
        rewards = self._penalized(rewards, mask, batch.finish_reasons)
        old_logprobs = rollout_logprobs(batch.logprobs, mask) if from_rollout else \
            None if self.fused else _cat(evals, "logprobs")
        ref_logprobs, values = _cat(refs, "logprobs"), None if self.fused else _cat(evals, "values")
        baseline = None
        if remax:  # the greedy response's total reward, by the same reward function as the sample's
            greedy_rewards = _cat(get_all(greedy_score_refs), "rewards")
            greedy_mask = response_mask(greedy_batch.response_ids, greedy_rewards.shape[1])
            baseline = self._penalized(greedy_rewards, greedy_mask, greedy_batch.finish_reasons).sum(1)
        # None: the update's forward gives it
        entropy = None if from_rollout or self.fused else _cat(evals, "entropy")
        eval_seconds = max((e["seconds"] for e in evals), default=0.0)
        ref_seconds = max(r["seconds"] for r in refs)
        kl = _cat(evals, "kl") if ppo.kl_estimator == "full" else None  # the learner's exact KL (its reference)
        del done, evals, refs
        if self.fused:  # the advantages are computed by the learner, inside the update
            t_adv = time.perf_counter()
            t_phases += self.hooks.before_train()
            out = get_all(g.learners.train_in_one_pass(batch_ref, self.pad_id, ray.put(rewards), ray.put(ref_logprobs),
                                                       old_logprobs, baseline))[0]
            train, old_logprobs, values, adv = [out.pop("stats")], out.pop("old_logprobs"), out.pop("values"), out
        else:
            adv = self._advantages(rewards, mask, old_logprobs, ref_logprobs, values, baseline, kl)
            t_adv = time.perf_counter()
            t_phases += self.hooks.before_train()
            train = get_all(g.learners.train(batch_ref, self.pad_id, ray.put(adv["advantages"]),
                                             ray.put(adv["returns"]), ray.put(old_logprobs), ray.put(values)))
        t_phases += self.hooks.after_train()
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
            "time_phases": t_phases,  # ppo.colocate all: sleep/wake and offload/reload hooks (in the stages)
            "time_stage_generate": t_generated - t_start,
            "time_stage_score": t_scored - t_generated,
            "time_stage_advantages": t_adv - t_scored,
            "time_stage_train": t_trained - t_adv,
            "time_stage_sync": t_end - t_trained,
            "time_step": t_end - t_start,
            "tokens_per_s": n_tokens / (t_end - t_start),
            **sync,
        }

    def _advantages(self, rewards, mask, old_logprobs, ref_logprobs, values, baseline, kl) -> dict:
        """The controller's advantages (`ppo_math`): ReMax's with the greedy `baseline`, else GAE on `values`."""
        ppo = self.ppo
        kl_inputs = dict(kl_estimator=ppo.kl_estimator, kl=kl, temperature=ppo.temperature)
        if baseline is not None:
            return remax_advantages(rewards, baseline, old_logprobs, ref_logprobs, mask, kl_coef=ppo.kl_coef,
                                    gamma=ppo.gamma, **kl_inputs)
        return advantages_from_rollout(rewards, old_logprobs, ref_logprobs, values, mask, kl_coef=ppo.kl_coef,
                                       gamma=ppo.gamma, lam=ppo.lam, whiten=ppo.whiten_advantages, **kl_inputs)

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
        """Updated learner weights -> every rollout engine, by `groups.sync_method` (ppo.weight_sync):

        shm / cuda_ipc: rank 0 hands each gathered bucket to every engine by reference (a /dev/shm file, one
        reused file into HF engines; a CUDA IPC handle per GPU), each once all loaded the last (`rl.handover`).
        object_store: rank 0 puts the weights in the store one bucket (ppo.bucket_mib) at a time as
        ZeRO-3 gathers them; each engine loads them bucket by bucket.
        nccl: rank 0 broadcasts from GPU, bucket by bucket, while each vLLM engine receives (issued together).
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
        elif g.sync_method in ("shm", "cuda_ipc"):
            # Rank 0 hands each bucket to every engine by reference and waits for their acks (collective).
            compute = get_all(g.learners.push_weights(g.sync_method, g.rollouts))[0]["load_seconds"]
        else:
            # Rank 0 puts each gathered bucket in the store as it goes (collective under ZeRO-3); each
            # engine then fetches and loads them one at a time.
            bucket_refs = get_all(g.learners.state_bucket_refs())[0]
            loads = [r.load_weight_buckets.remote(bucket_refs) for r in g.rollouts]
            compute = max(get_all(loads))
        out = {"seconds": time.perf_counter() - start, "time_sync_load": compute}
        if check:
            learner_lp = get_all(g.learners.score(*probe, self.pad_id))[0][0]
            rollout_before, rollout_after = (lp[0] for lp in get_all([before, g.rollouts[0].score.remote(*probe)]))
            out.update(sync_check(learner_lp, rollout_before, rollout_after))
        return out

    def checkpoint(self, state: dict) -> Path:
        with self.ckpts.writing(state["step"]) as tmp:
            get_all(self.groups.learners.save_checkpoint(str(tmp), state["step"]))
            write_json_atomic(tmp / "controller.json", saved_state(state, RunLayout.ppo_run_name(self.cfg)))
        return self.ckpts.latest()

    def run(self, state: dict) -> None:
        with tqdm(total=self.ppo.steps, initial=state["step"], desc=f"ppo-{RunLayout.ppo_run_name(self.cfg)}",
                  unit="step", dynamic_ncols=True) as bar:
            self.hooks.start()
            probe_every = self.ppo.heldout_every if self.heldout else 0
            if probe_every and state["step"] == 0:  # the initial policy's value: the curve's step 0
                self.metrics.write(0, self.probe_heldout())
            while state["step"] < self.ppo.steps:
                row = self.step(state)
                state["step"] += 1
                if probe_every and (state["step"] % probe_every == 0 or state["step"] == self.ppo.steps):
                    row.update(self.probe_heldout())  # after the sync: the updated policy
                # Metrics first: a crash before the checkpoint completes rolls both back together.
                self.metrics.write(state["step"], row)
                # The last step's resumable state would be deleted at once unless ppo.keep_resume_state:
                # the final export (tlcr_export.json "final") is what marks the run done.
                last = state["step"] == self.ppo.steps
                if state["step"] % self.ppo.checkpoint_every == 0 or (last and self.ppo.keep_resume_state):
                    with self.hooks.learner_resident():
                        self.checkpoint(state)
                export_every = self.ppo.export_every
                if export_every and self.export_dir and state["step"] % export_every == 0 \
                        and state["step"] < self.ppo.steps:
                    with self.hooks.learner_resident():
                        get_all(self.groups.learners.export_hf(str(self.export_dir), state["step"]))
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
    if getattr(args, "dry_run", False):  # `--dry-run`: placement and memory plan only (actors.dry_run)
        from actors.dry_run import ppo_dry_run

        return ppo_dry_run(cfg)
    # A GPU config that cannot fit is refused before Ray or any model starts (`tlcr plan`, tlcr_ray/plan.py).
    require_fit(cfg, [f"ppo.{g}" for g in ("rollout", "reward", "reference", "learner")
                      if getattr(cfg.ppo, g).num_gpus > 0], "ppo")
    ppo_placement(cfg.ppo, resolve_backend(cfg.ppo.rollout_backend))  # a layout that cannot exist: refused now
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
    finished = finished_export(paths.model, cfg.ppo.steps)
    # A finished run whose resumable state was deleted at its end (ppo.keep_resume_state false).
    if finished and ckpts.latest() is None and cfg.ppo.resume == "auto":
        print(f"ppo: {paths.model} is the finished run's policy (step {finished['step']}); nothing to do "
              "(delete it, or set ppo.resume=never, to train again)", flush=True)
        rows = read_step_rows(paths.metrics) if paths.metrics.exists() else []
        return _summary(cfg, paths, rows, finished["step"], 0, 0.0)
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
            print(f"ppo: weight sync {groups.sync_method} (ppo.weight_sync {cfg.ppo.weight_sync})", flush=True)
            if ckpt is not None:
                get_all(groups.learners.load_checkpoint(str(ckpt)))
            PPOLoop(cfg, groups, prompts, tokenizer.pad_token_id, ckpts, metrics, paths.export, heldout).run(state)
            get_all(groups.learners.export_hf(str(paths.model), state["step"], True))  # atomic, streamed
            break
        except Exception as exc:
            if find_oom(exc) is not None:  # recreating the groups would only run out again: stop, say why
                group = group_of(exc)
                raise OutOfMemory(oom_message(cfg, group, exc, str(ckpts.latest() or "") or None,
                                              during=f"step {state['step'] + 1}"), group) from exc
            if not isinstance(exc, ACTOR_LOST):
                raise
            failures += 1
            if failures > cfg.ppo.max_failures:
                raise RuntimeError(f"ppo: {failures} actor losses exceed ppo.max_failures={cfg.ppo.max_failures}") from exc
            print(f"ppo: lost an actor ({type(exc).__name__}); recreating the groups and resuming from "
                  f"{ckpts.latest() or 'the initial policy'} (failure {failures}/{cfg.ppo.max_failures})", flush=True)
        finally:
            metrics.close()
            if groups is not None:
                groups.shutdown()
    shutil.rmtree(paths.export, ignore_errors=True)  # superseded by the final model
    if not cfg.ppo.keep_resume_state:  # optimizer states: ~3x the policy per engine; the run is done
        shutil.rmtree(ckpts.root, ignore_errors=True)
    return _summary(cfg, paths, metrics.rows(), state["step"], failures, time.perf_counter() - started)


ACTOR_GROUPS = {"LearnerWorker": "ppo.learner", "Rollout": "ppo.rollout", "Reference": "ppo.reference",
                "RewardScorer": "ppo.reward"}
"""Actor class -> the config group it is (`tlcr plan`'s names)."""


def group_of(exc: BaseException) -> str:
    """The PPO group whose actor raised `exc` (a RayTaskError names the actor's class); "ppo" if none does."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = f"{getattr(exc, 'function_name', '') or ''} {getattr(exc, 'actor_repr', '') or ''} {exc}"
        for cls, group in ACTOR_GROUPS.items():
            if f"{cls}." in text or f"{cls}(" in text:
                return group
        exc = getattr(exc, "cause", None) or exc.__cause__
    return "ppo"


def finished_export(model_dir: Path, steps: int) -> dict | None:
    """The final export's tlcr_export.json when `model_dir` holds a finished run of `steps` steps."""
    from tlcr_ray.training.gather import read_export_info

    info = read_export_info(model_dir) if model_dir.exists() else None
    return info if info and info.get("final") and info.get("step") == steps else None


def _summary(cfg: Config, paths, rows: list[dict], steps: int, failures: int, seconds: float) -> dict:
    last = rows[-1] if rows else {}
    return {"stage": "ppo", "mode": cfg.reward.mode, "steps": steps, "failures_recovered": failures,
            "run_dir": str(paths.dir), "model": str(paths.model), "wall_s": round(seconds, 1),
            "resume_state": str(paths.checkpoints) if cfg.ppo.keep_resume_state else "deleted",
            "final": {k: last.get(k) for k in ("reward_token_mean", "kl", "response_len", "time_step")}}
