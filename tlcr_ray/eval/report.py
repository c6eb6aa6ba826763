"""`tlcr report RUN_DIR`: PNG curves, an HTML token heat-map and report.md for a run folder.

    tlcr report runs/demo

Reads what the stages left in the run folder (config.yaml, pipeline.json, ppo-*/metrics.jsonl,
disc/eval.json, label/labels.jsonl, the models) and writes into RUN_DIR/report/. The model work (the
Figure 6 table's samples, the heat-map's labelled pairs) runs where the CLI's runner puts it: on the
driver, or on GPU workers when the cluster has them (`tlcr_ray.eval.runner`); the files are written here.
"""
from __future__ import annotations

import html
from pathlib import Path

import yaml

from tlcr_ray.config import Config, load_config, to_dict
from tlcr_ray.eval.runner import DRIVER, EvalPlace, EvalRunner, run_one
from tlcr_ray.io import read_json, write_text_atomic
from tlcr_ray.layout import RunLayout
from tlcr_ray.methods import METHODS
from tlcr_ray.rl.rewards import token_rewards
from tlcr_ray.tracking import read_step_rows

# Curves drawn per PPO step: (file stem, title, metric key in ppo-*/metrics.jsonl).
CURVES = [
    ("reward", "token-mean training reward (each mode's own)", "reward_token_mean"),
    ("kl", "KL to the reference (per token)", "kl"),
    ("length", "response length (tokens)", "response_len"),
    ("perplexity", "perplexity of sampled responses", "perplexity"),
    ("entropy", "policy entropy (per token)", "entropy"),
    ("planted", "held-out replies with a planted phrase (share)", "heldout_planted_share"),  # ppo.heldout_every
]
# A PPO run's folder suffix (`ppo-<mode>`, `ppo-remax`) -> the method's name in the report.
RUN_LABELS = {m.run_name.removeprefix("ppo-"): m.label for m in METHODS.values() if not m.stage}


def load_run_config(run_dir: Path) -> Config:
    """The config the pipeline saved in the run folder (defaults with this output_dir otherwise)."""
    saved = RunLayout(run_dir).saved_config
    if saved.exists():
        cfg = load_config(saved)
    else:
        cfg = load_config(None)
    cfg.output_dir = str(run_dir)
    return cfg


def plot_curves(run_dir: Path, out: Path) -> list[str]:
    """One PNG per metric with every PPO (and ReMax) run on the same axes; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = {mode: read_step_rows(path) for mode, path in RunLayout(run_dir).ppo_runs().items()}
    runs = {mode: rows for mode, rows in runs.items() if rows}
    written = []
    for stem, title, key in CURVES:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        drawn = False
        for mode, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=RUN_LABELS.get(mode, mode))
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png")
        plt.close(fig)
        written.append(f"{stem}.png")
    return written


def _reward_color(reward: float) -> str:
    """-1 red ... 0 white ... +1 green."""
    r = max(-1.0, min(1.0, reward))
    if r < 0:
        return f"rgba(220,38,38,{-r * 0.85:.2f})"
    return f"rgba(22,163,74,{r * 0.85:.2f})"


def _tokens_html(tokenizer, ids: list[int], p: list[float], labels: list[float] | None = None) -> str:
    """Each token as a span coloured by its continuous reward (p: the discriminator's probabilities)."""
    import torch

    rewards = token_rewards(torch.tensor([p], dtype=torch.float32), "continuous")[0].tolist() if p else []
    spans = []
    for i, (tid, pt, r) in enumerate(zip(ids, p, rewards)):
        text = html.escape(tokenizer.decode([tid])).replace("\n", "↵<br>")
        tip = f"r={r:+.3f} p={pt:.3f}" + (f" label={labels[i]}" if labels else "")
        border = ""
        if labels is not None and labels[i] != 0.5:
            border = "border-bottom:3px solid " + ("#15803d" if labels[i] == 1 else "#b91c1c") + ";"
        spans.append(f'<span title="{tip}" style="background:{_reward_color(r)};{border}">{text}</span>')
    return "".join(spans)


def labelled_pair_probs(cfg: Config, limit: int, *, place: EvalPlace = DRIVER) -> list[dict]:
    """The discriminator's p on the responses of up to `limit` held-out labelled pairs (on `place`),
    beside their Levenshtein labels -> [{pair_id, kind, response_ids, p, labels}]."""
    from tlcr_ray.eval.policy_table import score_samples
    from tlcr_ray.labeling.labels import read_labels
    from tlcr_ray.models import load_head_model, load_tokenizer, resolve_model
    from tlcr_ray.training import is_heldout

    layout = RunLayout.of(cfg)
    if not (layout.label_output.exists() and layout.discriminator.exists()):
        return []
    pad_id = load_tokenizer(resolve_model(cfg.model.tokenizer or cfg.model.base)).pad_token_id
    disc = load_head_model(layout.discriminator, place.head_dtype(cfg)).to(place.device).eval()
    rows = [r for r in read_labels(layout.label_output) if is_heldout(r.pair_id, cfg.disc.eval_fraction, cfg.disc.seed)]
    pairs = []
    for row in rows[:limit]:
        start = next((i for i, lab in enumerate(row.labels) if lab != -100), len(row.labels))
        scored = score_samples([row.input_ids[:start]], [row.input_ids[start:]], disc, None, pad_id, cfg)[0]
        pairs.append({"pair_id": row.pair_id, "kind": row.kind, "response_ids": row.input_ids[start:],
                      "p": scored["p"], "labels": row.labels[start:]})
    return pairs


def write_heatmap(cfg: Config, table: dict, out: Path, runner: EvalRunner | None = None) -> None:
    """report/heatmap.html: sampled responses before/after PPO, and held-out labelled pairs (scored by
    `runner`: here, or on a GPU worker)."""
    from tlcr_ray.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(cfg.model.tokenizer or cfg.model.base))
    n = cfg.pipeline.heatmap_samples
    parts = ["<!doctype html><meta charset='utf-8'><title>TLCR token heat-map</title>",
             "<style>body{font:14px/1.7 system-ui;max-width:60em;margin:2em auto}"
             ".seq{white-space:pre-wrap;font-family:ui-monospace,monospace;padding:.5em;border:1px solid #ddd}"
             "h3{margin-bottom:.2em}.prompt{color:#666}</style>",
             "<h1>Token rewards from the discriminator</h1>",
             "<p>Each token is coloured by its reward r = 2p − 1 (red: negative, green: positive; hover for p). "
             "Underlines mark the Levenshtein labels of held-out pairs (red: 0, green: 1).</p>"]
    samples = table.get("samples", {})
    for name in ("SFT", "TLCR"):
        for i, s in enumerate(samples.get(name, [])[:n]):
            prompt = html.escape(tokenizer.decode(s["prompt_ids"][-60:]))
            parts.append(f"<h3>{name} · sample {i + 1} · sum of rewards {s['continuous_sum']:+.2f}</h3>"
                         f"<div class='prompt'>…{prompt}</div>"
                         f"<div class='seq'>{_tokens_html(tokenizer, s['response_ids'], s['p'])}</div>")
    layout = RunLayout.of(cfg)
    if layout.label_output.exists() and layout.discriminator.exists():
        parts.append("<h2>Held-out labelled pairs: discriminator p beside the labels</h2>")
        for pair in run_one(runner, labelled_pair_probs, cfg, 2 * n):
            parts.append(f"<h3>pair {pair['pair_id']} · {pair['kind']}</h3><div class='seq'>"
                         f"{_tokens_html(tokenizer, pair['response_ids'], pair['p'], pair['labels'])}</div>")
    write_text_atomic(out / "heatmap.html", "\n".join(parts))


def _fmt(x) -> str:
    return "–" if x is None or x != x else f"{x:+.3f}"


def _method_sections(layout: RunLayout) -> list[str]:
    """DPO's held-out preference metrics, and Table 1 when a judge table was computed (each when present)."""
    from tlcr_ray.eval.judge_table import markdown as judge_table_markdown

    lines = []
    dpo_eval = layout.stage("dpo").eval
    if dpo_eval.exists():
        result = read_json(dpo_eval)
        lines += ["## DPO (held-out pairs)", "",
                  f"* implicit reward margin > 0 (preference accuracy): {_fmt_share(result.get('pairwise_accuracy'))}",
                  f"* mean implicit reward margin: {_fmt(result.get('mean_margin'))} (beta {result.get('beta')}, "
                  f"{result.get('pairs')} pairs)", ""]
    if layout.judge_table.result.exists():
        lines += judge_table_markdown(read_json(layout.judge_table.result))
    return lines


def _fmt_share(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def write_markdown(cfg: Config, run_dir: Path, table: dict, plots: list[str], out: Path) -> None:
    layout = RunLayout(run_dir)
    pipeline = read_json(layout.pipeline_record) if layout.pipeline_record.exists() else {}
    disc_eval = read_json(layout.stage("disc").eval) if layout.stage("disc").eval.exists() else {}
    lines = [f"# TLCR run report: `{run_dir}`", ""]
    lines += ["## Stage wall times", "", "| stage | seconds |", "|---|---|"]
    for stage, info in pipeline.get("stages", {}).items():
        lines.append(f"| {stage} | {info.get('seconds', '–')} |")
    lines += ["", "## Discriminator (held-out pairs)", ""]
    for key, value in disc_eval.items():
        if isinstance(value, (int, float, str)):
            lines.append(f"* {key}: {value:.4f}" if isinstance(value, float) else f"* {key}: {value}")
    lines += ["", "## Rewards on held-out prompts (the paper's Figure 6)", "",
              f"{table.get('prompts', 0)} held-out RL prompts × seeds {table.get('seeds', [])}; "
              "one sampled response per prompt and seed; means over responses.", "",
              "| policy | sequence RM score | sum of discrete token rewards | sum of continuous token rewards | mean length |",
              "|---|---|---|---|---|"]
    for name, row in table.get("rows", {}).items():
        lines.append(f"| {name} | {_fmt(row['rm_score'])} | {_fmt(row['discrete_sum'])} | "
                     f"{_fmt(row['continuous_sum'])} | {row['mean_length']:.1f} |")
    lines += [""] + _method_sections(layout)
    lines += ["## PPO curves", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "Token heat-map: [heatmap.html](heatmap.html)", "", "## Configuration", "", "```yaml",
              yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(),
              "```", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))


def write_report(run_dir: str | Path, runner: EvalRunner | None = None) -> dict:
    """Write every report file into RUN_DIR/report/ (report.md last, so its presence means done);
    `runner`: where the models run (None: here)."""
    from tlcr_ray.eval.policy_table import reward_table

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    cfg = load_run_config(run_dir)
    out = RunLayout(run_dir).report_dir
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(run_dir, out)
    has_disc = RunLayout.of(cfg).discriminator.exists()
    table = reward_table(cfg, runner) if has_disc else {}
    if has_disc:
        write_heatmap(cfg, table, out, runner)
    write_markdown(cfg, run_dir, table, plots, out)
    return {"report": str(RunLayout(run_dir).report), "plots": plots, "rows": table.get("rows", {}),
            "evaluated_on": table.get("evaluated_on")}
