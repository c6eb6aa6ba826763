"""Typed configuration for every tlcr stage, loaded from one YAML file.

    cfg = load_config("configs/demo.yaml", overrides=["ppo.steps=3", "reviser.kind=openai"])

Each stage reads its own section; `output_dir` is the run folder every stage writes into.
Unknown keys and wrongly typed values are errors that name the file and the dotted key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


@dataclass
class DataConfig:
    path: str = "data/hh-rlhf/harmless-base/test.jsonl.gz"
    """Preference pairs: local .jsonl/.jsonl.gz/.parquet with `chosen`/`rejected`, or `hf:<hub id>`."""
    hub_split: str = "test"
    """Split of the hub dataset when `path` is `hf:<id>`."""
    split: str = "reward"
    """Partition a stage reads: sft, reward, rl or all (each stage overrides its own default)."""
    fractions: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.4])
    """SFT / reward / RL shares of the pairs (docs/algorithm.md §1: 20/40/40)."""
    seed: int = 0
    """Seed of the deterministic partition."""
    max_pairs: int | None = None
    """Keep only the first N pairs of the chosen partition (None: all)."""
    on_bad_row: str = "error"
    """`error`: stop naming file, line and field; `skip`: count the reason in the summary."""


@dataclass
class ModelConfig:
    base: str = EMBEDDED_MODEL
    """Policy base: a local HF folder, a hub id, or the embedded SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (None: the base model's)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16 (CPU runs want float32)."""
    max_prompt_len: int = 256
    """Prompts are left-truncated to this many tokens."""
    max_response_len: int = 256
    """Responses are truncated (training) or generation stops (rollout) at this many tokens."""


@dataclass
class ReviserConfig:
    kind: str = "chosen"
    """`chosen` (offline: the chosen response is the revision) or `openai` (any OpenAI-compatible API)."""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 for a vLLM server (None: OpenAI)."""
    model: str = "gpt-4o-mini"
    """Model name sent to the API."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable that holds the API key; the key is never written anywhere."""
    max_concurrency: int = 16
    """Requests in flight at once."""
    max_edit_ratio: float = 0.6
    """Reject a revision whose token edit count / max(len) exceeds this (a rewrite, not an edit)."""
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
    lr_schedule: str = "cosine"
    """constant or cosine."""
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    micro_batch_size: int = 4
    """Sequences per worker per forward."""
    grad_accum: int = 1
    max_len: int = 512
    """Prompt + response tokens per sequence (prompt left-truncated first)."""
    zero_stage: int = 2
    precision: str = "fp32"
    """fp32, bf16 or fp16."""
    num_workers: int = 1
    """Ray Train data-parallel workers."""
    use_gpu: bool = False
    cpus_per_worker: int = 1
    checkpoint_every: int = 50
    """Optimizer steps between Ray Train checkpoints."""
    keep_checkpoints: int = 2
    eval_fraction: float = 0.1
    """Held-out share of the stage's pairs for evaluation."""
    seed: int = 0
    max_grad_norm: float = 1.0
    max_failures: int = 1
    """Worker crashes Ray Train recovers from (restarting from the latest checkpoint)."""
    labels_path: str | None = None
    """Discriminator only: token labels JSONL (None: `<output_dir>/label/labels.jsonl`)."""


@dataclass
class RewardConfig:
    mode: str = "continuous"
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
class GroupResources:
    """Resources of one actor group; a CPU config runs every group on a laptop."""

    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources (e.g. {"worker_node": 1}) to pin a group to a node type."""


@dataclass
class PPOConfig:
    steps: int = 20
    """PPO iterations (one rollout batch each)."""
    prompts_per_step: int = 8
    policy: str | None = None
    """Initial policy folder (None: `<output_dir>/sft/model`)."""
    kl_coef: float = 0.1
    kl_estimator: str = "k1"
    """Per-token KL_t in R_t = r_t - kl_coef * KL_t: k1 (log pi - log pi_ref of the sampled token),
    k3 (exp(-k1) - 1 + k1, non-negative), or full (sum over the vocabulary of pi (log pi - log pi_ref)
    from both models' logits at each response position; moves [batch, R, vocab] tensors per step)."""
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    ppo_epochs: int = 1
    mini_batch_size: int = 8
    actor_lr: float = 1e-6
    critic_lr: float = 1e-6
    temperature: float = 1.0
    top_p: float = 0.9
    rollout_backend: str = "auto"
    """vllm, hf, or auto (vLLM when importable)."""
    vllm_tensor_parallel: int = 1
    vllm_memory_utilization: float = 0.5
    threads_per_actor: int = 0
    """torch/OMP threads in each PPO actor (0: Ray's default, the actor's num_cpus). The loop's stages
    run mostly one after another, so on a small CPU machine every actor may use all cores."""
    vllm_kv_cache_gib: float | None = None
    """Fixed vLLM KV-cache size (GiB); None: vllm_memory_utilization of the device (RAM on CPU)."""
    zero_stage: int = 2
    max_grad_norm: float = 1.0
    entropy_coef: float = 0.0
    """Entropy bonus in the policy loss (the paper uses none)."""
    whiten_advantages: bool = True
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    sync_check: bool = True
    """After a weight sync, compare the rollout's log-probs of one sequence with the learner's (logged as
    sync_logprob_err / sync_logprob_change; three extra forwards)."""
    sync_check_every: int = 10
    """The sync check runs after the first step's sync and then after every Nth step (1: every step)."""
    resume: str = "auto"
    """auto (continue from the last checkpoint if any) or never."""
    max_failures: int = 3
    """Actor losses survived by recreating the group and resuming from the last checkpoint."""
    seed: int = 0
    rollout: GroupResources = field(default_factory=GroupResources)
    reward: GroupResources = field(default_factory=GroupResources)
    reference: GroupResources = field(default_factory=GroupResources)
    learner: GroupResources = field(default_factory=GroupResources)


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
    """Items per forward pass (`@serve.batch`)."""
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 64
    """Items in flight per scorer replica; must be >= max_batch_size or batches are capped by it."""
    sequence_score: str = "sum"
    """How /get_reward reduces token rewards to one score: sum or mean."""
    mode: str = "continuous"
    """Token-reward mode of /get_reward: continuous, fixed, no_negative or no_positive."""
    dtype: str = "float32"
    api_key_env: str = "TLCR_API_KEY"
    """Environment variable (in the serving processes) holding the bearer token; unset: no auth."""
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 32.0
    """Autoscaling target: items in flight per scorer replica."""
    num_cpus: float = 1.0
    """CPUs per scorer replica (torch uses this many threads)."""
    num_gpus: float = 0.0
    """GPUs per scorer replica (> 0 puts the model on cuda)."""


@dataclass
class EvalConfig:
    """`tlcr eval mt-bench|alpaca-eval`: HF generation on CPU, then an OpenAI-compatible judge."""

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

    ppo_modes: list[str] = field(default_factory=lambda: ["continuous", "sequence", "fixed"])
    """PPO runs to compare: TLCR (continuous), PPO-seq (sequence) and TLCR-fixed."""
    eval_prompts: int = 16
    """Held-out RL prompts for the report's reward table (SFT vs each PPO policy)."""
    eval_seeds: list[int] = field(default_factory=lambda: [0])
    """Sampling seeds of the report's reward table."""
    heatmap_samples: int = 4
    """Responses (and labelled pairs) shown in the HTML token heat-map."""


@dataclass
class Config:
    output_dir: str = "runs/demo"
    """Run folder: every stage writes into its own subfolder here (`tlcr_ray/layout.py`)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reviser: ReviserConfig = field(default_factory=ReviserConfig)
    sft: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5))
    disc: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, weight_decay=0.1))
    rm: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5))
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, raw: dict, where: str, base: Any = None) -> Any:
    """Overlay `raw` on `base` (default: `cls()`), so a section keeps its own defaults for unset keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where_txt = where or "top level"
        raise ConfigError(f"{where_txt}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    base = cls() if base is None else base
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else key
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            setattr(base, key, _build(type(current), value, dotted, current))
        else:
            setattr(base, key, _coerce(value, hints[key], dotted))
    return base


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None: all defaults) and apply `key=value` overrides (values parse as YAML)."""
    raw: dict = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text else "")
    try:
        return _build(Config, raw, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
