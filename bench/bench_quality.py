"""Does the dense token reward assign credit better? TLCR vs PPO-seq on the planted-phrase benchmark.

    python bench/bench_quality.py                                   # configs/planted.yaml, seeds 0 1 2
    python bench/bench_quality.py --seeds 0 1 2 3 4 --steps 8 --out runs/bench-quality

One `tlcr pipeline` on the config (label -> SFT -> discriminator -> RM -> PPO in every mode of
`pipeline.ppo_modes` -> report) is seed 0's run folder; every other seed runs `tlcr ppo` in TLCR
(`continuous`) and PPO-seq (`sequence`) mode from the same SFT policy, discriminator and RM, with
`ppo.seed` = `ppo.heldout_seed` = the seed. Within a seed both modes sample the same prompts with the
same step seeds, so the pair differs only in the reward. The gold metric is the share of sampled
replies on held-out prompts (the RL partition's `pipeline.eval_prompts`, never trained on) that hold
a planted phrase, after each step (`ppo.heldout_every: 1`; step 0 is the SFT policy).

Prints per seed and step both shares and the KL, the paired difference TLCR - PPO-seq at the last
step, and how many seeds favour TLCR (lower share); appends them to BENCHMARKS.md, writes
<out>/quality.json and <out>/quality.png (per-seed curves and their means).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import record  # noqa: E402
from tlcr_ray.layout import RunLayout  # noqa: E402
from tlcr_ray.tracking import read_step_rows  # noqa: E402

MODES = {"continuous": "TLCR", "sequence": "PPO-seq"}


def _tlcr(*args: str, log) -> float:
    start = time.time()
    cmd = [sys.executable, "-m", "tlcr_ray.cli", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - start


def run_seeds(config: str, out: Path, seeds: list[int], steps: int | None,
              pipeline_modes: list[str] | None = None, skip_pipeline: bool = False) -> dict:
    """Every run the figures need (skipping finished ones); -> {"wall_s": {...}}."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"seed-{seeds[0]}"
    common = [f"ppo.steps={steps}"] if steps else []
    modes = [f"pipeline.ppo_modes=[{', '.join(pipeline_modes)}]"] if pipeline_modes else []
    wall = {}
    with open(out / "runs.log", "a") as log:
        sets = [x for kv in [f"output_dir={base}", f"ppo.seed={seeds[0]}", f"ppo.heldout_seed={seeds[0]}",
                             *common, *modes] for x in ("--set", kv)]
        if not skip_pipeline:
            wall["pipeline"] = _tlcr("pipeline", "--config", config, *sets, log=log)
        layout = RunLayout(base)
        for seed in seeds[1:]:
            for mode in MODES:
                folder = out / f"seed-{seed}"
                if (RunLayout(folder).ppo(mode).model).exists():
                    continue
                sets = [x for kv in [f"output_dir={folder}", f"ppo.policy={layout.sft_model}",
                                     f"reward.discriminator={layout.discriminator}",
                                     f"reward.reward_model={layout.reward_model}", f"reward.mode={mode}",
                                     f"ppo.seed={seed}", f"ppo.heldout_seed={seed}", *common]
                        for x in ("--set", kv)]
                wall[f"seed-{seed}/{mode}"] = _tlcr("ppo", "--config", config, *sets, log=log)
    return {"wall_s": {k: round(v, 1) for k, v in wall.items()}}


def collect(out: Path, seeds: list[int]) -> dict:
    """{seed: {mode: [{step, share, kl, len}]}} from the runs' metrics.jsonl."""
    curves = {}
    for seed in seeds:
        curves[seed] = {}
        for mode in MODES:
            rows = read_step_rows(RunLayout(out / f"seed-{seed}").ppo(mode).metrics)
            curves[seed][mode] = [{"step": r["step"], "share": r["heldout_planted_share"], "kl": r.get("kl"),
                                   "len": r.get("heldout_len")} for r in rows if "heldout_planted_share" in r]
    return curves


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for mode, color in (("continuous", "tab:blue"), ("sequence", "tab:orange")):
        series = [[p["share"] for p in curves[s][mode]] for s in curves]
        steps = [p["step"] for p in curves[next(iter(curves))][mode]]
        for seed, ys in zip(curves, series):
            ax.plot(steps[:len(ys)], ys, color=color, alpha=0.3, linewidth=1)
        n = min(map(len, series))
        mean = np.mean([ys[:n] for ys in series], axis=0)
        ax.plot(steps[:n], mean, color=color, marker="o", markersize=3, linewidth=2,
                label=f"{MODES[mode]} (mean of {len(series)} seeds)")
    ax.set_xlabel("PPO step (0 = SFT policy)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("share of held-out replies")
    ax.set_title("replies holding a planted phrase (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarize(curves: dict, config: str, wall: dict) -> dict:
    seeds = list(curves)
    last = min(len(curves[s][m]) for s in seeds for m in MODES) - 1
    print(f"\nplanted-phrase share on held-out prompts per step ({config})")
    for seed in seeds:
        for mode in MODES:
            pts = curves[seed][mode]
            shares = " ".join(f"{p['share']:.3f}" for p in pts)
            kls = " ".join("-" if p["kl"] is None else f"{p['kl']:.3f}" for p in pts)
            print(f"  seed {seed} {MODES[mode]:8s} share: {shares}\n  {'':15s} kl:    {kls}")
    diffs = {s: curves[s]["continuous"][last]["share"] - curves[s]["sequence"][last]["share"] for s in seeds}
    step = curves[seeds[0]]["continuous"][last]["step"]
    favour = sum(d < 0 for d in diffs.values())
    ties = sum(d == 0 for d in diffs.values())
    mean_diff = sum(diffs.values()) / len(diffs)
    print(f"step {step}: paired difference TLCR - PPO-seq per seed: "
          + ", ".join(f"{s}: {d:+.3f}" for s, d in diffs.items()) + f"; mean {mean_diff:+.3f}; "
          f"{favour}/{len(seeds)} seeds favour TLCR ({ties} ties)")
    return {"last": last, "last_step": step, "diffs": diffs, "favour_tlcr": favour, "ties": ties, "mean_diff": mean_diff,
            "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/planted.yaml")
    parser.add_argument("--out", default="runs/bench-quality")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="PPO steps per run (default: the config's ppo.steps)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="run nothing: summarize the seeds under --out whose two runs have finished")
    parser.add_argument("--skip-pipeline", action="store_true",
                        help="the first seed's pipeline has run (its SFT, disc and RM exist): run only the other "
                             "seeds (e.g. a second bench process beside one that runs the pipeline)")
    parser.add_argument("--no-record", action="store_true", help="print, but append nothing to BENCHMARKS.md")
    parser.add_argument("--pipeline-modes", nargs="+", choices=["continuous", "sequence", "fixed"],
                        help="PPO modes of seed 0's pipeline (default: the config's pipeline.ppo_modes; "
                             "continuous and sequence are needed)")
    args = parser.parse_args()
    out = (REPO / args.out) if not os.path.isabs(args.out) else Path(args.out)
    start = time.time()
    if args.summarize_only:
        args.seeds = [s for s in args.seeds if all(RunLayout(out / f"seed-{s}").ppo(m).model.exists() for m in MODES)]
        stages = json.loads(RunLayout(out / f"seed-{args.seeds[0]}").pipeline_record.read_text())["stages"]
        wall = {"pipeline": sum(info.get("seconds", 0) for info in stages.values())}
    else:
        wall = run_seeds(args.config, out, args.seeds, args.steps, args.pipeline_modes, args.skip_pipeline)["wall_s"]
        if args.skip_pipeline:
            args.seeds = args.seeds[1:]
    curves = collect(out, args.seeds)
    result = summarize(curves, args.config, wall)
    total = time.time() - start
    plot(curves, out / "quality.png")
    (out / "quality.json").write_text(json.dumps({"curves": curves, **result, "wall_total_s": round(total, 1)},
                                                 indent=2))
    n, last, step = len(args.seeds), result["last"], result["last_step"]
    per_seed = "; ".join(
        f"seed {s}: TLCR {curves[s]['continuous'][last]['share']:.3f} vs PPO-seq {curves[s]['sequence'][last]['share']:.3f}"
        f" (step 0 {curves[s]['continuous'][0]['share']:.3f}, KL {curves[s]['continuous'][last]['kl']:.3f} vs "
        f"{curves[s]['sequence'][last]['kl']:.3f})" for s in args.seeds)
    where = "summarized from finished runs" if args.summarize_only else f"wall {total:.0f} s"
    details = (f"{args.config}, {n} paired seeds, {step} PPO steps each; {per_seed}; {where} "
               f"(seed {args.seeds[0]}'s pipeline {wall.get('pipeline', 0):.0f} s) on a shared machine")
    if args.no_record:
        return
    record("quality", f"planted-phrase share, TLCR - PPO-seq at step {step} (mean of {n} paired seeds)",
           f"{result['mean_diff']:+.3f}", "< 0", details)
    record("quality", f"seeds where TLCR's planted share is lower at step {step}",
           f"{result['favour_tlcr']}/{n}", "", f"{result['ties']} ties; " + details)


if __name__ == "__main__":
    main()
