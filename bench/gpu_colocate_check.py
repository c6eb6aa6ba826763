"""GPU check of a colocated PPO step's hand-overs (ppo.colocate all), without Ray or vLLM.

    PYTHONPATH=/tmp/site:. python3 bench/gpu_colocate_check.py --tokenizer .gpu_carry/tokenizer
    python bench/gpu_colocate_check.py --dry-run      # the tiny model on CPU: every hook is a no-op there

Checks (PASS/FAIL with numbers; exit 1 if any failed), for ZeRO-2 and ZeRO-3 (world 1, bf16):
  offload    `tlcr_ray.rl.colocate.offload_learner` frees the optimizer states of a trained PPOLearner
             (GPU bytes before / after, seconds), the 16-bit weights stay (evaluate is unchanged while
             offloaded), `reload_learner` brings them back, and the next update equals that of a twin
             learner that never offloaded (the optimizer state survived the round trip)
  handover   an HFRollout on the same GPU sleeps (weights to host: GPU bytes freed), wakes, takes the
             learner's state dict (the colocated object-store sync) and then scores what the learner scores
Figures (on CUDA only) go to BENCHMARKS.md. Models are random-init (tiny, and SmolLM2-135M's shape).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import record  # noqa: E402
from bench.gpu_check import (  # noqa: E402
    build_models,
    check,
    device_and_tokenizer,
    environment,
    finish,
    free_memory,
    init_method,
    max_abs_diff,
    random_rollout,
    sync,
)
from tlcr_ray.rl.colocate import offload_learner, reload_learner  # noqa: E402
from tlcr_ray.rl.rollout.hf import HFRollout  # noqa: E402

GIB = 2**30


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def one_update(learner, batch, pad_id: int) -> dict:
    old = learner.evaluate(batch, pad_id)
    mask = (old["logprobs"] != 0).float()
    return learner.train(batch, pad_id, mask, mask, old["logprobs"], old["values"])


def check_offload(label: str, model_dir: str, dtype: str, zero: int, rdzv: str, device: torch.device, env: str):
    from tlcr_ray.config import PPOConfig
    from tlcr_ray.rl.learner import PPOLearner

    name = f"colocate {label} {dtype} ZeRO-{zero}"
    cfg = PPOConfig(mini_batch_size=8, zero_stage=zero, actor_lr=1e-4, critic_lr=1e-4, seed=0)
    cycled = PPOLearner(model_dir, cfg, rank=0, world_size=1, init_method=rdzv, dtype=dtype)
    twin = PPOLearner(model_dir, cfg, rank=0, world_size=1, init_method=rdzv, dtype=dtype)
    pad_id = cycled.actor.module.config.pad_token_id
    batch = random_rollout(cycled.actor.module.config.vocab_size, 16, seed=1)
    for learner in (cycled, twin):  # Adam's m and v exist only after a first step
        one_update(learner, batch, pad_id)
    sync(device)
    before, evaluated = allocated(device), cycled.evaluate(batch, pad_id)["logprobs"]
    start = time.perf_counter()
    off = offload_learner(cycled)
    sync(device)
    t_off, after = time.perf_counter() - start, allocated(device)
    while_off = max_abs_diff(cycled.evaluate(batch, pad_id)["logprobs"], evaluated)
    start = time.perf_counter()
    on = reload_learner(cycled)
    sync(device)
    t_on, back = time.perf_counter() - start, allocated(device)
    # ZeRO-3 partitions the parameters in place (numel 0); ds_numel is the full count.
    params = sum(getattr(p, "ds_numel", p.numel()) for e in cycled.engines.values() for p in e.module.parameters())
    stats = [one_update(learner, batch, pad_id) for learner in (cycled, twin)]
    same = max(abs(stats[0][k] - stats[1][k]) for k in ("policy_loss", "value_loss"))
    if device.type == "cuda":
        # Adam m, v and the fp32 masters of both engines: 12 bytes per parameter at world 1.
        ok = off["applied"] and on["applied"] and before - after >= 8 * params and back >= before - GIB // 8
    else:
        ok = not off["applied"] and "cpu" in off["reason"]
    check(f"{name}: offload_states / reload_states", ok and while_off == 0.0 and same <= 1e-3,
          f"GPU {before / GIB:.2f} -> {after / GIB:.2f} -> {back / GIB:.2f} GiB ({params / 1e6:.0f}M params); "
          f"offload {t_off:.2f} s, reload {t_on:.2f} s; {off['reason']}; evaluate while offloaded max|diff| "
          f"{while_off:.1e}; next update vs a never-offloaded twin max|diff| {same:.1e}")
    if device.type == "cuda" and label == "135m":
        record("gpu_check", f"learner offload + reload, 135M-shaped {dtype} ZeRO-{zero}",
               f"{(before - after) / GIB:.2f} GiB freed; {t_off:.2f} s + {t_on:.2f} s",
               details=f"{env}; actor+critic, world 1, after one update")
    del twin
    free_memory()
    return cycled, batch, pad_id


def check_handover(label: str, model_dir: str, dtype: str, learner, batch, pad_id: int, device: torch.device, env: str):
    name = f"colocate {label} {dtype}: HFRollout sleep / wake / weights from the learner on one GPU"
    engine = HFRollout(model_dir, dtype=dtype, device=str(device))
    sync(device)
    awake = allocated(device)
    start = time.perf_counter()
    slept = engine.sleep()
    sync(device)
    t_sleep, asleep = time.perf_counter() - start, allocated(device)
    start = time.perf_counter()
    woke = engine.wake_up()
    engine.load_state_dict(learner.full_state_dict())
    sync(device)
    t_wake = time.perf_counter() - start
    some = slice(0, 4)
    flat = lambda rows: torch.tensor(sum(rows, []))  # noqa: E731
    diff = max_abs_diff(flat(engine.score(batch.prompt_ids[some], batch.response_ids[some])),
                        flat(learner.score(batch.prompt_ids[some], batch.response_ids[some], pad_id)))
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    tol = 1e-4 if dtype == "float32" else 2e-2
    freed_ok = (slept["applied"] and woke["applied"] and awake - asleep >= 0.9 * weights) if device.type == "cuda" \
        else not slept["applied"]
    check(name, freed_ok and diff <= tol,
          f"GPU {awake / GIB:.2f} -> {asleep / GIB:.2f} GiB asleep (weights {weights / GIB:.2f}); sleep {t_sleep:.2f} s, "
          f"wake + load {t_wake:.2f} s; score vs learner max|diff| {diff:.1e} (tol {tol:g}); {slept['reason']}")
    if device.type == "cuda" and label == "135m":
        record("gpu_check", f"HFRollout sleep / wake + weight load, 135M-shaped {dtype}",
               f"{t_sleep:.2f} s / {t_wake:.2f} s", details=f"{env}; {(awake - asleep) / GIB:.2f} GiB freed asleep")
    del engine
    free_memory()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="SmolLM2 tokenizer folder (default: the embedded one)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny model on CPU; records nothing")
    args = parser.parse_args()
    device = device_and_tokenizer(args)
    if device is None:
        return 1
    env = environment()
    print(f"device: {env}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="tlcr-colocate-check-"))
    models = build_models(args.tokenizer, root, with_135m=not args.dry_run)
    rdzv = init_method(device, root)
    dtype = "float32" if args.dry_run else "bfloat16"
    for label, model_dir in models.items():
        for zero in (2, 3):
            learner, batch, pad_id = check_offload(label, model_dir, dtype, zero, rdzv, device, env)
            if zero == 2:
                check_handover(label, model_dir, dtype, learner, batch, pad_id, device, env)
            del learner
            free_memory()
    return finish(env)


if __name__ == "__main__":
    sys.exit(main())
