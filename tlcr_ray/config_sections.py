"""The sections of a tlcr config, one dataclass per stage, every field documented where it is declared.

`tlcr_ray.config` assembles them into `Config` and reads YAML into it; import them from there. The
PPO section, the largest, is in `tlcr_ray.config_ppo`.
`choice` and `bounded` fields are checked when a config is read (the allowed values live in
`tlcr_ray.choices`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tlcr_ray.choices import (
    DTYPE_ALIASES,
    DTYPES,
    EVAL_ON_WORKERS,
    EXPORT_DTYPES,
    EXPORT_ROUNDINGS,
    LR_SCHEDULES,
    METHODS,
    MODES,
    ON_BAD_ROW,
    PRECISION_ALIASES,
    PRECISIONS,
    REVISERS,
    SEQUENCE_SCORES,
    SPLITS,
    TOKEN_MODES,
)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


def choice(default: str, choices: tuple[str, ...], aliases: dict[str, str] | None = None):
    """A string field that must be one of `choices` (checked when a config is read); `aliases` are
    other spellings, normalised to their choice at load (so e.g. `bf16` is stored as `bfloat16`)."""
    return field(default=default, metadata={"choices": tuple(choices), "aliases": dict(aliases or {})})


def bounded(default, *, gt: float | None = None, ge: float | None = None, le: float | None = None):
    """A number field checked against bounds when a config is read (`gt`: >, `ge`: >=, `le`: <=)."""
    return field(default=default, metadata={"gt": gt, "ge": ge, "le": le})


@dataclass
class DataConfig:
    path: str = "data/hh-rlhf/harmless-base/test.jsonl.gz"
    """Preference pairs: local .jsonl/.jsonl.gz/.parquet with `chosen`/`rejected`, or `hf:<hub id>`."""
    hub_split: str = "test"
    """Split of the hub dataset when `path` is `hf:<id>`."""
    split: str = choice("reward", SPLITS)
    """Partition a stage reads: sft, reward, rl or all (each stage overrides its own default)."""
    fractions: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.4])
    """SFT / reward / RL shares of the pairs (docs/algorithm.md §1: 20/40/40)."""
    seed: int = 0
    """Seed of the deterministic partition."""
    max_pairs: int | None = None
    """Keep only the first N pairs of the chosen partition (None: all)."""
    on_bad_row: str = choice("error", ON_BAD_ROW)
    """`error`: stop naming file, line and field; `skip`: count the reason in the summary."""


@dataclass
class ModelConfig:
    base: str = EMBEDDED_MODEL
    """Policy base: a local HF folder, a hub id, or the embedded SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (None: the base model's)."""
    dtype: str = choice("float32", DTYPES, DTYPE_ALIASES)
    """float32, bfloat16 or float16 (CPU runs want float32); fp32/bf16/fp16 are read as these names. The PPO
    learner trains in the matching DeepSpeed precision (float16: fp16 with dynamic loss scaling)."""
    max_prompt_len: int = 256
    """Prompts are left-truncated to this many tokens."""
    max_response_len: int = 256
    """Responses are truncated (training) or generation stops (rollout) at this many tokens."""


@dataclass
class ReviserConfig:
    kind: str = choice("chosen", REVISERS)
    """`chosen` (offline: the chosen response is the revision) or `openai` (any OpenAI-compatible API)."""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 for a vLLM server (None: OpenAI)."""
    model: str = "gpt-4o-mini"
    """Model name sent to the API."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable that holds the API key; the key is never written anywhere."""
    max_concurrency: int = 16
    """Requests in flight at once."""
    max_edit_ratio: float = bounded(0.6, ge=0.0, le=1.0)
    """Reject a revision whose token edit count / max(len) exceeds this (a rewrite, not an edit). Decided
    from the cached reply on every run: changing it re-decides every pair without a new request."""
    timeout_s: float = 60.0
    """Per-request timeout."""
    max_retries: int = 5
    """Retries on 429/5xx/timeouts/connection errors (exponential backoff, honours Retry-After)."""
    temperature: float = 0.0
    max_tokens: int = 1024
    """Completion token limit; a revision cut by it (`finish_reason == "length"`) is rejected."""


@dataclass
class TrainConfig:
    """One supervised stage (SFT, discriminator or RM) on Ray Train + DeepSpeed."""

    init_from: str | None = None
    """Start from this model folder (None: the stage's default, e.g. the SFT output for the discriminator)."""
    epochs: float = 1.0
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run the epochs)."""
    lr: float = 1e-5
    lr_schedule: str = choice("cosine", LR_SCHEDULES)
    """constant or cosine."""
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    micro_batch_size: int = 4
    """Sequences per worker per forward."""
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (HF `gradient_checkpointing_enable`,
    non-reentrant; on a head model's backbone): the layers keep only their inputs, ~1/3 more compute."""
    offload_optimizer: bool = False
    """DeepSpeed ZeRO-Offload: fp32 master weights, gradients' fp32 partition and Adam states live in host
    RAM and the step runs on the CPU (ZeRO 1-3)."""
    offload_params: bool = False
    """DeepSpeed ZeRO-Infinity parameter offload to host RAM (needs zero_stage 3)."""
    max_len: int = 512
    """Prompt + response tokens per sequence (prompt left-truncated first)."""
    zero_stage: int = 2
    precision: str = choice("fp32", PRECISIONS, PRECISION_ALIASES)
    """fp32, bf16 or fp16 (float32/bfloat16/float16 are read as these names); the weights are loaded in the
    matching dtype, and fp16 trains with DeepSpeed's dynamic loss scaling."""
    num_workers: int = 1
    """Ray Train data-parallel workers."""
    use_gpu: bool = False
    cpus_per_worker: int = 1
    checkpoint_every: int = bounded(50, ge=1)
    """Optimizer steps between Ray Train checkpoints (the resumable DeepSpeed state: weights, optimizer,
    schedule); the last step always writes one."""
    keep_checkpoints: int = bounded(2, ge=1)
    """Ray Train checkpoints kept (the newest); older ones are deleted as new ones land."""
    export_every: int = bounded(0, ge=0)
    """Optimizer steps between HF exports of the model into `<stage>/model` (replaced each time, with
    `tlcr_export.json` naming the step); 0: only the final one."""
    keep_resume_state: bool = False
    """Keep the resumable DeepSpeed state (`<stage>/ray`, ~8 bytes of optimizer state per parameter)
    after the stage finishes; false deletes it once the final model is written (a rerun of a finished
    stage then only reports it)."""
    export_dtype: str = choice("auto", EXPORT_DTYPES, DTYPE_ALIASES)
    """Dtype of the exported HF folder: auto (as trained) or float32/bfloat16/float16 (bfloat16 halves
    an fp32 folder; later stages load it into their own dtype)."""
    export_rounding: str = choice("nearest", EXPORT_ROUNDINGS)
    """How an fp32 model becomes a bfloat16 export: `nearest`, or `stochastic` (up or down with the
    probability that keeps each weight's expected value): a short fine-tune whose steps are below half a
    bf16 step survives it, where nearest rounds it back to the start (`tlcr_ray.training.rounding`)."""
    bucket_mib: float = bounded(256.0, gt=0.0)
    """ZeRO-3 export: MiB gathered at a time (one bucket; a larger single tensor is its own bucket)."""
    eval_fraction: float = 0.1
    """Held-out share of the stage's pairs for evaluation."""
    seed: int = 0
    max_grad_norm: float = 1.0
    max_failures: int = 1
    """Worker crashes Ray Train recovers from (restarting from the latest checkpoint)."""
    labels_path: str | None = None
    """Discriminator only: token labels JSONL (None: `<output_dir>/label/labels.jsonl`)."""
    rejected_fraction: float = bounded(0.0, ge=0.0, le=1.0)
    """SFT only: share of the SFT pairs (picked by a seeded hash of the pair id) whose rejected response is
    the training target instead of the chosen one: a known bad habit for PPO to remove (the planted
    benchmark, configs/planted.yaml). 0: the paper's SFT on chosen responses."""


@dataclass
class DPOConfig(TrainConfig):
    """The DPO baseline (Rafailov et al., 2023) on the reward partition's pairs; docs/algorithm.md §10."""

    beta: float = bounded(0.1, gt=0.0)
    """beta of the DPO loss -log sigmoid(beta * ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)))."""
    max_pairs: int | None = bounded(None, ge=1)
    """Use only the first N pairs of the reward partition, train and held-out together (None: all). The
    reference log-probs are computed for every pair used, once, before training."""


@dataclass
class FIGAConfig(TrainConfig):
    """The FIGA baseline (Guo et al., ICLR 2024) on the Levenshtein labels; docs/algorithm.md §10. The
    defaults are the released code's (RUCAIBox/FIGA, modeling_llama.py)."""

    alpha: float = bounded(1.0, ge=0.0)
    """Weight of the revised response's added/substituted tokens (label 1) and of its final EOS."""
    beta: float = bounded(0.5, ge=0.0)
    """Weight of the unlikelihood term on the rejected response's deleted/substituted tokens (label 0)."""
    gamma: float = bounded(0.0, ge=0.0)
    """Weight of the revised response's unchanged tokens (label 0.5); the rejected side's unchanged tokens get 0."""
    bad_token_max_ce: float | None = bounded(0.6, gt=0.0)
    """A rejected token is penalised only while the policy's cross-entropy on it is at most this (i.e. its
    probability is at least exp(-0.6) = 0.55), as the released code; None: always."""


@dataclass
class RewardConfig:
    mode: str = choice("continuous", MODES)
    """continuous (2p-1), fixed (+1/-1/0 by thresholds), no_negative, no_positive, or sequence (RM baseline)."""
    fixed_pos_threshold: float = 0.6
    fixed_neg_threshold: float = 0.4
    sequence_clip: float = 5.0
    """The sequence baseline's RM score is clipped to +-this."""
    discriminator: str | None = None
    """Discriminator folder (None: `<output_dir>/disc/model`)."""
    reward_model: str | None = None
    """Sequence RM folder for `sequence` mode (None: `<output_dir>/rm/model`)."""


@dataclass
class ServeConfig:
    checkpoint: str | None = None
    """Discriminator folder (None: `<output_dir>/disc/model`)."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_items: int = 64
    """Items (or /get_reward queries) per request; more is a 422."""
    max_chars: int = 20000
    """Characters per text field (prompt, response, query); more is a 422."""
    max_tokens: int = 1024
    """Tokens per item (prompt + response, no truncation); more is a 413."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Request body size; more is a 413 before any parsing."""
    max_batch_size: int = 16
    """Items per `@serve.batch` call."""
    forward_micro_batch_size: int | None = bounded(None, ge=1)
    """Items per forward pass within a batch (None: the whole batch at once); use_cache is always off."""
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 64
    """Items in flight per scorer replica; must be >= max_batch_size or batches are capped by it."""
    sequence_score: str = choice("sum", SEQUENCE_SCORES)
    """How /get_reward reduces token rewards to one score: sum or mean."""
    mode: str = choice("continuous", TOKEN_MODES)
    """Token-reward mode of /get_reward: continuous, fixed, no_negative or no_positive."""
    dtype: str = choice("float32", DTYPES, DTYPE_ALIASES)
    api_key_env: str = "TLCR_API_KEY"
    """Environment variable (in the serving processes) holding the bearer token; unset: no auth."""
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 32.0
    """Autoscaling target: items in flight per scorer replica."""
    num_cpus: float | None = bounded(None, gt=0)
    """CPUs per scorer replica: both its Ray reservation and its torch thread count (a fraction runs
    1 thread). None (auto): every core of the machine when Ray runs on one node (`tlcr serve` on a
    laptop or a CPU box), capped by that node's Ray CPUs and divided by max_replicas; 1 on a
    multi-node cluster, where you should size it to your worker nodes."""
    num_gpus: float = 0.0
    """GPUs per scorer replica (> 0 puts the model on cuda)."""


@dataclass
class EvalConfig:
    """`tlcr eval ...` and the report's model work: where it runs (`on_workers`), then, for MT-Bench and
    AlpacaEval, answer generation and an OpenAI-compatible judge."""

    on_workers: str = choice("auto", EVAL_ON_WORKERS)
    """Where evaluation runs (held-out disc/RM/DPO metrics, the report's Figure 6 table and heat-map, MT-Bench
    and AlpacaEval answers). `auto`: in Ray tasks/actors on GPU workers (eval.num_gpus each, the model's
    dtype, ppo.rollout_backend for sampling: vLLM) when the connected cluster (RAY_ADDRESS, or the Ray the
    pipeline started) has GPUs, else in the driver on its CPU with HF `generate`; `never`: always the
    driver; `always`: workers even without GPUs in the cluster (with eval.num_gpus=0: CPU workers)."""
    num_gpus: float = bounded(1.0, ge=0.0)
    """GPUs of each evaluation task/actor on a worker (one policy engine plus the discriminator and RM)."""
    num_cpus: float = bounded(1.0, gt=0.0)
    """CPUs of each evaluation task/actor on a worker (its torch threads on a CPU worker)."""
    vllm_memory_utilization: float = bounded(0.4, gt=0.0, le=1.0)
    """Share of a worker's GPU the evaluation's vLLM engine takes (weights + KV cache); the discriminator and
    RM, loaded beside it for the Figure 6 table, need the rest (`ppo.vllm_kv_cache_gib`, when set, wins)."""

    model: str | None = None
    """Model folder to evaluate (the CLI's --model wins)."""
    judge_base_url: str | None = None
    """OpenAI-compatible judge endpoint (None: OpenAI)."""
    judge_model: str = "gpt-4"
    """Judge model name (the MT-Bench and TLCR papers use GPT-4)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable that holds the judge's API key; the key is never written anywhere."""
    max_concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    """The SDK's own retries on 429/5xx/timeouts (exponential backoff, honours Retry-After)."""
    judge_max_tokens: int = 2048
    max_new_tokens: int = 512
    """Answer length limit per turn."""
    batch_size: int = 8
    temperature: float = 0.0
    """0: greedy decoding."""
    limit: int | None = None
    """Evaluate only the first N questions (the CLI's --limit wins)."""
    mt_bench_dir: str | None = None
    """MT-Bench folder (None: the copy in the repo's data/mt-bench)."""
    alpaca_reference: str | None = None
    """AlpacaEval reference outputs (None: data/alpaca-eval/gpt4_1106_preview_outputs.json)."""
    seed: int = 0
    """Seeds the A/B order of the pairwise judge (and sampling when temperature > 0)."""


@dataclass
class PipelineConfig:
    """`tlcr pipeline`: every stage from one config; a stage whose output exists is skipped."""

    methods: list[str] | None = field(default=None, metadata={"choices": METHODS, "aliases": {}})
    """The policies to train from the same SFT model and compare (None: the paper's seven, sft, dpo,
    ppo-seq, remax, figa, tlcr-fixed, tlcr; also tlcr-no-negative, tlcr-no-positive). Each maps to a stage (`tlcr_ray/methods.py`): ppo-seq is PPO
    with reward.mode=sequence, remax is ppo.algorithm=remax, tlcr-fixed / tlcr are PPO with fixed /
    continuous token rewards; sft, dpo and figa are supervised stages."""
    ppo_modes: list[str] | None = field(default=None, metadata={"choices": MODES, "aliases": {}})
    """The older spelling: reward modes of plain PPO runs. Set alone, the pipeline runs SFT and these
    PPO runs only; set with `methods`, it must name exactly the methods' PPO modes (else a load error).
    After loading it always holds the modes `methods` implies."""
    eval_prompts: int = 16
    """Held-out RL prompts for the report's reward table (SFT vs each PPO policy)."""
    eval_seeds: list[int] = field(default_factory=lambda: [0])
    """Sampling seeds of the report's reward table."""
    heatmap_samples: int = 4
    """Responses (and labelled pairs) shown in the HTML token heat-map."""
