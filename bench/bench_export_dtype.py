"""How much of each policy's change from its SFT start survives a bfloat16 export, rounded to nearest or
stochastically (`<stage>.export_rounding`, `tlcr_ray.training.rounding`).

    python bench/bench_export_dtype.py [--run runs/demo] [--config configs/demo.yaml] [--texts 24]

Needs a finished run whose compared policies (DPO, FIGA, the RL runs) were exported in fp32 (W), and
the SFT start they trained from (S). Per policy, in weight space: the share of weights that moved and
the share of the change kept, <R(W) - S, W - S> / |W - S|^2 for R = nearest and R = stochastic (1: the
export keeps the whole change; 0: it is the SFT model again). In the policy's behaviour: the same share
for the per-token log-probs of held-out chosen responses (lp(R(W)) - lp(S) against lp(W) - lp(S)), and
the noise the rounding adds, |lp(R(W)) - lp(W)| / |lp(W) - lp(S)|.
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


def rounded(policy: dict, how: str) -> dict:
    import torch

    from tlcr_ray.training.rounding import round_bucket

    if how == "nearest":
        return {k: v.float().to(torch.bfloat16) for k, v in policy.items()}
    return round_bucket({k: v.float() for k, v in policy.items()}, seed=0)


def kept_share(policy: dict, start: dict, export: dict) -> tuple[float, float]:
    """-> (share of weights moved, share of the change the export keeps)."""
    moved = total = 0
    norm = kept = 0.0
    for name, w in policy.items():
        w, s = w.float(), start[name].float()
        change = w - s
        total += w.numel()
        moved += int((change != 0).sum())
        norm += float((change * change).sum())
        kept += float(((export[name].float() - s) * change).sum())
    return moved / total, kept / max(norm, 1e-30)


def token_logprobs(model_dir: str, weights: dict, batch):
    """Per-token log-probs [N, R] (0 on padding) of `batch` under the model of `model_dir` holding `weights`."""
    import torch

    from tlcr_ray.models import load_policy
    from tlcr_ray.rl.batch import policy_logprobs

    model = load_policy(model_dir, dtype="float32").eval()
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    with torch.no_grad():
        return policy_logprobs(model, batch, 1.0, 8, torch.device("cpu")) * batch.response_mask


def behaviour_share(lp_start, lp_policy, lp_export) -> tuple[float, float]:
    """-> (share of the log-prob change kept, rounding noise / the change), over every response token."""
    change, got = lp_policy - lp_start, lp_export - lp_start
    norm = float((change * change).sum())
    return float((got * change).sum()) / max(norm, 1e-30), float((lp_export - lp_policy).norm()) / max(norm ** 0.5, 1e-30)


def held_out_batch(run: Path, config: str, texts: int):
    """The chosen responses of the report's held-out prompts (PPO never trains on them), packed for
    teacher forcing."""
    from tlcr_ray.config import load_config
    from tlcr_ray.data.pairs import load_split, rl_prompt_pools
    from tlcr_ray.data.tokens import encode_prompts
    from tlcr_ray.models import load_tokenizer
    from tlcr_ray.rl.batch import pack

    cfg = load_config(config)
    tok = load_tokenizer(str(run / "sft" / "model"))
    _, pairs = rl_prompt_pools(load_split(cfg.data, "rl")[0], max(texts, cfg.pipeline.eval_prompts))
    pairs = pairs[:texts]
    prompts = encode_prompts(tok, [p.prompt for p in pairs], cfg.model.max_prompt_len)
    responses = [tok(p.chosen, add_special_tokens=False)["input_ids"][:cfg.model.max_response_len] for p in pairs]
    return pack(prompts, responses, tok.pad_token_id)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a finished run's output_dir (fp32 policy exports)")
    parser.add_argument("--config", default="configs/demo.yaml", help="the run's config (its data and lengths)")
    parser.add_argument("--texts", type=int, default=24, help="held-out responses the log-prob shares are taken on")
    args = parser.parse_args()
    run = Path(args.run)
    sft = run / "sft" / "model"
    start = load_weights(sft)
    batch = held_out_batch(run, args.config, args.texts)
    lp_start = token_logprobs(str(sft), start, batch)
    parts, shares = [], {"nearest": [], "stochastic": []}
    for name in POLICIES:
        folder = run / name / "model"
        if not folder.exists():
            continue
        policy = load_weights(folder)
        if any(v.dtype != torch.float32 for v in policy.values()):
            print(f"[export_dtype] {name}: stored below fp32 already; skipped", flush=True)
            continue
        lp_policy = token_logprobs(str(sft), policy, batch)
        text = [name]
        for how in ("nearest", "stochastic"):
            export = rounded(policy, how)
            moved, kept = kept_share(policy, start, export)
            lp_kept, noise = behaviour_share(lp_start, lp_policy, token_logprobs(str(sft), export, batch))
            shares[how].append((kept, lp_kept))
            text.append(f"{how}: weights kept {kept:.3f}, log-probs kept {lp_kept:.3f} (noise {noise:.3f})")
        text.insert(1, f"moved {moved:.3f}, |lp change| per token {float((lp_policy - lp_start).abs().sum() / batch.response_mask.sum()):.2e}")
        parts.append(", ".join(text))
        print(f"[export_dtype] {parts[-1]}", flush=True)
    if not parts:
        raise SystemExit(f"{run}: no fp32 compared policy folders ({', '.join(POLICIES)})")
    span = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}"  # noqa: E731
    for how in ("nearest", "stochastic"):
        record("export_dtype", f"share of a policy's change kept by a bf16 export, {how} rounding",
               f"weights {span([k for k, _ in shares[how]])}, log-probs {span([k for _, k in shares[how]])}", "",
               f"{run}, {args.texts} held-out responses; " + "; ".join(parts))


if __name__ == "__main__":
    main()
