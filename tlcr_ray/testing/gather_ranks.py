"""Run a ZeRO-3 PPO learner on N CPU ranks and export it, streamed or whole-model, measuring the gather.

    python -m tlcr_ray.testing.gather_ranks --model DIR --out OUT --variant streamed --bucket-mib 1 --world 2

Starts `--world` processes (gloo, file:// rendezvous); each builds a real `PPOLearner` under ZeRO-3 and
writes OUT/rank<r>.json with what its export cost. `streamed` is `PPOLearner.export_hf` (bucket by
bucket); `whole` is the export as it was before it (every rank gathers every parameter at once, rank 0
clones the whole state dict and hands it to `save_pretrained`), kept here only to measure against.
Rank 0 also writes OUT/reference.pt (every weight, gathered after the export, for the identity check)
and, for `streamed`, loads the same buckets into an `HFRollout` and records whether it then holds
exactly those weights. `shared` is `streamed` for a ppo.critic shared learner trained for one update
first (its export must be the policy alone), then a checkpoint round trip: a fresh learner loads it
and each rank records whether its values and log-probs came back exactly (`checkpoint_restored`).

Measured per rank: the largest sum of full-size parameters held gathered at any moment the consumer
saw a bucket (DeepSpeed's, ZeRO status AVAILABLE, or the gloo path's own buffers) (`max_gathered_bytes`; for `whole`, all of them);
the RSS high-water rise over the export (`/proc/self/status` VmHWM after resetting it through
/proc/self/clear_refs); the largest parameter; and the bucket size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_high_water() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def gathered_bytes(module) -> int:
    """Full bytes of the parameters ZeRO-3 currently holds gathered on this rank."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from tlcr_ray.training.gather import param_bytes

    return sum(param_bytes(p) for p in module.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE)


def _bucket_bytes(bucket) -> int:
    """Bytes of the distinct buffers a yielded bucket holds (the gloo path's own gathered copies)."""
    if bucket is None:
        return 0
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in bucket.values()}
    return sum(storages.values())


def _whole_model_export(learner, path: str) -> int:
    """The pre-streaming export: all parameters gathered at once, rank 0 clones them all. -> gathered bytes."""
    import deepspeed

    from tlcr_ray.models import load_tokenizer

    module = learner.actor.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        held = gathered_bytes(module)
        state = {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()} if learner.rank == 0 else None
    if learner.rank == 0:
        module.save_pretrained(path, state_dict=state)
        load_tokenizer(learner.policy_dir).save_pretrained(path)
    return held


def run_rank(args) -> None:
    import torch

    torch.set_num_threads(1)
    from tlcr_ray.config import PPOConfig
    from tlcr_ray.rl.learner import PPOLearner
    from tlcr_ray.training.gather import param_bytes

    shared = args.variant == "shared"
    cfg = PPOConfig(zero_stage=3, mini_batch_size=args.world, bucket_mib=args.bucket_mib, actor_lr=1e-3,
                    critic_lr=1e-2, critic="shared" if shared else "separate")
    learner = PPOLearner(args.model, cfg, rank=args.rank, world_size=args.world, init_method=args.init)
    if shared:
        _update(learner)
    module = learner.policy_module
    out = Path(args.out)
    largest = max(param_bytes(p) for p in module.parameters())
    total = sum(param_bytes(p) for p in module.parameters())
    import torch.distributed as dist

    dist.barrier()
    import gc

    gc.collect()
    reset_high_water()
    rss_before = _status_kib("VmRSS")
    started = time.perf_counter()
    max_held = 0
    if args.variant == "whole":
        max_held = _whole_model_export(learner, str(out / "export"))
    else:
        original = learner.state_buckets

        def watched(*a, **k):  # the consumer's view: what is gathered whenever it holds a bucket
            nonlocal max_held
            for bucket in original(*a, **k):
                max_held = max(max_held, gathered_bytes(module), _bucket_bytes(bucket))
                yield bucket
                bucket = None  # not kept while the next one is gathered

        learner.state_buckets = watched
        learner.export_hf(str(out / "export"), dtype="auto")
    seconds = time.perf_counter() - started
    hwm_rise = (_status_kib("VmHWM") - rss_before) * 1024
    dist.barrier()
    result = {"rank": args.rank, "variant": args.variant, "bucket_bytes": int(args.bucket_mib * 2**20),
              "largest_param_bytes": largest, "model_bytes": total, "max_gathered_bytes": max_held,
              "rss_high_water_rise_bytes": hwm_rise, "export_seconds": round(seconds, 3)}
    reference = learner.full_state_dict()  # after the measurement: the ground truth the folder must match
    if args.rank == 0:
        torch.save(reference, out / "reference.pt")
    if args.variant in ("streamed", "shared"):  # the same buckets into an HF rollout engine (collective)
        buckets = learner.state_buckets()
        if args.rank == 0:
            from tlcr_ray.rl.rollout.hf import HFRollout

            engine = HFRollout(args.model)
            engine.load_weight_stream({k: v.clone() for k, v in b.items()} for b in buckets)
            got = engine.model.state_dict()
            result["rollout_matches"] = all(torch.equal(got[k], v) for k, v in reference.items())
        else:
            for _ in buckets:
                pass
    if shared:
        result["checkpoint_restored"] = _checkpoint_round_trip(learner, args, out)
    (out / f"rank{args.rank}.json").write_text(json.dumps(result) + "\n")


def _rollout():
    """A fixed 4-row batch (the same on every rank) and its advantages and returns [4, R]."""
    import torch

    from tlcr_ray.rl.batch import RolloutBatch

    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3000, 4000, (n,), generator=g).tolist()  # noqa: E731
    prompts, responses = [ids(n) for n in (5, 3, 7, 4)], [ids(n) for n in (4, 6, 2, 5)]
    batch = RolloutBatch(prompts, responses, [[0.0] * len(r) for r in responses], ["length"] * 4)
    return batch, torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)


def _update(learner) -> dict:
    """One update on the fixed batch: train takes the whole batch's old log-probs and values, evaluate
    returns this rank's rows (contiguous, in rank order)."""
    import torch

    batch, advantages, returns = _rollout()
    old = learner.evaluate(batch, 0)
    whole = {k: torch.cat(learner._all_gather_object(old[k]), dim=0) for k in ("logprobs", "values")}
    return learner.train(batch, 0, advantages, returns, whole["logprobs"], whole["values"])


def _checkpoint_round_trip(learner, args, out: Path) -> bool:
    """Save (collective), load into a fresh shared learner, and compare this rank's evaluate outputs."""
    import torch

    from tlcr_ray.rl.learner import PPOLearner

    batch, _, _ = _rollout()
    before = learner.evaluate(batch, 0)
    learner.save_checkpoint(str(out / "ckpt"))
    fresh = PPOLearner(args.model, learner.cfg, rank=args.rank, world_size=args.world, init_method=args.init)
    zero_head = fresh.evaluate(batch, 0)["values"].abs().max().item() == 0
    fresh.load_checkpoint(str(out / "ckpt"))
    after = fresh.evaluate(batch, 0)
    return zero_head and before["values"].abs().max().item() > 0 and all(
        torch.equal(before[k], after[k]) for k in ("values", "logprobs"))


def launch(model: str, out: str | Path, variant: str, bucket_mib: float, world: int = 2,
           timeout: float = 2400) -> list[dict]:
    """Run the ranks as fresh processes (so each RSS high-water mark is this export's); -> their results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    init = f"file://{out / 'rdzv'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tlcr_ray.testing.gather_ranks", "--rank", str(r),
                               "--world", str(world), "--model", model, "--out", str(out), "--variant", variant,
                               "--bucket-mib", str(bucket_mib), "--init", init], env=env) for r in range(world)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:  # a rank that timed out (or a peer that died) must not outlive the call
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise RuntimeError(f"gather ranks exited with {codes}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", choices=["streamed", "whole", "shared"], default="streamed")
    parser.add_argument("--bucket-mib", type=float, default=1.0)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--init")
    args = parser.parse_args()
    if args.rank is None:
        print(json.dumps(launch(args.model, args.out, args.variant, args.bucket_mib, args.world), indent=2))
    else:
        run_rank(args)


if __name__ == "__main__":
    main()
