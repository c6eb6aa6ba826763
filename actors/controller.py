"""PPO controller: owns the loop, creates the actor groups, checkpoints, and survives lost actors.

    tlcr ppo --config configs/demo.yaml [--set reward.mode=sequence]
    ray job submit --working-dir . -- python -m tlcr_ray.cli ppo --config configs/tiny.yaml

A step: prompts -> rollout -> (reward || reference || learner old log-probs/values) -> advantages
-> learner update -> weights to the rollout actors. The batch and the tensors travel as object refs,
each put once. Writes <output_dir>/ppo-<mode>/{metrics.jsonl, tb/, checkpoints/, model}.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm

from actors.learner import LearnerGroup
from actors.reference import Reference
from actors.reward import RewardScorer
from actors.rollout import Rollout
from tlcr_ray.config import ConfigError, Config
from tlcr_ray.ppo import KL_ESTIMATORS, advantages_from_rollout, masked_mean
from tlcr_ray.rewards import MODES
from tlcr_ray.rollout import RolloutBatch, encode_prompts, weight_sync_method
from tlcr_ray.run_state import CheckpointDir, MetricsLog, read_json, write_json_atomic

ACTOR_LOST = (RayActorError,)  # ActorDiedError and ActorUnavailableError are subclasses


def _bundle(res) -> dict:
    bundle = {"CPU": res.num_cpus, **res.resources}
    if res.num_gpus:
        bundle["GPU"] = res.num_gpus
    return bundle


class ActorGroups:
    """Rollout, reward, reference and learner actors, each group on its own PACKed placement group."""

    def __init__(self, cfg: Config, policy_dir: str, rollout_dir: str, reward_dir: str, attempt: int = 0):
        ppo = cfg.ppo
        self.pgs = {}
        for name in ("rollout", "reward", "reference", "learner"):
            res = getattr(ppo, name)
            pg = placement_group([_bundle(res)] * res.num_actors, strategy="PACK", name=f"tlcr-ppo-{name}")
            if not pg.wait(timeout_seconds=300):
                remove_placement_group(pg)
                raise RuntimeError(f"ppo.{name}: cannot place {res.num_actors} x {_bundle(res)} on this cluster "
                                   f"(available: {ray.available_resources()})")
            self.pgs[name] = pg

        # Idle OpenMP threads sleep instead of spinning: the actors share cores, and spinning threads of
        # an idle actor (or of a co-tenant) slowed the busy one about 4x on a loaded 2-core machine.
        env_vars = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        if ppo.threads_per_actor:  # Ray keeps an OMP_NUM_THREADS that is already set
            env_vars["OMP_NUM_THREADS"] = str(ppo.threads_per_actor)
        runtime_env = {"env_vars": env_vars}  # merged into the job's runtime env

        def opts(name: str, i: int) -> dict:
            res = getattr(ppo, name)
            # Named per attempt so a recreated group never collides with a dying one.
            return {"name": f"tlcr-ppo-{name}-{i}-a{attempt}", "num_cpus": res.num_cpus, "num_gpus": res.num_gpus,
                    "resources": res.resources or None, "runtime_env": runtime_env,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pgs[name], placement_group_bundle_index=i)}

        dtype = cfg.model.dtype
        engine_kwargs = {"dtype": dtype, "gpu_memory_utilization": ppo.vllm_memory_utilization,
                         "tensor_parallel_size": ppo.vllm_tensor_parallel, "kv_cache_gib": ppo.vllm_kv_cache_gib,
                         # +1: scoring a full prompt + response still asks vLLM for one new token.
                         "max_model_len": cfg.model.max_prompt_len + cfg.model.max_response_len + 1}
        self.rollouts = [Rollout.options(**opts("rollout", i)).remote(
            rollout_dir, ppo.rollout_backend, {**engine_kwargs, "seed": ppo.seed + i})
            for i in range(ppo.rollout.num_actors)]
        self.scorers = [RewardScorer.options(**opts("reward", i)).remote(reward_dir, cfg.reward, dtype)
                        for i in range(ppo.reward.num_actors)]
        self.references = [Reference.options(**opts("reference", i)).remote(policy_dir, dtype, ppo.temperature)
                           for i in range(ppo.reference.num_actors)]
        self.learners = LearnerGroup(policy_dir, ppo, dtype, self.pgs["learner"], name=f"tlcr-ppo-learner-a{attempt}",
                                     runtime_env=runtime_env)
        get_all(self.learners.ready)
        self.sync_method = weight_sync_method(ppo.rollout_backend, ppo.learner.num_gpus > 0)
        self.weight_update_info = self.connect_nccl_sync(ppo) if self.sync_method == "nccl" else None

    def connect_nccl_sync(self, ppo) -> dict:
        """One NCCL group: learner rank 0 is rank 0, rollout i's TP workers follow it. Returns the
        (fixed) names/dtypes/shapes every broadcast round sends."""
        tp = ppo.vllm_tensor_parallel
        world_size = 1 + len(self.rollouts) * tp
        address = self.learners.node_ips[0]
        port = ray.get(self.learners.workers[0].free_port.remote())
        info = get_all(self.learners.call("weight_update_info"))[0]
        # Both sides block inside the group's init until all have joined: issue them together.
        get_all([r.init_weight_sync.remote(address, port, 1 + i * tp, world_size) for i, r in enumerate(self.rollouts)]
                + self.learners.call("init_weight_sender", address, port, world_size))
        return info

    def actors(self) -> dict[str, list]:
        return {"rollout": self.rollouts, "reward": self.scorers, "reference": self.references,
                "learner": self.learners.workers}

    def shutdown(self) -> None:
        for group in self.actors().values():
            for actor in group:
                ray.kill(actor, no_restart=True)
        for pg in self.pgs.values():
            remove_placement_group(pg)


def get_all(refs: list) -> list:
    """ray.get that raises as soon as ANY ref fails: a dead rank must not wait behind a peer that is
    blocked in a collective with it."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


def _split(n: int, parts: int) -> list[range]:
    return [r for r in (range(c[0], c[-1] + 1) for c in np.array_split(np.arange(n), parts) if len(c))]


def _merge(batches: list[RolloutBatch]) -> RolloutBatch:
    return RolloutBatch(*(sum((getattr(b, f) for b in batches), []) for f in
                          ("prompt_ids", "response_ids", "logprobs", "finish_reasons")))


class Trainer:
    """One attempt of the loop over live actor groups; raises on a lost actor (the caller recovers)."""

    def __init__(self, cfg: Config, groups: ActorGroups, prompts: list[list[int]], pad_id: int,
                 ckpts: CheckpointDir, metrics: MetricsLog, run_dir: Path):
        self.cfg, self.ppo, self.groups, self.prompts, self.pad_id = cfg, cfg.ppo, groups, prompts, pad_id
        self.ckpts, self.metrics, self.run_dir = ckpts, metrics, run_dir
        self.synced = False

    def next_prompts(self, state: dict) -> list[list[int]]:
        """Prompts for a step from a seeded per-epoch permutation; the cursor lives in the checkpoint."""
        chosen = []
        while len(chosen) < self.ppo.prompts_per_step:
            order = np.random.default_rng([self.ppo.seed, state["epoch"]]).permutation(len(self.prompts))
            take = order[state["cursor"]:state["cursor"] + self.ppo.prompts_per_step - len(chosen)]
            chosen += [self.prompts[i] for i in take]
            state["cursor"] += len(take)
            if state["cursor"] >= len(self.prompts):
                state["epoch"], state["cursor"] = state["epoch"] + 1, 0
        return chosen

    def step(self, state: dict) -> dict:
        ppo, g = self.ppo, self.groups
        t_start = time.perf_counter()
        prompt_ids = self.next_prompts(state)
        seed = int(state["rng"].integers(2**31))
        chunks = _split(len(prompt_ids), len(g.rollouts))
        gen = get_all([r.generate.remote([prompt_ids[i] for i in rows], self.cfg.model.max_response_len,
                                         ppo.temperature, ppo.top_p, seed + k)
                       for k, (r, rows) in enumerate(zip(g.rollouts, chunks))])
        batch = _merge([b for b, _ in gen])
        t_generated = time.perf_counter()
        batch_ref = ray.put(batch)
        score_refs = [s.score.remote(batch_ref, self.pad_id, rows)
                      for s, rows in zip(g.scorers, _split(len(prompt_ids), len(g.scorers)))]
        full_kl = ppo.kl_estimator == "full"
        ref_refs = [r.logprobs.remote(batch_ref, self.pad_id, rows, full_kl)
                    for r, rows in zip(g.references, _split(len(prompt_ids), len(g.references)))]
        eval_refs = g.learners.call("evaluate", batch_ref, self.pad_id)
        done = get_all(score_refs + ref_refs + eval_refs)
        scores, refs = done[:len(score_refs)], done[len(score_refs):len(score_refs) + len(ref_refs)]
        evals = done[len(score_refs) + len(ref_refs):]
        t_scored = time.perf_counter()
        cat = lambda parts, key: torch.cat([p[key] for p in parts])  # noqa: E731
        rewards = cat(scores, "rewards")
        mask = torch.zeros_like(rewards)
        for i, resp in enumerate(batch.response_ids):
            mask[i, :len(resp)] = 1.0
        old_logprobs, ref_logprobs, values = cat(evals, "logprobs"), cat(refs, "logprobs"), cat(evals, "values")
        adv = advantages_from_rollout(rewards, old_logprobs, ref_logprobs, values, mask,
                                      kl_coef=ppo.kl_coef, gamma=ppo.gamma, lam=ppo.lam,
                                      kl_estimator=ppo.kl_estimator, whiten=ppo.whiten_advantages,
                                      logits=cat(evals, "logits") if full_kl else None,
                                      ref_logits=cat(refs, "logits") if full_kl else None,
                                      temperature=ppo.temperature)
        entropy = cat(evals, "entropy")
        eval_seconds, ref_seconds = max(e["seconds"] for e in evals), max(r["seconds"] for r in refs)
        del done, evals, refs  # drops a full-KL step's [batch, R, vocab] logits before the update
        t_adv = time.perf_counter()
        train = get_all(g.learners.call("train", batch_ref, self.pad_id, ray.put(adv["advantages"]),
                                        ray.put(adv["returns"]), ray.put(old_logprobs), ray.put(values)))
        t_trained = time.perf_counter()
        # Checked on this attempt's first sync (fresh or recreated engines), then every Nth step.
        check = ppo.sync_check and (not self.synced or (state["step"] + 1) % ppo.sync_check_every == 0)
        sync = self.sync_weights(batch, check)
        self.synced = True
        t_end = time.perf_counter()

        n_tokens = mask.sum().item()
        row = {
            "reward_token_mean": masked_mean(rewards, mask).item(),
            "reward_seq_sum": rewards.sum(1).mean().item(),
            "kl": masked_mean(adv["kl"], mask).item(),
            "kl_seq_sum": adv["kl"].sum(1).mean().item(),
            "kl_k1": masked_mean(old_logprobs - ref_logprobs, mask).item(),  # sampled estimate, whatever kl_estimator
            "response_len": mask.sum(1).mean().item(),
            "perplexity": float(torch.exp(-masked_mean(old_logprobs, mask))),
            "entropy": masked_mean(entropy, mask).item(),
            "value_mean": masked_mean(values, mask).item(),
            "stop_frac": float(np.mean([f == "stop" for f in batch.finish_reasons])),
            **{k: float(np.mean([t[k] for t in train])) for k in train[0] if k != "seconds"},
            "time_generate": max(s for _, s in gen),
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
        return row

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
            sends = g.learners.call("send_weights")  # collective under ZeRO-3
            loads = [r.receive_weights.remote(g.weight_update_info) for r in g.rollouts]
            compute = max(get_all(loads + sends)[:len(loads)])
        else:
            state_refs = g.learners.call("full_state_dict")  # collective under ZeRO-3
            loads = [r.load_state_dict.remote(state_refs[0]) for r in g.rollouts]
            compute = max(get_all(loads + state_refs[1:])[:len(loads)])
        out = {"seconds": time.perf_counter() - start, "time_sync_load": compute}
        if check:
            learner_lp = np.array(get_all(g.learners.call("score", *probe, self.pad_id))[0][0])
            rollout_before, rollout_after = (np.array(lp[0]) for lp in get_all([before, g.rollouts[0].score.remote(*probe)]))
            out["sync_logprob_err"] = float(np.max(np.abs(learner_lp - rollout_after)))
            out["sync_logprob_change"] = float(np.max(np.abs(rollout_after - rollout_before)))
        return out

    def checkpoint(self, state: dict) -> Path:
        with self.ckpts.writing(state["step"]) as tmp:
            get_all(self.groups.learners.call("save_checkpoint", str(tmp)))
            write_json_atomic(tmp / "controller.json", {
                "step": state["step"], "epoch": state["epoch"], "cursor": state["cursor"],
                "rng": state["rng"].bit_generator.state, "mode": self.cfg.reward.mode})
        return self.ckpts.latest()

    def run(self, state: dict) -> None:
        with tqdm(total=self.ppo.steps, initial=state["step"], desc=f"ppo-{self.cfg.reward.mode}",
                  unit="step", dynamic_ncols=True) as bar:
            while state["step"] < self.ppo.steps:
                row = self.step(state)
                state["step"] += 1
                # Metrics first: a crash before the checkpoint completes rolls both back together.
                self.metrics.write(state["step"], row)
                if state["step"] % self.ppo.checkpoint_every == 0 or state["step"] == self.ppo.steps:
                    self.checkpoint(state)
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_token_mean']:.3f}", kl=f"{row['kl']:.3f}",
                                s=f"{row['time_step']:.1f}")


def _resolve_paths(cfg: Config) -> tuple[str, str]:
    from tlcr_ray.models import resolve_model

    mode = cfg.reward.mode
    if mode not in MODES:
        raise ConfigError(f"reward.mode {mode!r}: expected one of {', '.join(MODES)}")
    policy = cfg.ppo.policy or str(cfg.stage_dir("sft") / "model")
    if mode == "sequence":
        reward, key = cfg.reward.reward_model or str(cfg.stage_dir("rm") / "model"), "reward.reward_model"
    else:
        reward, key = cfg.reward.discriminator or str(cfg.stage_dir("disc") / "model"), "reward.discriminator"
    policy = resolve_model(policy)
    for path, name in ((policy, "ppo.policy"), (reward, key)):
        if not Path(path).exists():
            raise ConfigError(f"{name}: {path} does not exist (run the earlier stage or set {name})")
    return policy, reward


def _initial_state(cfg: Config, ckpt: Path | None) -> dict:
    rng = np.random.default_rng(cfg.ppo.seed)
    if ckpt is None:
        return {"step": 0, "epoch": 0, "cursor": 0, "rng": rng}
    saved = read_json(ckpt / "controller.json")
    rng.bit_generator.state = saved["rng"]
    return {"step": saved["step"], "epoch": saved["epoch"], "cursor": saved["cursor"], "rng": rng}


def run(cfg: Config, args=None) -> dict:
    from tlcr_ray.data import load_split
    from tlcr_ray.models import load_tokenizer

    policy_dir, reward_dir = _resolve_paths(cfg)
    run_dir = cfg.stage_dir(f"ppo-{cfg.reward.mode}")
    ckpts = CheckpointDir(run_dir / "checkpoints", keep=cfg.ppo.keep_checkpoints)
    if cfg.ppo.resume == "never":
        shutil.rmtree(ckpts.root, ignore_errors=True)
    elif cfg.ppo.resume != "auto":
        raise ConfigError(f"ppo.resume {cfg.ppo.resume!r}: expected auto or never")
    if cfg.ppo.kl_estimator not in KL_ESTIMATORS:
        raise ConfigError(f"ppo.kl_estimator {cfg.ppo.kl_estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")
    if cfg.ppo.sync_check_every < 1:
        raise ConfigError(f"ppo.sync_check_every: must be >= 1, got {cfg.ppo.sync_check_every}")
    tokenizer = load_tokenizer(cfg.model.tokenizer or policy_dir)
    pairs, _ = load_split(cfg.data, "rl")
    prompts = encode_prompts(tokenizer, [p.prompt for p in pairs], cfg.model.max_prompt_len)
    if not prompts:
        raise ConfigError(f"data.path {cfg.data.path}: the rl partition has no prompts")
    if not ray.is_initialized():
        if "RAY_ADDRESS" in os.environ:  # a Ray job: join the cluster that runs it
            ray.init()
        else:  # a fresh local Ray on loopback (never someone else's `ray start` on this machine)
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
    failures, started = 0, time.perf_counter()
    while True:
        ckpt = ckpts.latest()
        state = _initial_state(cfg, ckpt)
        metrics = MetricsLog(run_dir, resume_step=state["step"])
        groups = None
        try:
            groups = ActorGroups(cfg, policy_dir, str(ckpt / "hf") if ckpt else policy_dir, reward_dir, failures)
            if ckpt is not None:
                get_all(groups.learners.call("load_checkpoint", str(ckpt)))
            trainer = Trainer(cfg, groups, prompts, tokenizer.pad_token_id, ckpts, metrics, run_dir)
            trainer.run(state)
            final = run_dir / "model"
            tmp = run_dir / f".model.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            get_all(groups.learners.call("export_hf", str(tmp)))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
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
            "run_dir": str(run_dir), "model": str(run_dir / "model"), "wall_s": round(time.perf_counter() - started, 1),
            "final": {k: last.get(k) for k in ("reward_token_mean", "kl", "response_len", "time_step")}}
