"""How much of each policy's change from its SFT start would survive a bfloat16 export.

    python bench/bench_export_dtype.py [--run runs/demo]

For every compared policy of a finished pipeline (DPO, FIGA, the RL runs), with W the exported fp32
weights and S the SFT start they trained from: the share of weights that moved, the share whose
bfloat16 rounding differs from S, and the share of the change kept, <bf16(W) - S, W - S> / |W - S|^2
(1: the rounded export keeps the whole change; 0: it is the SFT model again). At demo scale the
updates are below bfloat16's resolution, which is why configs/demo.yaml stores these policies in fp32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import record  # noqa: E402

POLICIES = ("dpo", "figa", "ppo-sequence", "ppo-remax", "ppo-fixed", "ppo-continuous")


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def kept_share(policy: dict, start: dict) -> tuple[float, float, float]:
    """-> (share moved, share whose bf16 rounding differs from the start, share of the change kept)."""
    import torch

    moved = crossed = total = 0
    norm = kept = 0.0
    for name, w in policy.items():
        w, s = w.float(), start[name].float()
        rounded, change = w.to(torch.bfloat16).float(), w - s
        total += w.numel()
        moved += int((change != 0).sum())
        crossed += int((rounded != s).sum())
        norm += float((change * change).sum())
        kept += float(((rounded - s) * change).sum())
    return moved / total, crossed / total, kept / max(norm, 1e-30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a finished pipeline's output_dir")
    args = parser.parse_args()
    run = Path(args.run)
    start = load_weights(run / "sft" / "model")
    parts, shares = [], []
    for name in POLICIES:
        if not (run / name / "model").exists():
            continue
        moved, crossed, kept = kept_share(load_weights(run / name / "model"), start)
        shares.append(kept)
        parts.append(f"{name}: moved {moved:.3f}, bf16 differs from SFT {crossed:.4f}, kept {kept:.3f}")
        print(f"[export_dtype] {parts[-1]}", flush=True)
    if not shares:
        raise SystemExit(f"{run}: no compared policy folders ({', '.join(POLICIES)})")
    record("export_dtype", "share of a policy's change kept by a bf16 export", f"{min(shares):.3f}-{max(shares):.3f}",
           "", f"{run}; " + "; ".join(parts))


if __name__ == "__main__":
    main()
