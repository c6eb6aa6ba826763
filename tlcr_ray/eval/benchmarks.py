"""Benchmark evaluation: MT-Bench (single-answer grading, 1-10) and AlpacaEval (pairwise win rate
against reference outputs) with any OpenAI-compatible judge.

    tlcr eval mt-bench    --model runs/demo/ppo-continuous/model --judge-model gpt-4
    tlcr eval alpaca-eval --model runs/demo/sft/model --judge-base-url http://127.0.0.1:8000/v1 \
                          --judge-model my-judge --limit 50

Answers are generated in batches, greedy by default, through the tokenizer's chat template, or, for a
base model without one (Llama-2-7b-hf), the HH-RLHF dialogue format the policy was trained on
(`eval.answers`); MT-Bench's second turn is conditioned on the model's own first answer. Where: HF
`generate` on the driver's CPU, or, on a cluster with GPUs (`eval.on_workers`), a Ray actor on a GPU
worker with the rollout backend (`ppo.rollout_backend`, vLLM) in the model's dtype (`eval.runner`,
`actors/evaluation.py`). Each finished
batch is appended to `<output_dir>/eval/<bench>/answers.jsonl` and each judgment to
`.../judgments.jsonl` (see judge.py), so a rerun generates and judges nothing twice and retries
only failed judgments. Results go to `<output_dir>/eval/<bench>.json`.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from tqdm import tqdm

from tlcr_ray.config import Config, ConfigError, EvalConfig
from tlcr_ray.eval.answers import chat_prompt, eval_engine_kwargs
from tlcr_ray.eval.judge import (
    DEFAULT_BASE_URL,
    MT_BENCH_REF_CATEGORIES,
    judge_all,
    judge_api_key,
    load_templates,
    mt_bench_requests,
    pairwise_request,
)
from tlcr_ray.eval.runner import AnswerEngine, EvalRunner, LocalRunner
from tlcr_ray.io import KeyedJsonl, iter_jsonl, read_json, write_json_atomic
from tlcr_ray.layout import REPO_ROOT, RunLayout

REPO_DATA = REPO_ROOT / "data"
BENCHES = ("mt-bench", "alpaca-eval")


# ---------------------------------------------------------------- data

def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    return list(iter_jsonl(path))


def load_mt_bench(folder: str | Path) -> tuple[list[dict], dict[int, list[str]], dict[str, dict]]:
    """-> (questions, GPT-4 reference answers {question_id: [turn 1, turn 2]}, judge templates)."""
    folder = Path(folder)
    questions = []
    for lineno, row in _read_jsonl(folder / "question.jsonl"):
        turns = row.get("turns")
        if not isinstance(row.get("question_id"), int) or not isinstance(row.get("category"), str) \
                or not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, str) for t in turns)):
            raise ValueError(f"{folder / 'question.jsonl'}:{lineno}: needs question_id (int), category (str) "
                             "and turns (two strings)")
        questions.append(row)
    references = {}
    for lineno, row in _read_jsonl(folder / "reference_answer" / "gpt-4.jsonl"):
        try:
            references[row["question_id"]] = row["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{folder / 'reference_answer' / 'gpt-4.jsonl'}:{lineno}: "
                             "needs question_id and choices[0].turns") from None
    return questions, references, load_templates(folder / "judge_prompts.jsonl")


def load_alpaca_reference(path: str | Path) -> list[dict]:
    """AlpacaEval model_outputs.json: a JSON array of {instruction, output, generator, dataset}."""
    path = Path(path)
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of records")
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str)):
            raise ValueError(f"{path}: record {i} needs string fields instruction and output")
    return rows


# ---------------------------------------------------------------- generation

def model_fingerprint(model_dir: str) -> str:
    """Folder path plus size and mtime of its files: a model retrained into the same folder is answered afresh."""
    folder = Path(model_dir).resolve()
    parts = [str(folder)] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                             for p in sorted(folder.iterdir()) if p.is_file()]
    return hashlib.sha1("\n".join(parts).encode("utf-8")).hexdigest()


class AnswerGenerator:
    """Chat answers of one model, cached by (model fingerprint, messages, decoding settings).

    The model is loaded (by `runner`: here, or on a GPU worker, `tlcr_ray.eval.runner`) only when some
    answer is missing from the cache; each finished batch is appended to the cache as it comes back.
    """

    def __init__(self, model_dir: str, cfg: EvalConfig, cache: KeyedJsonl, dtype: str = "float32",
                 runner: EvalRunner | None = None, engine_kwargs: dict | None = None):
        self.model_dir, self.cfg, self.cache, self.dtype = model_dir, cfg, cache, dtype
        self.runner, self.engine_kwargs = runner or LocalRunner(), engine_kwargs or {}
        self.fingerprint = model_fingerprint(model_dir)
        self.engine: AnswerEngine | None = None
        self.tokenizer = None

    def key(self, messages: list[dict]) -> str:
        blob = json.dumps([self.fingerprint, messages, self.cfg.max_new_tokens, self.cfg.temperature,
                           self.cfg.seed if self.cfg.temperature > 0 else None], ensure_ascii=False)
        return hashlib.sha1(blob.encode("utf-8")).hexdigest()

    def answer(self, conversations: list[list[dict]], desc: str) -> list[dict]:
        """Conversations ending with a user turn -> cache rows {answer, finish_reason, ...}, in order."""
        keys = [self.key(c) for c in conversations]
        missing = {k: c for k, c in zip(keys, conversations) if k not in self.cache.rows}
        if missing:
            if self.engine is None:
                from tlcr_ray.models import load_tokenizer

                self.tokenizer = load_tokenizer(self.model_dir)  # the prompts are rendered here, the answers there
                self.engine = self.runner.answer_engine(self.model_dir, self.dtype, self.cfg, self.engine_kwargs)
            prompts = {k: chat_prompt(self.tokenizer, c) for k, c in missing.items()}
            # Similar lengths in one batch waste less compute on padding.
            order = sorted(prompts, key=lambda k: len(prompts[k]))
            batches = [order[start:start + self.cfg.batch_size] for start in range(0, len(order), self.cfg.batch_size)]
            with tqdm(total=len(order), desc=desc, unit="answer") as bar:
                for batch, answers in zip(batches, self.engine.stream([prompts[k] for k in b] for b in batches)):
                    for key, (text, finish) in zip(batch, answers):
                        self.cache.add({"key": key, "model": self.model_dir, "messages": missing[key],
                                        "answer": text, "finish_reason": finish})
                    bar.update(len(batch))
        return [self.cache.rows[k] for k in keys]

    def close(self) -> None:
        """Free the model (on a worker: its GPU)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None


# ---------------------------------------------------------------- summaries

def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _errors(rows: list[dict], id_fields: tuple[str, ...]) -> list[dict]:
    return [{**{f: r.get(f) for f in id_fields}, "reason": r["reason"]} for r in rows if r["status"] != "ok"]


def mt_bench_summary(rows: list[dict]) -> dict:
    """Judgment rows -> mean score overall, per turn and per category (errors left out of the means)."""
    ok = [r for r in rows if r["status"] == "ok"]

    def scores(category: str | None = None, turn: int | None = None) -> list[float]:
        return [r["score"] for r in ok if (category is None or r["category"] == category)
                and (turn is None or r["turn"] == turn)]

    categories = sorted({r["category"] for r in rows})
    errors = _errors(rows, ("question_id", "turn"))
    return {
        "score": _mean(scores()), "turn_1": _mean(scores(turn=1)), "turn_2": _mean(scores(turn=2)),
        "by_category": {c: {"score": _mean(scores(c)), "turn_1": _mean(scores(c, 1)), "turn_2": _mean(scores(c, 2)),
                            "judged": len(scores(c))} for c in categories},
        "judged": len(ok), "judge_errors": len(errors), "complete": not errors, "errors": errors,
    }


def win_rate_summary(rows: list[dict]) -> dict:
    """Pairwise rows -> win rate of the model over the reference in % (ties count half) and its std error."""
    outcomes = [{"model": 1.0, "tie": 0.5, "reference": 0.0}[r["winner"]] for r in rows if r["status"] == "ok"]
    n = len(outcomes)
    mean = sum(outcomes) / n if n else None
    stderr = math.sqrt(sum((x - mean) ** 2 for x in outcomes) / (n - 1) / n) if n > 1 else None
    errors = _errors(rows, ("item",))
    return {
        "win_rate": round(100 * mean, 4) if mean is not None else None,
        "stderr": round(100 * stderr, 4) if stderr is not None else None,
        "wins": outcomes.count(1.0), "losses": outcomes.count(0.0), "ties": outcomes.count(0.5),
        "model_shown_first": sum(r["model_position"] == "A" for r in rows),
        "judged": n, "judge_errors": len(errors), "complete": not errors, "errors": errors,
    }


# ---------------------------------------------------------------- the two benchmarks

def _limited(items: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise ConfigError(f"eval.limit: must be >= 1, got {limit}")
    return items[:limit] if limit else items


def _generator(cfg: Config, model_dir: str, bench: str, runner: EvalRunner | None) -> AnswerGenerator:
    cache = KeyedJsonl(RunLayout.of(cfg).bench(bench).dir / "answers.jsonl")
    # The model's own context: MT-Bench's second turn holds the first answer.
    return AnswerGenerator(model_dir, cfg.eval, cache, cfg.model.dtype, runner, eval_engine_kwargs(cfg, None))


def run_mt_bench(cfg: Config, model_dir: str, result_path: Path | None = None,
                 runner: EvalRunner | None = None) -> dict:
    """MT-Bench of one model -> its result, also written to `result_path` (default eval/mt-bench.json).
    `runner`: where the answers are generated (None: here)."""
    ev, layout = cfg.eval, RunLayout.of(cfg)
    base_url = ev.judge_base_url or DEFAULT_BASE_URL
    judge_api_key(ev, base_url)  # a missing key fails now, not after an hour of generation
    questions, references, templates = load_mt_bench(ev.mt_bench_dir or REPO_DATA / "mt-bench")
    questions = _limited(questions, ev.limit)
    gen = _generator(cfg, model_dir, "mt-bench", runner)
    try:
        first = gen.answer([[{"role": "user", "content": q["turns"][0]}] for q in questions], "mt-bench turn 1")
        second = gen.answer([[{"role": "user", "content": q["turns"][0]},
                              {"role": "assistant", "content": a["answer"]},
                              {"role": "user", "content": q["turns"][1]}] for q, a in zip(questions, first)],
                            "mt-bench turn 2")
    finally:
        gen.close()
    requests = []
    for q, a1, a2 in zip(questions, first, second):
        reference = (references.get(q["question_id"]) or q.get("reference")) \
            if q["category"] in MT_BENCH_REF_CATEGORIES else None
        requests += mt_bench_requests(q, [a1["answer"], a2["answer"]], templates, reference, ev.judge_model)
    records = judge_all(requests, layout.bench("mt-bench").dir / "judgments.jsonl", ev, ev.judge_model, ev.judge_base_url)
    summary = mt_bench_summary([records[r.key] for r in requests])
    truncated = sum(a["finish_reason"] == "length" for a in first + second)
    return _write_result(result_path or layout.bench("mt-bench").result, "mt-bench", cfg, model_dir, len(questions),
                         truncated, summary)


def run_alpaca_eval(cfg: Config, model_dir: str, runner: EvalRunner | None = None) -> dict:
    ev, layout = cfg.eval, RunLayout.of(cfg)
    base_url = ev.judge_base_url or DEFAULT_BASE_URL
    judge_api_key(ev, base_url)
    reference_path = ev.alpaca_reference or REPO_DATA / "alpaca-eval" / "gpt4_1106_preview_outputs.json"
    items = _limited(load_alpaca_reference(reference_path), ev.limit)
    gen = _generator(cfg, model_dir, "alpaca-eval", runner)
    try:
        answers = gen.answer([[{"role": "user", "content": it["instruction"]}] for it in items], "alpaca-eval")
    finally:
        gen.close()
    requests = [pairwise_request(i, it["instruction"], a["answer"], it["output"], ev.judge_model, ev.seed)
                for i, (it, a) in enumerate(zip(items, answers))]
    records = judge_all(requests, layout.bench("alpaca-eval").dir / "judgments.jsonl", ev, ev.judge_model, ev.judge_base_url)
    summary = win_rate_summary([records[r.key] for r in requests])
    summary["reference"] = str(reference_path)
    summary["mean_answer_chars"] = _mean([len(a["answer"]) for a in answers])
    truncated = sum(a["finish_reason"] == "length" for a in answers)
    return _write_result(layout.bench("alpaca-eval").result, "alpaca-eval", cfg, model_dir, len(items), truncated, summary)


def _write_result(path: Path, bench: str, cfg: Config, model_dir: str, questions: int, truncated: int,
                  summary: dict) -> dict:
    ev = cfg.eval
    result = {"bench": bench, "model": model_dir, "judge_model": ev.judge_model,
              "judge_base_url": ev.judge_base_url or DEFAULT_BASE_URL, "questions": questions,
              "generation": {"max_new_tokens": ev.max_new_tokens, "temperature": ev.temperature,
                             "answers_cut_at_max_new_tokens": truncated},
              **summary}
    write_json_atomic(path, result)
    return result


def evaluate(bench: str, cfg: Config, model: str, runner: EvalRunner | None = None) -> dict:
    from tlcr_ray.models import resolve_model

    runners = {"mt-bench": run_mt_bench, "alpaca-eval": run_alpaca_eval}
    if bench not in runners:
        raise ConfigError(f"unknown benchmark {bench!r}; expected one of {', '.join(BENCHES)}")
    return runners[bench](cfg, resolve_model(model), runner=runner)


def run_cli(cfg: Config, args, runner: EvalRunner | None = None) -> dict:
    """`tlcr eval mt-bench|alpaca-eval`: command-line flags override the `eval` config section; `runner`
    (the CLI's choice, `eval.runner`): where the answers are generated."""
    ev = cfg.eval
    ev.judge_base_url = args.judge_base_url or ev.judge_base_url
    ev.judge_model = args.judge_model or ev.judge_model
    ev.limit = args.limit if args.limit is not None else ev.limit
    model = args.model or ev.model
    if not model:
        raise ConfigError("eval: no model to evaluate; pass --model DIR or set eval.model")
    result = evaluate(args.target, cfg, model, runner)
    result.pop("errors", None)  # the per-item list stays in the results file; the console gets the figures
    return result
