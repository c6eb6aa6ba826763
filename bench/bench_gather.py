"""Streamed ZeRO-3 gather vs the whole-model gather: the extra memory of one HF export, 2 CPU ranks.

    python bench/bench_gather.py [--hidden 640 --layers 12] [--buckets 64,16]

A random-init Llama (hidden 640, 12 layers, SmolLM2's 49,152 vocabulary: 110M params, 440 MB fp32)
in a real ZeRO-3 `PPOLearner` on 2 gloo ranks (`tlcr_ray.testing.gather_ranks`), each variant in
fresh processes. Per rank: the RSS high-water rise over the export (VmHWM after a reset through
/proc/self/clear_refs) and the largest sum of parameters DeepSpeed held gathered at once. `whole` is the
export as it was (every rank gathers everything, rank 0 clones it all); `streamed` is
`PPOLearner.export_hf` with ppo.bucket_mib = each of --buckets. Goal: extra peak <= one bucket + the
largest parameter (for the gathered bytes; the RSS rise also counts safetensors' per-shard buffer).
`--floor-only` measures just gloo's own cost of all-gathering the largest parameter (its
all_gather_into_tensor gathers into a list and copies: 2x the output, a CPU/gloo floor NCCL has not).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import record  # noqa: E402

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--buckets", default="64,16", help="bucket sizes in MiB, comma-separated")
    parser.add_argument("--floor-only", action="store_true", help="only gloo's all-gather floor")
    parser.add_argument("--floor-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floor-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_rank is not None:
        return _floor_rank(args)
    if args.floor_only:
        return _floor(args)
    from tlcr_ray.models import embedded_tokenizer_dir
    from tlcr_ray.testing.gather_ranks import launch
    from tlcr_ray.testing.tiny_model import build_tiny_llama

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # large buffers are mmaps: RSS follows frees
    with tempfile.TemporaryDirectory(prefix="bench-gather-") as tmp:
        model = str(build_tiny_llama(Path(tmp) / "model", embedded_tokenizer_dir(), seed=0,
                                     hidden=args.hidden, layers=args.layers))
        runs = {"whole": launch(model, Path(tmp) / "whole", "whole", 64.0)}
        for mib in args.buckets.split(","):
            runs[f"streamed-{mib}"] = launch(model, Path(tmp) / f"s{mib}", "streamed", float(mib))
    r0 = runs["whole"][0]
    shape = (f"random-init Llama hidden {args.hidden}, {args.layers} layers, vocab 49,152: {r0['model_bytes'] / MIB:.0f} "
             f"MiB fp32, largest param {r0['largest_param_bytes'] / MIB:.0f} MiB; PPOLearner ZeRO-3, 2 gloo ranks; "
             f"MALLOC_MMAP_THRESHOLD_=65536; shared 2-core machine under load")
    whole_rss = [r["rss_high_water_rise_bytes"] for r in runs["whole"]]
    for name, ranks in runs.items():
        rss = [r["rss_high_water_rise_bytes"] for r in ranks]
        held = max(r["max_gathered_bytes"] for r in ranks)
        bound = ranks[0]["bucket_bytes"] + ranks[0]["largest_param_bytes"]
        goal = "" if name == "whole" else f"<= {bound / MIB:.0f} MiB (bucket + largest)"
        details = (f"{name}: RSS rise rank0 {rss[0] / MIB:.0f} MiB, rank1 {rss[1] / MIB:.0f} MiB (whole: "
                   f"{whole_rss[0] / MIB:.0f} / {whole_rss[1] / MIB:.0f}); gathered at once {held / MIB:.0f} MiB; "
                   f"export {max(r['export_seconds'] for r in ranks):.1f} s; {shape}")
        record("gather", f"extra peak of one export, {name}", f"{max(rss) / MIB:.0f} MiB", goal, details)


def _floor_rank(args) -> None:
    """One rank: all-gather a tensor the size of the embedding (vocab x hidden fp32) over gloo."""
    import json

    import torch
    import torch.distributed as dist

    from tlcr_ray.testing.gather_ranks import _status_kib, reset_high_water

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{args.floor_dir}/rdzv", rank=args.floor_rank, world_size=2)
    n = 49152 * args.hidden
    part = torch.randn(n // 2)
    dist.barrier()
    reset_high_water()
    before = _status_kib("VmRSS")
    out = torch.empty(n)
    dist.all_gather_into_tensor(out, part)
    Path(args.floor_dir, f"r{args.floor_rank}.json").write_text(json.dumps(
        {"rise": (_status_kib("VmHWM") - before) * 1024, "output": out.numel() * 4}))


def _floor(args) -> None:
    import json
    import subprocess

    with tempfile.TemporaryDirectory(prefix="bench-gather-floor-") as tmp:
        procs = [subprocess.Popen([sys.executable, __file__, "--hidden", str(args.hidden), "--floor-rank", str(r),
                                   "--floor-dir", tmp], env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
                 for r in range(2)]
        if any(p.wait(timeout=600) for p in procs):
            raise RuntimeError("floor ranks failed")
        got = [json.loads(Path(tmp, f"r{r}.json").read_text()) for r in range(2)]
    rise = max(g["rise"] for g in got)
    record("gather", "gloo all_gather_into_tensor RSS rise / its output", f"{rise / got[0]['output']:.2f}x", "",
           f"output {got[0]['output'] / MIB:.0f} MiB (the embedding of the bench's model), rise {rise / MIB:.0f} MiB; "
           "2 gloo ranks, MALLOC_MMAP_THRESHOLD_=65536: gloo's own floor under the streamed export's RSS figure")


if __name__ == "__main__":
    main()
