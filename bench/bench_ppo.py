"""PPO benchmarks: step-time breakdown / orchestration share, and samples/s against TRL's PPO.

    python bench/bench_ppo.py                     # both parts
    python bench/bench_ppo.py --part breakdown --config configs/demo.yaml --steps 4
    python bench/bench_ppo.py --part trl --steps 3 [--model embedded|tiny|PATH] [--rollout-backend hf|vllm]

breakdown: runs `tlcr ppo` (Ray actors) on the config; per step (the first, which includes actor
start-up, is excluded) compute = generate + max(score, reference, learner eval) + train + weight
load, each timed inside its actor; orchestration share = 1 - compute / wall step time. When the
config's SFT or discriminator folders do not exist yet, the initial policy is the config's base
model and the discriminator a fresh head on it (timings do not depend on the weights).

trl: the same model (`--model`: default the embedded SmolLM2-135M as a saved HF folder; `tiny`: the
2-layer random Llama), batch 8, prompts <= 64 and 64 response tokens, CPU, in one process run: our
Ray PPO (`--rollout-backend hf|vllm`, 1 learner) vs trl==1.12.0 `PPOTrainer` (`pip install .[bench]`,
or `pip install --no-deps --target DIR trl==1.12.0 datasets multiprocess xxhash` and DIR on
PYTHONPATH); the figure is our samples/s divided by TRL's, both measured on steps after the first,
with each system's seconds per stage (TRL's timed by wrapping its generate / forward / get_reward).
Same work per step: sampling at temperature 1 without top-p/top-k (TRL hard-codes top_k=0, top_p=1.0), 1 PPO
epoch of 1 minibatch, policy + value updates, reference and reward forwards, KL-shaped rewards, GAE.
Ours also recomputes the old log-probs with the learner (TRL reads them off generation; `--old-logprobs
rollout` does the same; `--fuse-evaluation auto`, the default, takes them from the update's own forward)
and syncs the weights into the rollout actor. Our actors' OpenMP wait policies are `actors.groups.wait_policy`'s
(recorded in the row), their malloc TLCR_MALLOC's (`tlcr_ray.local_ray.worker_malloc_env`); TRL runs in a
fresh process per pair of `--trl-wait-policies` (default: OpenMP's own) and `--trl-malloc` (default: glibc's
own; `retain`: the settings TLCR_MALLOC=retain gives our workers) values, and the figure divides by the fastest.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import record  # noqa: E402
from tlcr_ray.layout import RunLayout  # noqa: E402


def _ensure_models(cfg, work: Path) -> None:
    from tlcr_ray.models import TokenDiscriminator, load_tokenizer, resolve_model, save_head_model

    try:
        policy = resolve_model(RunLayout.of(cfg).initial_policy)
    except FileNotFoundError:  # no SFT run yet: start from the base model
        policy = resolve_model(cfg.model.base)
    cfg.ppo.policy = policy
    disc = str(RunLayout.of(cfg).discriminator)
    if not Path(disc).exists():
        disc = save_head_model(TokenDiscriminator.from_pretrained(policy, seed=0), work / "disc", load_tokenizer(policy))
    cfg.reward.discriminator = str(disc)


def run_ours(cfg) -> list[dict]:
    from actors.controller import run

    run(cfg)
    rows = [json.loads(x) for x in RunLayout.of(cfg).ppo(cfg.reward.mode).metrics.read_text().splitlines()]
    return rows[1:]  # step 1 includes actor start-up


def breakdown(config: str, steps: int, work: Path) -> None:
    from tlcr_ray.config import load_config

    cfg = load_config(config, [f"output_dir={work / 'run'}", f"ppo.steps={steps + 1}", "ppo.resume=never",
                               f"ppo.checkpoint_every={steps + 10}"])
    _ensure_models(cfg, work)
    rows = run_ours(cfg)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    compute = {"generate": mean("time_generate"),
               "score||reference||eval": sum(max(r["time_score"], r["time_reference"], r["time_learner_eval"])
                                            for r in rows) / len(rows),
               "train": mean("time_train"), "weight_load": mean("time_sync_load")}
    step = mean("time_step")
    share = 1 - sum(compute.values()) / step
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in compute.items())
    print(f"step {step:.2f}s: {parts}; score {mean('time_score'):.2f}s reference {mean('time_reference'):.2f}s "
          f"learner eval {mean('time_learner_eval'):.2f}s; sync stage {mean('time_sync'):.2f}s")
    record("ppo", "orchestration share of step wall time", f"{share:.1%}", "<= 10%",
           f"{config}, {len(rows)} steps after warm-up, step {step:.2f}s ({parts})")


def trl_samples_per_s(model_dir: str, prompts: list[list[int]], response_len: int, steps: int) -> dict:
    """TRL's PPOTrainer on `model_dir` -> samples/s over the steps after the first, and its per-stage
    seconds per step: generate (`batch_generation`), score (the no-grad reference forward and the value
    and reward forwards), train (the rest: GAE, the PPO minibatch forward/backward/step, TRL's gc)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from tlcr_ray.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    batch = len(prompts)
    stamps: list[float] = []
    spent = {"generate": 0.0, "score": 0.0}
    per_step: list[dict[str, float]] = []

    def timed(fn, stage_of):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if (stage := stage_of()) is not None:
                    spent[stage] += time.perf_counter() - began
        return wrapper

    import torch

    no_grad_score = lambda: None if torch.is_grad_enabled() else "score"  # noqa: E731  (train forwards have grad)
    trl_ppo.batch_generation = timed(trl_ppo.batch_generation, lambda: "generate")
    trl_ppo.forward = timed(trl_ppo.forward, no_grad_score)
    trl_ppo.get_reward = timed(trl_ppo.get_reward, no_grad_score)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())
            per_step.append(dict(spent))
            spent.update(generate=0.0, score=0.0)

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, use_cpu=True, per_device_train_batch_size=batch, num_mini_batches=1,
                         gradient_accumulation_steps=1, num_ppo_epochs=1, total_episodes=batch * (steps + 1),
                         response_length=response_len, temperature=1.0, learning_rate=1e-6, report_to=[],
                         save_strategy="no", logging_steps=10**6, kl_coef=0.1, seed=0, num_sample_generations=0)
        trainer = PPOTrainer(
            args=args, processing_class=tokenizer,
            model=AutoModelForCausalLM.from_pretrained(model_dir),
            ref_model=AutoModelForCausalLM.from_pretrained(model_dir),
            reward_model=AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1),
            value_model=AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1),
            train_dataset=Dataset.from_dict({"input_ids": prompts * (steps + 1)}), callbacks=[Clock()])
        began = time.perf_counter()
        trainer.train()
    if len(stamps) < 2:
        raise RuntimeError(f"TRL ran {len(stamps)} steps; need at least 2 to time one after warm-up")
    step_s = [b - a for a, b in zip([began] + stamps, stamps)][1:]  # the first step includes warm-up
    timed_steps = per_step[1:]
    stages = {k: sum(s[k] for s in timed_steps) / len(timed_steps) for k in ("generate", "score")}
    stages["train"] = sum(step_s) / len(step_s) - stages["generate"] - stages["score"]
    return {"samples_per_s": batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]), "stages": stages}


def trl_in_fresh_process(env: dict[str, str], *args) -> dict:
    """`trl_samples_per_s(*args)` in a spawned process started with `env` added to this environment: OpenMP
    reads OMP_WAIT_POLICY and glibc its MALLOC_* settings once, at process start-up."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    saved = {name: os.environ.pop(name, None) for name in env}
    os.environ.update(env)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(trl_samples_per_s, *args).result()
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def trl_env(wait_policy: str, malloc: str) -> dict[str, str]:
    """The environment of one TRL run: OMP_WAIT_POLICY (`default`: OpenMP's own, spin a while then sleep)
    and glibc malloc (`default`: glibc's own; `retain`: the heap settings TLCR_MALLOC=retain gives our workers)."""
    from tlcr_ray.local_ray import RETAIN_HEAP_ENV

    return {**({} if wait_policy == "default" else {"OMP_WAIT_POLICY": wait_policy}),
            **(RETAIN_HEAP_ENV if malloc == "retain" else {})}


def versus_trl(steps: int, work: Path, model: str, rollout_backend: str, wait_policies: list[str], mallocs: list[str],
               zero_stage: int | None = None, rollout_dtype: str = "auto", scorer_threads: int = 0,
               old_logprobs: str = "learner", critic: str = "separate", fuse_evaluation: str = "auto", batch: int = 8,
               response_len: int = 64) -> None:
    from actors.groups import wait_policy
    from tlcr_ray.config import load_config, rollout_dtype as rollout_dtype_of
    from tlcr_ray.data.pairs import load_split
    from tlcr_ray.data.tokens import encode_prompts
    from tlcr_ray.local_ray import worker_malloc_env
    from tlcr_ray.models import embedded_model_dir, embedded_tokenizer_dir, load_tokenizer
    from tlcr_ray.testing.tiny_model import build_tiny_llama

    if model == "tiny":
        model_dir, model_name = str(build_tiny_llama(work / "tiny", embedded_tokenizer_dir(), seed=0)), \
            "tiny Llama (hidden 64, 2 layers)"
    elif model == "embedded":
        model_dir, model_name = str(embedded_model_dir()), "SmolLM2-135M (embedded, fp32)"
    else:
        model_dir, model_name = model, model
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={work / 'vs-trl'}", f"ppo.policy={model_dir}", f"ppo.steps={steps + 1}",
        f"ppo.prompts_per_step={batch}", f"ppo.mini_batch_size={batch}", f"model.max_response_len={response_len}",
        "model.max_prompt_len=64", f"ppo.rollout_backend={rollout_backend}",
        *(["ppo.vllm_kv_cache_gib=0.5"] if rollout_backend == "vllm" else []),  # a fixed, small KV cache on CPU
        *([f"ppo.zero_stage={zero_stage}"] if zero_stage is not None else []), f"ppo.rollout_dtype={rollout_dtype}",
        "ppo.top_p=1.0", "ppo.temperature=1.0", "ppo.ppo_epochs=1",  # TRL's sampling and epochs below
        "ppo.learner.num_actors=1", "ppo.learner.num_cpus=1", "ppo.resume=never", f"ppo.checkpoint_every={steps + 10}",
        f"ppo.threads_per_actor={os.cpu_count()}",  # stages run one at a time; TRL's one process uses every core too
        f"ppo.reward.threads={scorer_threads}", f"ppo.reference.threads={scorer_threads}",
        f"ppo.old_logprobs={old_logprobs}", f"ppo.critic={critic}", f"ppo.fuse_evaluation={fuse_evaluation}",
        "data.max_pairs=64"])
    _ensure_models(cfg, work)
    load = [os.getloadavg()[0]]
    ours_rows = run_ours(cfg)
    ours = batch / (sum(r["time_step"] for r in ours_rows) / len(ours_rows))
    pairs, _ = load_split(cfg.data, "rl")
    prompts = encode_prompts(load_tokenizer(model_dir), [p.prompt for p in pairs[:batch]], cfg.model.max_prompt_len)
    load.append(os.getloadavg()[0])
    trl = {f"{policy} / malloc {malloc}": trl_in_fresh_process(trl_env(policy, malloc), model_dir, prompts,
                                                                 response_len, steps)
           for policy in wait_policies for malloc in mallocs}
    best = max(trl, key=lambda k: trl[k]["samples_per_s"])
    theirs = trl[best]["samples_per_s"]
    load.append(os.getloadavg()[0])
    stages = {k: sum(r[f"time_stage_{k}"] for r in ours_rows) / len(ours_rows)
              for k in ("generate", "score", "train", "sync")}
    inner = {k: sum(r[f"time_{k}"] for r in ours_rows) / len(ours_rows)
             for k in ("generate", "score", "reference", "learner_eval", "train", "sync_load")}
    print("ours per stage (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    print("ours inside the actors (s): " + ", ".join(f"{k} {v:.2f}" for k, v in inner.items()))
    print("TRL per stage (s): " + ", ".join(f"{k} {v:.2f}" for k, v in trl[best]["stages"].items()))
    record("ppo", "samples/s vs TRL PPOTrainer (trl 1.12.0)", f"{ours / theirs:.2f}x", ">= 1.2x",
           f"{model_name}, {rollout_backend} rollout, batch {batch}, response {response_len} tokens, prompts <= "
           f"{cfg.model.max_prompt_len}, T=1 no top-p, 1 epoch x 1 minibatch, {steps} timed steps each; ours "
           f"{ours:.3f} samples/s (Ray: {rollout_backend} rollout + reward + reference + 1 DeepSpeed learner, ZeRO "
           f"{cfg.ppo.zero_stage}, rollout dtype {rollout_dtype_of(cfg)}, old log-probs from the {old_logprobs}, {critic} critic, fuse_evaluation {fuse_evaluation}, "
           f"{cfg.ppo.threads_per_actor} threads each"
           f"{f' (reward, reference {scorer_threads})' if scorer_threads else ''}; per step "
           + " + ".join(f"{k} {v:.2f}s" for k, v in stages.items())
           + "; inside the actors " + ", ".join(f"{k} {v:.2f}s" for k, v in inner.items())
           + f"; sync check every {cfg.ppo.sync_check_every} steps; workers' malloc "
           + (" ".join(f"{k}={v}" for k, v in worker_malloc_env().items()) or "glibc default")
           + "; OMP_WAIT_POLICY "
           + ", ".join(f"{g} {wait_policy(cfg.ppo, g).get('OMP_WAIT_POLICY', 'default')}"
                       for g in ("rollout", "reward", "reference", "learner"))
           + f"), TRL {theirs:.3f} "
           "samples/s (use_cpu, one process; per step "
           + " + ".join(f"{k} {v:.2f}s" for k, v in trl[best]["stages"].items())
           + f"; fastest of OMP_WAIT_POLICY / malloc: {best}; "
           + ", ".join(f"{k} {v['samples_per_s']:.3f}" for k, v in trl.items())
           + "); 1-min load avg " + "/".join(f"{x:.1f}" for x in load) + " (shared machine: run one after the other)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["breakdown", "trl", "all"], default="all")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (one warm-up step is added)")
    parser.add_argument("--model", default="embedded",
                        help="trl part: an HF causal-LM folder, `embedded` (SmolLM2-135M, default) or `tiny`")
    parser.add_argument("--rollout-backend", choices=["hf", "vllm"], default="hf", help="trl part: our rollout")
    parser.add_argument("--trl-wait-policies", nargs="+", default=["default"], choices=["default", "PASSIVE"],
                        help="trl part: OMP_WAIT_POLICY values TRL runs under (the fastest run counts)")
    parser.add_argument("--trl-malloc", nargs="+", default=["default"], choices=["default", "retain"],
                        help="trl part: glibc malloc settings TRL runs under (retain: TLCR_MALLOC=retain's; "
                             "every wait policy x malloc pair is one fresh process, the fastest counts)")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0,
                        help="trl part: our learner's ppo.zero_stage (default 0: one learner rank partitions "
                             "nothing, as in configs/demo.yaml)")
    parser.add_argument("--scorer-threads", type=int, default=0,
                        help="trl part: ppo.reward.threads and ppo.reference.threads (0: every actor gets all cores)")
    parser.add_argument("--critic", choices=["separate", "shared"], default="separate",
                        help="trl part: ppo.critic (shared: a value head on the policy, one forward/backward)")
    parser.add_argument("--old-logprobs", choices=["learner", "rollout"], default="learner",
                        help="trl part: ppo.old_logprobs (rollout: the HF engine's sampling log-probs, as TRL reads them)")
    parser.add_argument("--fuse-evaluation", choices=["auto", "off"], default="auto",
                        help="trl part: ppo.fuse_evaluation (auto: the one-pass update's forward gives the old "
                             "log-probs and values; off: the learner evaluates first)")
    parser.add_argument("--rollout-dtype", default="auto",
                        help="trl part: our ppo.rollout_dtype (auto: model.dtype, fp32; bfloat16: the engines "
                             "sample from the bf16-rounded policy, the learner stays fp32)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # A loaded machine starts Ray's dashboard agent slowly; the raylet's default wait for it is too short.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        if args.part in ("breakdown", "all"):
            breakdown(args.config, args.steps, Path(tmp))
        if args.part in ("trl", "all"):
            versus_trl(args.steps, Path(tmp), args.model, args.rollout_backend, args.trl_wait_policies,
                       args.trl_malloc, args.zero_stage, args.rollout_dtype, args.scorer_threads, args.old_logprobs, args.critic,
                       args.fuse_evaluation)


if __name__ == "__main__":
    main()
