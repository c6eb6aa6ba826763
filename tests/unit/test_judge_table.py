"""The paper's Table 1 on a run folder (tiny models as three methods), judged by our OpenAI-compatible test
server on 127.0.0.1: MT-Bench per method, TLCR's AlpacaEval win rate over each other method, the report's table."""
from __future__ import annotations

import json
import shutil
import threading

import pytest

from tlcr_ray.config import load_config
from tlcr_ray.eval.benchmarks import REPO_DATA, load_alpaca_reference
from tlcr_ray.eval.judge import pairwise_request
from tlcr_ray.eval.judge_table import judge_table, markdown
from tlcr_ray.testing.openai_server import OpenAITestServer, Reply

MULTI_TURN_MARK = "<|The Start of Assistant A's Conversation with User|>"
ITEMS = 3


def _perturbed_copy(model_dir: str, out, seed: int) -> None:
    """Three different policies (different answers, so no judgment is shared through the cache)."""
    import torch

    from tlcr_ray.models import load_policy, load_tokenizer

    model = load_policy(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5 * seed)
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)


def test_judge_table_per_method_and_rerun_sends_nothing(tmp_path, tiny_model_dir):
    mt_dir = tmp_path / "mt-bench"
    shutil.copytree(REPO_DATA / "mt-bench", mt_dir)
    rows = [json.loads(line) for line in (mt_dir / "question.jsonl").read_text().splitlines()]
    (mt_dir / "question.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["question_id"] in (81, 82)))
    run = tmp_path / "run"
    for seed, folder in enumerate(("sft/model", "dpo/model", "ppo-continuous/model")):  # SFT, DPO and TLCR
        _perturbed_copy(tiny_model_dir, run / folder, seed)
    lock, kinds = threading.Lock(), []

    def judge(body: dict) -> Reply:
        text = next(m["content"] for m in body["messages"] if m["role"] == "user")
        with lock:
            kinds.append("pairwise" if "<reply_A>" in text else "rating")
        if "<reply_A>" in text:
            return Reply(text="Reply A is better. [[A]]")
        return Reply(text="Rating: [[4]]" if MULTI_TURN_MARK in text else "Rating: [[6]]")

    with OpenAITestServer(judge) as srv:
        overrides = [f"output_dir={run}", f"model.base={tiny_model_dir}", "eval.judge_model=test-judge",
                     f"eval.judge_base_url={srv.base_url}", f"eval.mt_bench_dir={mt_dir}", f"eval.limit={ITEMS}",
                     "eval.max_new_tokens=4", "eval.batch_size=4", "eval.max_retries=0", "eval.temperature=1.0"]
        table = judge_table(load_config(None, overrides))
        # MT-Bench: 2 questions x 2 turns x 3 methods; AlpacaEval: ITEMS x (TLCR vs SFT, TLCR vs DPO).
        assert kinds.count("rating") == 12 and kinds.count("pairwise") == 2 * ITEMS

    assert list(table["methods"]) == ["sft", "dpo", "tlcr"]
    assert table["mt_bench_questions"] == 2 and table["alpaca_eval_questions"] == ITEMS
    for row in table["methods"].values():
        assert (row["mt_bench"]["turn_1"], row["mt_bench"]["turn_2"], row["mt_bench"]["score"]) == (6.0, 4.0, 5.0)
    # The judge always prefers reply A: TLCR wins exactly where the seeded order showed it first.
    items = load_alpaca_reference(REPO_DATA / "alpaca-eval" / "gpt4_1106_preview_outputs.json")[:ITEMS]
    first = sum(pairwise_request(i, it["instruction"], "t", "b", "test-judge", 0).meta["model_position"] == "A"
                for i, it in enumerate(items))
    for name in ("sft", "dpo"):
        win = table["methods"][name]["tlcr_win_rate"]
        assert (win["wins"], win["losses"], win["judged"]) == (first, ITEMS - first, ITEMS)
        assert win["win_rate"] == pytest.approx(100 * first / ITEMS, abs=1e-3)
    assert "tlcr_win_rate" not in table["methods"]["tlcr"]
    assert json.loads((run / "eval" / "judge-table.json").read_text())["methods"]["dpo"]["label"] == "DPO"

    lines = "\n".join(markdown(table))
    assert "| DPO | 6.00 | 4.00 | 5.00 |" in lines and "| TLCR | 6.00 | 4.00 | 5.00 | (itself) |" in lines
    assert "on 2 questions" in lines and f"on {ITEMS} instructions" in lines

    with OpenAITestServer(judge) as srv:  # everything is cached: nothing generated or judged twice
        overrides[3] = f"eval.judge_base_url={srv.base_url}"
        again = judge_table(load_config(None, overrides))
        assert srv.request_count == 0
    assert again["methods"] == table["methods"]
