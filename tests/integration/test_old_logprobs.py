"""ppo.old_logprobs rollout: the HF engine's sampling log-probs are the learner's own (so the learner may
skip its policy forward), the values-only evaluation matches the full one, and the config refuses the
settings where they would not be.

    .venv/bin/python -m pytest tests/integration/test_old_logprobs.py -q
"""
from __future__ import annotations

import pytest
import torch

from tlcr_ray.config import ConfigError, PPOConfig, load_config
from tlcr_ray.rl.loop_state import response_mask, rollout_logprobs


def test_the_hf_engines_sampling_logprobs_are_the_learners(tiny_model_dir, head_models, tokenizer, learner_rdzv):
    from tlcr_ray.rl.learner import PPOLearner
    from tlcr_ray.rl.rollout import make_engine

    engine = make_engine("hf", tiny_model_dir, dtype="float32")
    prompts = [[3000 + i for i in range(n)] for n in (5, 3, 7, 4)]  # ragged: left padding in the learner's pack
    batch = engine.generate(prompts, max_new_tokens=12, temperature=0.7, top_p=1.0, seed=3)
    learner = PPOLearner(tiny_model_dir, PPOConfig(temperature=0.7, mini_batch_size=4, prompts_per_step=4),
                         rank=0, world_size=1, init_method=learner_rdzv, critic_dir=head_models["disc"])
    full = learner.evaluate(batch, tokenizer.pad_token_id)
    mask = response_mask(batch.response_ids, full["logprobs"].shape[1])
    sampled = rollout_logprobs(batch.logprobs, mask)
    assert mask.sum() > 8 and sampled.abs().sum() > 0
    assert torch.allclose(sampled, full["logprobs"], atol=1e-5), (sampled - full["logprobs"]).abs().max()
    values_only = learner.evaluate(batch, tokenizer.pad_token_id, policy=False)
    assert set(values_only) == {"values", "seconds"}
    assert torch.equal(values_only["values"], full["values"])


def test_rollout_logprobs_pads_rows_and_refuses_non_finite_ones():
    mask = response_mask([[1, 2, 3], [4]], 3)
    assert rollout_logprobs([[-1.0, -2.0, -3.0], [-0.5]], mask).tolist() == [[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]]
    with pytest.raises(ValueError, match="non-finite"):
        rollout_logprobs([[-1.0, float("nan"), -3.0], [-0.5]], mask)


@pytest.mark.parametrize("override, named", [
    ("ppo.rollout_backend=vllm", "ppo.rollout_backend=vllm"),
    ("ppo.rollout_dtype=bfloat16", "ppo.rollout_dtype=bfloat16"),
    ("ppo.kl_estimator=full", "ppo.kl_estimator=full"),
])
def test_rollout_logprobs_are_refused_where_the_engine_computes_other_numbers(override, named):
    with pytest.raises(ConfigError, match=f"ppo.old_logprobs=rollout.*{named}"):
        load_config(None, ["ppo.old_logprobs=rollout", "ppo.rollout_backend=hf", override])
    assert load_config(None, ["ppo.old_logprobs=rollout", "ppo.rollout_backend=hf"]).ppo.old_logprobs == "rollout"
