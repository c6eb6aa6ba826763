"""GPU checks of the Ray-free library paths: PPO math, DeepSpeed learner and trainer step, HF rollout.

Needs CUDA, torch, transformers and DeepSpeed (no Ray, no vLLM). On the lent device machine, with
the DeepSpeed wheel and its missing pure-Python deps carried in `.gpu_carry/` (see docs/gpu.md):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/*.whl .gpu_carry/whl/*.whl
    PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py --tokenizer .gpu_carry/tokenizer

Checks (each prints PASS/FAIL with its numbers; the exit status is 1 if any failed):
  math        tlcr_ray.rl.ppo_math / tlcr_ray.rl.rewards give the CPU's float32 results on CUDA
  learner     PPOLearner (actor + critic, ZeRO-2, nccl, world size 1): its log-probs match a plain
              forward, a few updates raise the log-probs of positive-advantage tokens and pull values
              to the returns, and its weights load into an HFRollout that then scores the same
  train       tlcr_ray.training's SFT / disc / RM step under DeepSpeed ZeRO-2: the loss falls on a fixed batch
  rollout     HFRollout sampling log-probs == teacher-forced log-probs of the same tokens (<= 1e-3, fp32)
  speed       HFRollout tokens/s at batch 1, 8, 32 (135M-shaped model) and vs bare model.generate at
              batch 32: figures only, recorded in BENCHMARKS.md with the learner and SFT throughputs
Models are random-init Llamas (tiny, and SmolLM2-135M's shape); the real weights are too big to carry.
`--dry-run` runs the tiny cases on CPU (gloo) to debug the script itself; it records nothing.
"""
from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import record  # noqa: E402
from tlcr_ray.rl import ppo_math as ppo  # noqa: E402
from tlcr_ray.rl import rewards  # noqa: E402
from tlcr_ray.rl.batch import RolloutBatch, pack, policy_logprobs  # noqa: E402
from tlcr_ray.rl.rollout.hf import HFRollout  # noqa: E402

# SmolLM2-135M-Instruct's config.json (the architecture only; weights are random).
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True)
FIRST_ORDINARY_TOKEN = 100  # SmolLM2's special tokens sit below this id
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, numbers: str) -> None:
    RESULTS.append((name, bool(ok), numbers))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {numbers}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()  # a no-op without CUDA


# ---------------------------------------------------------------- models and data

def build_models(tokenizer_dir: str, root: Path, with_135m: bool) -> dict[str, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tlcr_ray.models import load_tokenizer
    from tlcr_ray.testing.tiny_model import build_tiny_llama

    models = {"tiny": str(build_tiny_llama(root / "tiny", tokenizer_dir, seed=0))}
    if with_135m:
        tokenizer = load_tokenizer(tokenizer_dir)
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SMOLLM2_135M)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.save_pretrained(root / "smollm2-135m-shape")
        tokenizer.save_pretrained(root / "smollm2-135m-shape")
        models["135m"] = str(root / "smollm2-135m-shape")
    return models


def random_ids(rng: random.Random, vocab: int, low: int, high: int) -> list[int]:
    return [rng.randrange(FIRST_ORDINARY_TOKEN, vocab) for _ in range(rng.randint(low, high))]


def random_rollout(vocab: int, batch: int, seed: int, prompt_len=(8, 32), response_len=(16, 64)) -> RolloutBatch:
    rng = random.Random(seed)
    prompts = [random_ids(rng, vocab, *prompt_len) for _ in range(batch)]
    responses = [random_ids(rng, vocab, *response_len) for _ in range(batch)]
    return RolloutBatch(prompts, responses, [], [])


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


# ---------------------------------------------------------------- (a) math on CUDA vs CPU

def check_math(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    B, R, V = 16, 64, 512
    lengths = torch.randint(1, R + 1, (B,), generator=g)
    mask = (torch.arange(R)[None] < lengths[:, None]).float()
    t = {k: torch.randn(B, R, generator=g) for k in ("logp", "old", "ref", "values", "old_values", "returns", "adv",
                                                      "rewards")}
    t["logits"], t["ref_logits"] = torch.randn(B, R, V, generator=g), torch.randn(B, R, V, generator=g)
    t["p"], t["scores"], t["mask"] = torch.rand(B, R, generator=g), 3 * torch.randn(B, generator=g), mask

    def run_all(x: dict) -> dict[str, torch.Tensor]:
        m = x["mask"]
        out = {"masked_mean": ppo.masked_mean(x["logp"], m), "masked_mean_dim": ppo.masked_mean(x["logp"], m, 1),
               "whiten": ppo.masked_whiten(x["adv"], m), "whiten_keep_mean": ppo.masked_whiten(x["adv"], m, False),
               "kl_k1": ppo.kl_penalty(x["logp"], x["ref"], "k1"), "kl_k3": ppo.kl_penalty(x["logp"], x["ref"], "k3"),
               "full_kl": ppo.full_kl(x["logits"], x["ref_logits"], 0.7),
               "shaped": ppo.shaped_rewards(x["rewards"], x["logp"] - x["ref"], m, 0.1),
               "entropy": ppo.entropy_from_logits(x["logits"])}
        out["gae_adv"], out["gae_ret"] = ppo.gae(x["rewards"], x["values"], m, 1.0, 0.95)
        out["gae_adv_g"], out["gae_ret_g"] = ppo.gae(x["rewards"], x["values"], m, 0.99, 0.9)
        out.update(zip(("pg_loss", "pg_clipfrac", "approx_kl"), ppo.policy_loss(x["logp"], x["old"], x["adv"], m, 0.2)))
        out.update(zip(("vf_loss", "vf_clipfrac"), ppo.value_loss(x["values"], x["old_values"], x["returns"], m, 0.2)))
        out.update({f"rollout_{k}": v for k, v in ppo.advantages_from_rollout(
            x["rewards"], x["logp"], x["ref"], x["values"], m, kl_coef=0.05, gamma=1.0, lam=0.95).items()})
        out.update({f"reward_{mode}": rewards.token_rewards(x["p"], mode) * m for mode in rewards.TOKEN_MODES})
        out["last_token_index"] = rewards.last_token_index(m)
        out["sequence_rewards"] = rewards.sequence_rewards(x["scores"], m)
        return out

    cpu = run_all(t)
    try:
        gpu = run_all({k: v.to(device) for k, v in t.items()})
    except Exception as error:  # noqa: BLE001 - the message is the finding
        check("math: every ppo/rewards function runs on CUDA", False, f"{type(error).__name__}: {error}")
        return
    on_device = all(v.device.type == device.type for v in gpu.values())
    worst = max(cpu, key=lambda k: max_abs_diff(cpu[k], gpu[k]))
    close = {k: torch.allclose(cpu[k].float(), gpu[k].float().cpu(), rtol=1e-5, atol=1e-5) for k in cpu}
    bad = [k for k, ok in close.items() if not ok]
    check("math: ppo + rewards CUDA == CPU (float32, rtol=atol=1e-5)", not bad and on_device,
          f"{len(cpu)} outputs, worst {worst} max|diff| {max_abs_diff(cpu[worst], gpu[worst]):.2e}; "
          f"outputs stay on {device.type}: {on_device}; mismatched: {bad or 'none'}")


# ---------------------------------------------------------------- (b) DeepSpeed learner and trainer step

def init_method(device: torch.device, root: Path) -> str:
    from tlcr_ray.rl.rendezvous import free_port, rendezvous_init_method

    on_gpu = device.type == "cuda"
    if not on_gpu:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return rendezvous_init_method(["127.0.0.1"], on_gpu, str(root / "rdzv"), free_port("127.0.0.1") if on_gpu else None)


def check_learner(label: str, model_dir: str, dtype: str, rdzv: str, device: torch.device, updates: int = 4,
                  batch_size: int = 16) -> float | None:
    """-> seconds per `train` call after the first (None if it failed)."""
    from tlcr_ray.config import PPOConfig
    from tlcr_ray.models import load_policy
    from tlcr_ray.rl.learner import PPOLearner

    name = f"learner {label} {dtype}"
    cfg = PPOConfig(mini_batch_size=8, zero_stage=2, actor_lr=1e-4, critic_lr=1e-4, seed=0)
    try:
        learner = PPOLearner(model_dir, cfg, rank=0, world_size=1, init_method=rdzv, dtype=dtype)
    except Exception as error:  # noqa: BLE001
        check(f"{name}: DeepSpeed engines start", False, f"{type(error).__name__}: {error}")
        return None
    tol = 1e-4 if dtype == "float32" else 2e-2
    engine_device = next(learner.actor.module.parameters()).device
    vocab = learner.actor.module.config.vocab_size
    pad_id = learner.actor.module.config.pad_token_id
    batch = random_rollout(vocab, batch_size, seed=1)
    packed = pack(batch.prompt_ids, batch.response_ids, pad_id)
    mask = packed.response_mask

    plain = load_policy(model_dir, dtype=dtype).to(device).eval()
    reference = policy_logprobs(plain, packed)
    first = learner.evaluate(batch, pad_id)
    diff = max_abs_diff(first["logprobs"], reference)
    check(f"{name}: evaluate log-probs == plain HF forward", diff <= tol and engine_device.type == device.type,
          f"max|diff| {diff:.2e} (tol {tol:g}); engine on {engine_device}, "
          f"zero stage {learner.actor.zero_optimization_stage()}, dist backend {torch.distributed.get_backend()}")

    advantages, returns = mask.clone(), mask.clone()  # every sampled token good; every value should be 1
    seconds, stats = [], []
    for _ in range(updates):
        old = learner.evaluate(batch, pad_id)
        sync(device)
        start = time.perf_counter()
        stats.append(learner.train(batch, pad_id, advantages, returns, old["logprobs"], old["values"]))
        sync(device)
        seconds.append(time.perf_counter() - start)
    last = learner.evaluate(batch, pad_id)
    finite = all(math.isfinite(v) for s in stats for v in s.values())
    lp_first, lp_last = (ppo.masked_mean(x["logprobs"], mask).item() for x in (first, last))
    gain = lp_last - lp_first
    vf_first = ppo.masked_mean((first["values"] - returns) ** 2, mask).item()
    vf_last = ppo.masked_mean((last["values"] - returns) ** 2, mask).item()
    check(f"{name}: {updates} PPO updates learn (ZeRO-2)", finite and gain > 0 and vf_last < 0.95 * vf_first,
          f"mean log-prob {lp_first:.4f} -> {lp_last:.4f} (gain {gain:+.4f}); "
          f"value MSE {vf_first:.4f} -> {vf_last:.4f}; stats finite: {finite}; "
          f"last approx_kl {stats[-1]['approx_kl']:.2e}, clip_frac {stats[-1]['clip_frac']:.3f}; "
          f"train s/call {', '.join(f'{s:.2f}' for s in seconds)}")

    # Object-store weight sync on CUDA: learner weights -> an HFRollout on the same device.
    engine = HFRollout(model_dir, dtype=dtype, device=str(device))
    some = slice(0, 4)
    flat = lambda rows: torch.tensor(sum(rows, []))  # noqa: E731
    before = flat(engine.score(batch.prompt_ids[some], batch.response_ids[some]))
    engine.load_state_dict(learner.full_state_dict())
    after = flat(engine.score(batch.prompt_ids[some], batch.response_ids[some]))
    theirs = flat(learner.score(batch.prompt_ids[some], batch.response_ids[some], pad_id))
    sync_diff, moved = max_abs_diff(after, theirs), max_abs_diff(before, theirs)
    # The updates must have moved the scores by more than the tolerance, or loading proves nothing.
    check(f"{name}: weights sync into HFRollout (object-store path)", sync_diff <= tol < moved,
          f"max|diff| after load {sync_diff:.2e} (tol {tol:g}); before load {moved:.2e} (must exceed {tol:g})")
    del learner, engine, plain
    free_memory()
    return sum(seconds[1:]) / max(1, len(seconds) - 1)


def supervised_examples(stage: str, vocab: int, n: int, length: int, seed: int) -> list[dict]:
    from tlcr_ray.training import IGNORE

    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = random_ids(rng, vocab, length // 2, length)
        half = len(ids) // 2
        if stage == "sft":
            out.append({"pair_id": str(i), "input_ids": ids, "labels": [IGNORE] * half + ids[half:]})
        elif stage == "disc":
            targets = [float(IGNORE)] * half + [rng.choice((0.0, 0.5, 1.0)) for _ in ids[half:]]
            out.append({"pair_id": str(i), "input_ids": ids, "targets": targets})
        else:
            out.append({"pair_id": str(i), "chosen_ids": ids, "rejected_ids": random_ids(rng, vocab, half, length)})
    return out


def check_train_step(stage: str, label: str, model_dir: str, precision: str, device: torch.device, steps: int = 8,
                     batch: int = 4, length: int = 48) -> float | None:
    """-> trained tokens/s over the steps after the first (None if it failed)."""
    import deepspeed

    from tlcr_ray import training as stages
    from tlcr_ray.config import TrainConfig
    from tlcr_ray.training.loop import build_model
    from tlcr_ray.models import load_tokenizer

    name = f"train {stage} {label} {precision}"
    cfg = TrainConfig(precision=precision, micro_batch_size=batch, lr=1e-4, lr_schedule="constant", zero_stage=2)
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    try:
        model = build_model(stage, model_dir, dtype, seed=0)
        optimizer = torch.optim.AdamW(stages.param_groups(model, cfg.weight_decay), lr=cfg.lr)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=stages.stage_deepspeed_config(cfg))
    except Exception as error:  # noqa: BLE001
        check(f"{name}: DeepSpeed engine starts", False, f"{type(error).__name__}: {error}")
        return None
    examples = supervised_examples(stage, engine.module.config.vocab_size, batch, length, seed=2)
    collated = stages.collate(stage, examples, load_tokenizer(model_dir).pad_token_id)
    losses, tokens, seconds = [], 0, 0.0
    engine.train()
    for step in range(steps):
        sync(device)
        start = time.perf_counter()
        on_device = {k: v.to(engine.device) for k, v in collated.items()}
        loss, _, _ = stages.compute_loss(stage, engine, on_device)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if step:
            seconds += time.perf_counter() - start
            tokens += int(on_device["attention_mask"].sum())
    finite = all(math.isfinite(x) for x in losses)
    check(f"{name}: loss falls on a fixed batch (ZeRO-2)",
          finite and losses[-1] < losses[0] and engine.device.type == device.type,
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps; engine on {engine.device}; "
          f"{tokens / max(seconds, 1e-9):,.0f} tokens/s")
    del engine, model, optimizer
    free_memory()
    return tokens / max(seconds, 1e-9)


# ---------------------------------------------------------------- (c) HF rollout

def check_rollout_logprobs(label: str, model_dir: str, device: torch.device, temperature: float) -> None:
    engine = HFRollout(model_dir, dtype="float32", device=str(device))
    vocab = engine.model.config.vocab_size
    prompts = random_rollout(vocab, 8, seed=3, prompt_len=(4, 40)).prompt_ids  # ragged: left padding exercised
    batch = engine.generate(prompts, max_new_tokens=48, temperature=temperature, top_p=0.9, seed=0)
    forced = policy_logprobs(engine.model, pack(batch.prompt_ids, batch.response_ids, engine.pad_id), temperature)
    sampled = torch.zeros_like(forced)
    for i, row in enumerate(batch.logprobs):
        sampled[i, :len(row)] = torch.tensor(row)
    n = sum(len(r) for r in batch.response_ids)
    diff = max_abs_diff(sampled, forced) if n else float("inf")
    check(f"rollout {label} fp32 T={temperature}: sampling log-probs == teacher-forced",
          n > 0 and diff <= 1e-3 and engine.model.device.type == device.type,
          f"max|diff| {diff:.2e} over {n} tokens (tol 1e-3); mean log-prob {forced.sum().item() / max(n, 1):.3f}")
    del engine
    free_memory()


def measure_tokens_per_s(model_dir: str, device: torch.device, dtype: str, batch: int, new_tokens: int = 128,
                         bare: bool = False) -> float:
    """Generated tokens / s of HFRollout.generate (bare: model.generate without the logits copy)."""
    free_memory()  # the previous measurement's engine
    engine = HFRollout(model_dir, dtype=dtype, device=str(device))
    prompts = random_rollout(engine.model.config.vocab_size, batch, seed=4, prompt_len=(16, 16)).prompt_ids

    def once() -> int:
        if not bare:
            out = engine.generate(prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=0.9, seed=0)
            return sum(len(r) for r in out.response_ids)
        ids = torch.tensor(prompts, device=device)
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.9,
                                    top_k=0, max_new_tokens=new_tokens, pad_token_id=engine.pad_id)
        return (out.shape[1] - ids.shape[1]) * batch

    once()  # warm-up: kernels, allocator
    sync(device)
    start = time.perf_counter()
    tokens = once()
    sync(device)
    return tokens / (time.perf_counter() - start)


# ---------------------------------------------------------------- main

def finish(env: str) -> int:
    """Close the process group, print the checks' tally (and each failure) -> the exit code."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed on {env}")
    for name in failed:
        print(f"FAILED: {name}")
    return 1 if failed else 0


def environment() -> str:
    import deepspeed
    import transformers

    gpu = f"{torch.cuda.get_device_name(0)}, " if torch.cuda.is_available() else ""
    return (f"{gpu}torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
            f"deepspeed {deepspeed.__version__}")


def device_and_tokenizer(args) -> torch.device | None:
    """The device a check runs on (None, after a FAIL line, when there is no CUDA and no --dry-run),
    with args.tokenizer defaulted to the embedded SmolLM2 tokenizer. Shared by the GPU check scripts."""
    if not torch.cuda.is_available() and not args.dry_run:
        print("FAIL  no CUDA device (use --dry-run to exercise the script on CPU)")
        return None
    if args.tokenizer is None:
        from tlcr_ray.models import embedded_tokenizer_dir

        args.tokenizer = str(embedded_tokenizer_dir())
    return torch.device("cpu" if args.dry_run else "cuda")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="SmolLM2 tokenizer folder (default: the embedded one)")
    parser.add_argument("--dry-run", action="store_true", help="tiny cases on CPU; records nothing")
    parser.add_argument("--skip", default="", help="comma-separated: math,learner,train,rollout,speed")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = device_and_tokenizer(args)
    if device is None:
        return 1
    hf_logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    env = environment()
    print(f"device: {env}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="tlcr-gpu-check-"))
    models = build_models(args.tokenizer, root, with_135m=not args.dry_run)
    precisions = ["float32"] if args.dry_run else ["float32", "bfloat16"]

    if "math" not in skip:
        check_math(device)
    if "learner" not in skip:
        rdzv = init_method(device, root)
        for label, model_dir in models.items():
            for dtype in precisions:
                per_call = check_learner(label, model_dir, dtype, rdzv, device)
                if per_call and label == "135m" and not args.dry_run:
                    record("gpu_check", f"PPO learner update samples/s, 135M-shaped {dtype}", f"{16 / per_call:.1f}",
                           details=f"{env}; actor+critic ZeRO-2 world 1, batch 16 (2 minibatches of 8), "
                                   "prompts 8-32 + responses 16-64 tokens, random init")
    if "train" not in skip:
        for stage in ("sft", "disc", "rm"):
            for precision in (["fp32"] if args.dry_run else ["fp32", "bf16", "fp16"]):
                check_train_step(stage, "tiny", models["tiny"], precision, device)
        if "135m" in models:
            rate = check_train_step("sft", "135m", models["135m"], "bf16", device, steps=6, batch=8, length=512)
            if rate:
                record("gpu_check", "SFT train step tokens/s, 135M-shaped bf16", f"{rate:,.0f}",
                       details=f"{env}; ZeRO-2 world 1, micro-batch 8 x 256-512 tokens, torch AdamW, random init")
    if "rollout" not in skip:
        for label, model_dir in models.items():
            for temperature in (1.0, 0.7):
                check_rollout_logprobs(label, model_dir, device, temperature)
    if "speed" not in skip and "135m" in models:
        for dtype in ("float32", "bfloat16"):
            for batch in (1, 8, 32):
                rate = measure_tokens_per_s(models["135m"], device, dtype, batch)
                record("gpu_check", f"HFRollout tokens/s, 135M-shaped {dtype}, batch {batch}", f"{rate:,.0f}",
                       details=f"{env}; 16-token prompts, 128 new tokens, top-p 0.9, random init")
            bare = measure_tokens_per_s(models["135m"], device, dtype, 32, bare=True)
            record("gpu_check", f"HFRollout / bare model.generate tokens/s, 135M-shaped {dtype}, batch 32",
                   f"{rate / bare:.2f}x", details=f"{env}; bare {bare:,.0f} tok/s: no per-step logits kept or copied")

    return finish(env)


if __name__ == "__main__":
    sys.exit(main())
