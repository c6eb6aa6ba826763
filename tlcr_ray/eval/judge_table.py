"""The paper's Table 1 on one run: MT-Bench (turn 1, turn 2, average) of every method's policy, and the
AlpacaEval win rate of TLCR over each other method, all by one OpenAI-compatible judge.

    tlcr eval judge-table --config configs/demo.yaml --judge-base-url URL --judge-model NAME [--limit N]
    # -> <output_dir>/eval/judge-table.json, rendered by `tlcr report`; the pipeline runs it when
    #    eval.judge_base_url is set

A method is included when its model exists (`tlcr_ray/methods.py`). MT-Bench goes through
`benchmarks.run_mt_bench` (its answer and judgment caches under eval/mt-bench/ are shared with
`tlcr eval mt-bench`); AlpacaEval answers are cached under eval/alpaca-eval/answers.jsonl and each
TLCR-vs-baseline judgment under eval/judge-table/judgments.jsonl, with TLCR in the "model" seat of the
pairwise judge (ties count half), so a rerun generates and judges nothing twice.
"""
from __future__ import annotations

from pathlib import Path

from tlcr_ray.config import Config
from tlcr_ray.eval.benchmarks import (
    REPO_DATA,
    _generator,
    _limited,
    load_alpaca_reference,
    run_mt_bench,
    win_rate_summary,
)
from tlcr_ray.eval.judge import DEFAULT_BASE_URL, judge_all, judge_api_key, pairwise_request
from tlcr_ray.eval.runner import EvalRunner
from tlcr_ray.io import write_json_atomic
from tlcr_ray.layout import RunLayout
from tlcr_ray.methods import METHODS

WINNER = "tlcr"
"""The method whose AlpacaEval win rate over every other method the table gives (the paper's TLCR)."""
MT_KEYS = ("turn_1", "turn_2", "score", "judged", "judge_errors")
WIN_KEYS = ("win_rate", "stderr", "wins", "losses", "ties", "judged", "judge_errors")


def present_methods(cfg: Config) -> list[tuple[str, Path]]:
    """(method, model folder) of every method whose model exists in the run folder, in the paper's order."""
    layout = RunLayout.of(cfg)
    return [(name, m.model(layout)) for name, m in METHODS.items() if (m.model(layout) / "config.json").exists()]


def _alpaca_answers(cfg: Config, model_dir: Path, items: list[dict], desc: str, runner: EvalRunner | None) -> list[str]:
    gen = _generator(cfg, str(model_dir), "alpaca-eval", runner)
    try:
        rows = gen.answer([[{"role": "user", "content": it["instruction"]}] for it in items], desc)
    finally:
        gen.close()
        gen.cache.close()
    return [r["answer"] for r in rows]


def judge_table(cfg: Config, runner: EvalRunner | None = None) -> dict:
    """Judge every present method; -> the table (also written to eval/judge-table.json). `runner`: where
    the answers are generated (None: here; `tlcr_ray.eval.runner`)."""
    ev, layout = cfg.eval, RunLayout.of(cfg)
    judge_api_key(ev, ev.judge_base_url or DEFAULT_BASE_URL)  # a missing key fails before any generation
    methods = present_methods(cfg)
    if not methods:
        raise FileNotFoundError(f"{layout.root}: no method's model to judge")
    folder = layout.judge_table.dir
    rows, mt_questions = {}, None
    for name, model_dir in methods:
        result = run_mt_bench(cfg, str(model_dir), result_path=folder / f"mt-bench-{name}.json", runner=runner)
        mt_questions = result["questions"]
        rows[name] = {"label": METHODS[name].label, "model": str(model_dir),
                      "mt_bench": {k: result[k] for k in MT_KEYS}}
    items = []
    if WINNER in rows:
        reference_path = ev.alpaca_reference or REPO_DATA / "alpaca-eval" / "gpt4_1106_preview_outputs.json"
        items = _limited(load_alpaca_reference(reference_path), ev.limit)
        winner = _alpaca_answers(cfg, dict(methods)[WINNER], items, f"alpaca-eval {WINNER}", runner)
        for name, model_dir in methods:
            if name == WINNER:
                continue
            other = _alpaca_answers(cfg, model_dir, items, f"alpaca-eval {name}", runner)
            requests = [pairwise_request(i, it["instruction"], a, b, ev.judge_model, ev.seed)
                        for i, (it, a, b) in enumerate(zip(items, winner, other))]
            records = judge_all(requests, folder / "judgments.jsonl", ev, ev.judge_model, ev.judge_base_url)
            summary = win_rate_summary([records[r.key] for r in requests])
            rows[name]["tlcr_win_rate"] = {k: summary[k] for k in WIN_KEYS}
    table = {"judge_model": ev.judge_model, "judge_base_url": ev.judge_base_url or DEFAULT_BASE_URL,
             "mt_bench_questions": mt_questions, "alpaca_eval_questions": len(items),
             "max_new_tokens": ev.max_new_tokens, "temperature": ev.temperature, "methods": rows}
    write_json_atomic(layout.judge_table.result, table)
    return table


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def markdown(table: dict) -> list[str]:
    """The report's Table 1 section from a judge-table.json."""
    rows = table.get("methods", {})
    lines = ["## MT-Bench and AlpacaEval (the paper's Table 1)", "",
             f"Judge `{table.get('judge_model')}` at {table.get('judge_base_url')}; MT-Bench on "
             f"{table.get('mt_bench_questions')} questions (each turn scored 1–10), AlpacaEval win rate of TLCR "
             f"over each method on {table.get('alpaca_eval_questions')} instructions (ties count half; – : no "
             "TLCR model).", "",
             "| method | MT-Bench turn 1 | MT-Bench turn 2 | MT-Bench average | TLCR win rate (%) | judged (MT / Alpaca) |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        mt, win = row["mt_bench"], row.get("tlcr_win_rate", {})
        judged = f"{mt['judged']} / {win['judged']}" if win else f"{mt['judged']} / –"
        win_text = "(itself)" if name == WINNER else _num(win.get("win_rate"), ".1f")
        lines.append(f"| {row['label']} | {_num(mt['turn_1'], '.2f')} | {_num(mt['turn_2'], '.2f')} | "
                     f"{_num(mt['score'], '.2f')} | {win_text} | {judged} |")
    return lines + [""]


def run_cli(cfg: Config, args, runner: EvalRunner | None = None) -> dict:
    """`tlcr eval judge-table`: command-line flags override the `eval` section, as for the benchmarks."""
    ev = cfg.eval
    ev.judge_base_url = getattr(args, "judge_base_url", None) or ev.judge_base_url
    ev.judge_model = getattr(args, "judge_model", None) or ev.judge_model
    ev.limit = args.limit if getattr(args, "limit", None) is not None else ev.limit
    return judge_table(cfg, runner)
