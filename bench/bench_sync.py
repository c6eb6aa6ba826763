"""The learner -> rollout weight sync at SmolLM2-135M: the object store vs the same-node shm handover.

    python bench/bench_sync.py [--model embedded:smollm2-135m-instruct] [--rollouts 1] [--repeats 3]

Real actors on a local Ray (127.0.0.1): one `LearnerWorker` (DeepSpeed ZeRO-2, ReMax so no critic is
built, fp32) and --rollouts HF `Rollout` actors, all on this node. Each method syncs --repeats times, as
`PPOLoop.sync_weights` issues it: `object_store` (rank 0 puts every bucket in the store, the engines
fetch and load them) and `shm` (rank 0 writes each bucket once into /dev/shm and hands the engines its
handle; HF engines copy on load, so one file carries every bucket of every sync and stays mapped on both
sides: the first sync faults its pages in, the later ones reuse them). Per method: the median sync wall time, the RSS high-water rise of the
learner and of rollout 0 over the syncs (VmHWM after a reset through /proc/<pid>/clear_refs; the store's
and /dev/shm's pages count where a process maps them), and the peak rise of /dev/shm use (where Ray's
object store and the shm buckets live) sampled every 5 ms. shm runs first: the object store keeps what it
grew to. Afterwards every engine's weights are checked equal to the learner's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import record  # noqa: E402

MIB = 2**20


def _hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def _reset_hwm(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


class ShmPeak:
    """Peak bytes used on /dev/shm while running, sampled every 5 ms."""

    def __init__(self):
        self.base = self.peak = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _used() -> int:
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._used())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _kept_files(pid: int) -> int:
    """Bytes of the bucket files the learner keeps in /dev/shm between syncs (HF engines: one reused file)."""
    from tlcr_ray.rl.handover import SHM_PREFIX, shm_dir

    return sum(os.path.getsize(os.path.join(shm_dir(), f)) for f in os.listdir(shm_dir())
               if f.startswith(f"{SHM_PREFIX}{pid}-"))


def sync_once(method: str, learners, rollouts) -> float:
    """One sync as `PPOLoop.sync_weights` issues it -> wall seconds."""
    from actors.groups import get_all

    start = time.perf_counter()
    if method == "shm":
        get_all(learners.push_weights("shm", rollouts))
    else:
        refs = get_all(learners.state_bucket_refs())[0]
        get_all([r.load_weight_buckets.remote(refs) for r in rollouts])
        del refs
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--rollouts", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mib", type=float, default=256.0)
    parser.add_argument("--no-record", action="store_true", help="print only; append nothing to BENCHMARKS.md")
    args = parser.parse_args()

    import ray
    import torch
    from ray.util.placement_group import placement_group

    from actors.groups import get_all
    from actors.learner import LearnerGroup
    from actors.rollout import Rollout
    from tlcr_ray.config import PPOConfig
    from ray_init import ensure_ray
    from tlcr_ray.models import resolve_model

    model = resolve_model(args.model)
    ensure_ray(num_cpus=2 + args.rollouts)
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready())
    cfg = PPOConfig(mini_batch_size=2, algorithm="remax", bucket_mib=args.bucket_mib)
    learners = LearnerGroup(model, cfg, "float32", pg, name="tlcr-bench-sync-learner")
    rollouts = [Rollout.options(num_cpus=1).remote(model, "hf", {"dtype": "float32", "seed": i})
                for i in range(args.rollouts)]
    get_all(learners.ready + [r.pid.remote() for r in rollouts])
    learner_pid, rollout_pid = learners.pids()[0], ray.get(rollouts[0].pid.remote())
    state = get_all(learners.full_state_dict())[0]
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    del state

    results = {}
    for method in ("shm", "object_store"):
        first = sync_once(method, learners, rollouts)  # warm-up: first-call costs (imports, store growth, shm's file)
        base = {pid: _rss(pid) for pid in (learner_pid, rollout_pid)}
        for pid in base:
            _reset_hwm(pid)
        with ShmPeak() as shm:
            seconds = [sync_once(method, learners, rollouts) for _ in range(args.repeats)]
        results[method] = {"seconds": statistics.median(seconds),
                           "learner_rise": _hwm(learner_pid) - base[learner_pid],
                           "rollout_rise": _hwm(rollout_pid) - base[rollout_pid],
                           "shm_rise": shm.peak - shm.base, "first": first,
                           "kept_file": _kept_files(learner_pid)}
        print(method, results[method], flush=True)

    learner_state = get_all(learners.full_state_dict())[0]
    for r in rollouts:
        engine = ray.get(r.engine_state_dict.remote())
        assert all(torch.equal(engine[n], t) for n, t in learner_state.items()), "a sync did not land exactly"
    ray.shutdown()

    old, new = results["object_store"], results["shm"]
    details = (f"{args.model} ({model_bytes / MIB:.0f} MiB fp32, tied lm_head sent too), bucket {args.bucket_mib:g} MiB, "
               f"{args.rollouts} HF rollout(s) on the learner's node, 1 LearnerWorker (DeepSpeed ZeRO-2, CPU), "
               f"median of {args.repeats} after a warm-up; object_store {old['seconds']:.2f} s vs shm "
               f"{new['seconds']:.2f} s (the warm-up sync {old['first']:.2f} vs {new['first']:.2f} s); shm keeps "
               f"{new['kept_file'] / MIB:.0f} MiB of /dev/shm between syncs (one reused bucket file, mapped by the "
               f"learner and the engines since the warm-up, so not in the rises); RSS high-water rise learner {old['learner_rise'] / MIB:.0f} vs "
               f"{new['learner_rise'] / MIB:.0f} MiB, rollout {old['rollout_rise'] / MIB:.0f} vs "
               f"{new['rollout_rise'] / MIB:.0f} MiB; /dev/shm peak rise {old['shm_rise'] / MIB:.0f} vs "
               f"{new['shm_rise'] / MIB:.0f} MiB; engines equal to the learner after; shared 2-core machine, "
               f"1-min load avg {os.getloadavg()[0]:.1f}")
    print(details)
    if not args.no_record:
        record("sync", "weight sync time, object_store / shm", f"{old['seconds'] / new['seconds']:.2f}x",
               "> 1x", details)
        record("sync", "rollout RSS high-water rise per sync, object_store vs shm",
               f"{old['rollout_rise'] / MIB:.0f} / {new['rollout_rise'] / MIB:.0f} MiB", "", details)


if __name__ == "__main__":
    main()
