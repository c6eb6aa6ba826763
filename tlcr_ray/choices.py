"""The allowed values of every enum-like config field, defined once.

    from tlcr_ray.choices import MODES, KL_ESTIMATORS

`tlcr_ray.config` checks each field against these tuples when a YAML file and its `--set` overrides
are read, and the code that acts on a value (rewards, PPO math, DeepSpeed config, ...) imports the
same tuple. Plain Python, no torch: the config module is imported everywhere and must stay light.
"""
from __future__ import annotations

TOKEN_MODES = ("continuous", "fixed", "no_negative", "no_positive")
"""Reward modes computed from the discriminator's p per token (what the HTTP API offers)."""
MODES = TOKEN_MODES + ("sequence",)
"""Every `reward.mode`; `sequence` is the PPO-seq baseline's sequence RM."""
PPO_ALGORITHMS = ("ppo", "remax")
"""`ppo.algorithm`: PPO with a critic, or ReMax (REINFORCE with the greedy response's reward as baseline)."""
METHODS = ("sft", "dpo", "ppo-seq", "remax", "figa", "tlcr-fixed", "tlcr", "tlcr-no-negative", "tlcr-no-positive")
"""`pipeline.methods`: the policies one pipeline trains from the same SFT model and the report compares
(`tlcr_ray/methods.py` maps each to its stage and run folder); the first seven are the paper's Table 1."""
DEFAULT_METHODS = METHODS[:7]
"""The default `pipeline.methods`: SFT, DPO, PPO-seq, ReMax, FIGA, TLCR-fixed and TLCR."""
KL_ESTIMATORS = ("k1", "k3", "full")
"""`ppo.kl_estimator`."""
LR_SCHEDULES = ("constant", "cosine")
"""`sft|disc|rm.lr_schedule` and `ppo.lr_schedule`."""
ROLLOUT_BACKENDS = ("auto", "hf", "vllm")
"""`ppo.rollout_backend` (auto: vLLM when importable)."""
COLOCATE = ("none", "all")
"""`ppo.colocate`: every actor group on its own placement group, or all of them sharing one placement group of
GPU bundles with fractional GPU requests (the rollout sleeps and the learner offloads between phases)."""
WEIGHT_SYNCS = ("auto", "cuda_ipc", "nccl", "shm", "object_store")
"""`ppo.weight_sync`: how learner weights reach the rollout engines (`tlcr_ray.rl.weight_sync`); auto picks
cuda_ipc (colocated on CUDA), nccl (vLLM on other GPUs), shm (same node) or object_store, in that order."""
EVAL_ON_WORKERS = ("auto", "never", "always")
"""`eval.on_workers`: evaluation on Ray GPU workers when the connected cluster has GPUs, never, or always."""
OLD_LOGPROBS = ("learner", "rollout")
"""`ppo.old_logprobs`: who computes the behaviour policy's log-probs PPO's ratio and the KL shaping use."""
FUSE_EVALUATION = ("auto", "off")
"""`ppo.fuse_evaluation`: take a single-pass update's old log-probs and values from its own forward, or never."""
CRITICS = ("separate", "shared")
"""`ppo.critic`: the critic as its own model and engine, or a value head on the policy's last hidden state."""
CRITIC_INITS = ("reward", "policy")
"""`ppo.critic_init`: the run's reward model (discriminator or sequence RM) or the initial policy."""
RESUME = ("auto", "never")
"""`ppo.resume`."""
DTYPES = ("float32", "bfloat16", "float16")
"""`model.dtype`, `serve.dtype`: the one spelling of each weight dtype."""
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
"""Other spellings accepted in a config and normalised to a `DTYPES` name when it is read."""
PRECISIONS = ("fp32", "bf16", "fp16")
"""`sft|disc|rm.precision`: the DeepSpeed precision (the weights are loaded in its dtype)."""
PRECISION_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
"""Dtype spellings accepted for a precision and normalised to a `PRECISIONS` name."""
WEIGHT_DTYPES = dict(zip(PRECISIONS, DTYPES))
"""The dtype the weights are loaded in for each DeepSpeed precision (DeepSpeed keeps fp32 masters)."""
PRECISION_OF_DTYPE = {dtype: precision for precision, dtype in WEIGHT_DTYPES.items()}
"""The DeepSpeed precision that matches weights loaded in a dtype (the PPO learner's `model.dtype`):
float16 weights always train with DeepSpeed fp16 on, i.e. with dynamic loss scaling."""
SEQUENCE_SCORES = ("sum", "mean")
"""`serve.sequence_score`: how /get_reward reduces token rewards."""
REVISERS = ("chosen", "openai")
"""`reviser.kind`."""
ON_BAD_ROW = ("error", "skip")
"""`data.on_bad_row`."""
PARTS = ("sft", "reward", "rl")
"""The data partitions, in order."""
SPLITS = PARTS + ("all",)
"""`data.split`."""
TRUNCATED = ("keep", "penalize")
"""`ppo.truncated`: a response cut at max_response_len is rewarded as it is, or gets missing_eos_penalty."""
GPUS = ("a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb")
"""The top-level `gpu` and `tlcr plan --gpu`: GPU kinds whose memory `tlcr_ray.plan_models` knows."""
EXPORT_ROUNDINGS = ("nearest", "stochastic")
"""`<stage>.export_rounding`, `ppo.export_rounding`: how an fp32 model is rounded into a bfloat16 export
(`tlcr_ray.training.rounding`)."""
EXPORT_DTYPES = ("auto",) + DTYPES
"""`ppo.export_dtype`, `sft|disc|rm.export_dtype`: the dtype a stage's final HF folder is stored in
(auto: the dtype it trained in). Also `ppo.rollout_dtype` (auto: model.dtype)."""
