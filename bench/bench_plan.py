"""`tlcr plan`'s memory model against measured peak memory on CPU: predicted / measured growth.

    .venv/bin/python bench/bench_plan.py [--learner-micro 2 4 8] [--disc-micro 16 64 128] [--only disc]
    (BENCH_PLAN_LEARNER_ROWS / BENCH_PLAN_DISC_ROWS: the mini-batch / scoring call's rows, 8 / 128)

Two measurements, each at three micro-batch sizes, each in a fresh subprocess:
* one PPO learner update (`PPOLearner.train`, world size 1, ppo.zero_stage of configs/demo.yaml,
  float32, one mini-batch of 8 rows as ppo.micro_batch_size-row micro-steps with gradient
  accumulation: actor forward/backward then the critic's per micro-step, one optimizer step), twice,
  on a random-init model of the embedded SmolLM2-135M's shape (its config.json, fresh weights), with
  demo.yaml's prompt/response lengths (112 + 32 tokens);
* one discriminator scoring call (`text_scoring.response_probabilities`, no grad, use_cache=False) of
  128 rows of 256 tokens in forward micro-batches of the given size, on a random-init
  TokenDiscriminator of the same shape, after a one-row warm-up call (oneDNN/OpenMP first-call
  scratch belongs to no model), run twice: the figure is the second call (the steady state of a
  scorer that sees the shape again every step); the first call at the shape is printed beside it.
Measured: the process's peak RSS (psutil, sampled every 2 ms by a thread; ru_maxrss would include the
load's own peak) minus its RSS after the model (and the DeepSpeed engines) are built; torch's
allocations are invisible to tracemalloc, hence RSS. The workers run with MALLOC_MMAP_THRESHOLD_=65536
so that glibc returns freed tensors to the OS and RSS follows the live bytes; with glibc's default
heap (--default-malloc) RSS also keeps ~1 GiB of freed per-parameter gradients after a learner
update, allocator retention as a GPU's caching allocator keeps reserved memory.
Predicted: `tlcr_ray.plan`'s peak phase for that config minus what the plan says is live after the
load (weights, ZeRO's fp32 master copies, the process itself), i.e. the update's grads, Adam states,
step temporaries, DeepSpeed's bucket and activations; for scoring, `inference_activations`. The
figure is predicted / measured (1.0: exact; above 1: the plan over-estimates, the safe side).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
PROMPT, RESPONSE, DISC_SEQ = 112, 32, 256
LEARNER_ROWS, DISC_ROWS = int(os.environ.get("BENCH_PLAN_LEARNER_ROWS", 8)), int(os.environ.get("BENCH_PLAN_DISC_ROWS", 128))


def build_model(folder: Path) -> Path:
    """The embedded SmolLM2-135M's config with random weights (and its tokenizer), saved once."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tlcr_ray.models import embedded_model_dir, load_tokenizer

    config = AutoConfig.from_pretrained(str(embedded_model_dir()))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    load_tokenizer(str(embedded_model_dir())).save_pretrained(folder)
    return folder


class PeakRSS:
    """Max RSS of this process, sampled by a thread while the block runs."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _rss() -> int:
    import gc

    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def worker_learner(folder: str, micro: int) -> dict:
    import torch

    from tlcr_ray.config import load_config
    from tlcr_ray.rl.batch import RolloutBatch
    from tlcr_ray.rl.learner import PPOLearner

    rows = LEARNER_ROWS
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"ppo.mini_batch_size={rows}", f"ppo.prompts_per_step={rows}",
                                                        f"ppo.micro_batch_size={micro}"])
    rdzv = tempfile.mkdtemp(prefix="tlcr-bench-plan-")
    learner = PPOLearner(folder, cfg.ppo, rank=0, world_size=1, init_method=f"file://{rdzv}/rdzv", dtype="float32")
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(10, 40000, (n,), generator=g).tolist()  # noqa: E731
    batch = RolloutBatch([ids(PROMPT) for _ in range(rows)], [ids(RESPONSE) for _ in range(rows)],
                         [[0.0] * RESPONSE for _ in range(rows)], ["length"] * rows)
    zeros = torch.zeros(rows, RESPONSE)
    adv, ret = torch.randn(rows, RESPONSE, generator=g), torch.randn(rows, RESPONSE, generator=g)
    base = _rss()
    with PeakRSS() as peak:
        for _ in range(2):  # the first update allocates Adam's m, v; the second is the steady state
            learner.train(batch, 0, adv, ret, zeros - 1.0, zeros)
    return {"baseline": base, "peak": peak.peak}


def worker_disc(folder: str, micro: int) -> dict:
    import torch

    from tlcr_ray.data.tokens import Encoded
    from tlcr_ray.models import TokenDiscriminator
    from tlcr_ray.rl.text_scoring import response_probabilities

    torch.manual_seed(0)
    model = TokenDiscriminator.from_pretrained(folder).eval()
    encoded = [Encoded(torch.randint(10, 40000, (DISC_SEQ,)).tolist(), DISC_SEQ - RESPONSE, [(0, 0)] * RESPONSE)
               for _ in range(DISC_ROWS)]
    response_probabilities(model, encoded[:1], 0)  # warm: oneDNN/OpenMP first-call scratch is not the model's
    calls = []
    for _ in range(2):  # the first call at this micro-batch shape, then the same call again (steady state)
        base = _rss()
        with PeakRSS() as peak:
            response_probabilities(model, encoded, 0, micro_batch_size=micro)
        calls.append({"baseline": base, "peak": peak.peak})
    return {**calls[1], "first_call": calls[0]}


def predicted_learner(folder: str, micro: int) -> int:
    from tlcr_ray.config import load_config
    from tlcr_ray.plan import CPU_PROCESS, plan_learner
    from tlcr_ray.plan_models import model_shape

    rows = LEARNER_ROWS
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.base={folder}", f"ppo.mini_batch_size={rows}",
                                                        f"ppo.prompts_per_step={rows}", f"ppo.micro_batch_size={micro}"])
    cfg.model.max_prompt_len, cfg.model.max_response_len = PROMPT, RESPONSE
    out = plan_learner(cfg, model_shape(folder))
    loaded = CPU_PROCESS + sum(out["breakdown"][e][k] for e in ("actor", "critic") for k in ("weights", "master"))
    return max(out["phases"]["train"], out["phases"]["step"]) - loaded


def predicted_disc(folder: str, micro: int) -> int:
    from tlcr_ray.plan import inference_activations
    from tlcr_ray.plan_models import model_shape

    return inference_activations(model_shape(folder), min(micro, DISC_ROWS), DISC_SEQ, 4)


def measure(kind: str, folder: str, rows: int, default_malloc: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--folder", folder, "--rows", str(rows)],
                          check=False, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{kind} rows={rows} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learner-micro", type=int, nargs="+", default=[2, 4, 8],
                        help=f"ppo.micro_batch_size of a {LEARNER_ROWS}-row mini-batch")
    parser.add_argument("--disc-micro", type=int, nargs="+", default=[16, 64, 128],
                        help=f"forward micro-batch of a {DISC_ROWS}-row scoring call")
    parser.add_argument("--worker", choices=["learner", "disc"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="print, do not append to BENCHMARKS.md")
    parser.add_argument("--default-malloc", action="store_true", help="glibc's default heap (RSS keeps freed memory)")
    parser.add_argument("--only", choices=["learner", "disc"], help="run one of the two measurements")
    parser.add_argument("--note", default="", help="appended to the BENCHMARKS.md row (e.g. machine contention)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((worker_learner if args.worker == "learner" else worker_disc)(args.folder, args.rows)))
        return
    from bench.common import record

    folder = str(build_model(Path(tempfile.gettempdir()) / "tlcr-bench-plan-smollm2-random"))
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    for kind, sizes, predict, what in (
            ("learner", args.learner_micro, predicted_learner,
             f"PPOLearner.train x2 (actor+critic, ZeRO-2, world 1, fp32), {LEARNER_ROWS} rows of {PROMPT}+{RESPONSE} "
             "tokens as micro-batches with gradient accumulation"),
            ("disc", args.disc_micro, predicted_disc,
             f"response_probabilities of {DISC_ROWS} rows x {DISC_SEQ} tokens, forward micro-batches")):
        if args.only and kind != args.only:
            continue
        parts, ratios = [], []
        for rows in sizes:
            start = time.perf_counter()
            got = measure(kind, folder, rows, args.default_malloc)
            measured = got["peak"] - got["baseline"]
            pred = predict(folder, rows)
            ratios.append(pred / measured)
            first = ""
            if "first_call" in got:  # scoring: the same call's first run at this shape, for comparison
                cold = got["first_call"]["peak"] - got["first_call"]["baseline"]
                first = f"; first call at this shape {mib(cold)} = {pred / cold:.2f}"
            parts.append(f"micro {rows}: predicted {mib(pred)} / measured {mib(measured)} = {pred / measured:.2f}"
                         f"{first} ({time.perf_counter() - start:.0f} s)")
            print(f"[plan] {kind} {parts[-1]}", flush=True)
        if not args.no_record:
            record("plan", f"predicted/measured peak RSS growth, {kind}",
                   f"{min(ratios):.2f}-{max(ratios):.2f}", "1.0-1.5",
                   f"random-init SmolLM2-135M shape; {what}; "
                   f"{'default malloc' if args.default_malloc else 'MALLOC_MMAP_THRESHOLD_=65536'}; " + "; ".join(parts)
                   + (f"; {args.note}" if args.note else ""))


if __name__ == "__main__":
    main()
