"""The sections of a tlcr config, one dataclass per stage, every field documented where it is declared.

`tlcr_ray.config` assembles them into `Config` and reads YAML into it; import them from there.
`choice` and `bounded` fields are checked when a config is read (the allowed values live in
`tlcr_ray.choices`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tlcr_ray.choices import (
    COLOCATE,
    CRITIC_INITS,
    DTYPE_ALIASES,
    DTYPES,
    EVAL_ON_WORKERS,
    EXPORT_DTYPES,
    KL_ESTIMATORS,
    LR_SCHEDULES,
    METHODS,
    MODES,
    ON_BAD_ROW,
    PPO_ALGORITHMS,
    PRECISION_ALIASES,
    PRECISIONS,
    RESUME,
    REVISERS,
    ROLLOUT_BACKENDS,
    SEQUENCE_SCORES,
    SPLITS,
    TOKEN_MODES,
    TRUNCATED,
    WEIGHT_SYNCS,
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
class GroupResources:
    """Resources of one actor group; a CPU config runs every group on a laptop."""

    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources (e.g. {"worker_node": 1}) to pin a group to a node type."""


@dataclass
class PPOConfig:
    algorithm: str = choice("ppo", PPO_ALGORITHMS)
    """`ppo` (clipped PPO with a critic) or `remax` (ReMax: REINFORCE on a sampled response with the
    sequence RM's score of the greedy response as baseline, no critic; needs reward.mode=sequence).
    A ReMax run writes `<output_dir>/ppo-remax`."""
    steps: int = bounded(20, ge=0)
    """PPO iterations (one rollout batch each)."""
    prompts_per_step: int = bounded(8, ge=1)
    policy: str | None = None
    """Initial policy folder (None: `<output_dir>/sft/model`)."""
    kl_coef: float = 0.1
    kl_estimator: str = choice("k1", KL_ESTIMATORS)
    """Per-token KL_t in R_t = r_t - kl_coef * KL_t: k1 (log pi - log pi_ref of the sampled token),
    k3 (exp(-k1) - 1 + k1, non-negative), or full (sum over the vocabulary of pi (log pi - log pi_ref)
    from both models' logits at each response position; moves [batch, R, vocab] tensors per step)."""
    gamma: float = bounded(1.0, ge=0.0, le=1.0)
    lam: float = bounded(0.95, ge=0.0, le=1.0)
    clip_eps: float = bounded(0.2, gt=0.0)
    value_clip: float = bounded(0.2, gt=0.0)
    ppo_epochs: int = bounded(1, ge=1)
    mini_batch_size: int = bounded(8, ge=1)
    """Rows of the whole batch per optimizer step, over all learner ranks."""
    micro_batch_size: int | None = bounded(None, ge=1)
    """Rows per learner rank per forward/backward; gradients accumulate over ceil(mini_batch_size /
    ranks / micro_batch_size) micro-steps to one optimizer step, the loss a token mean over the whole
    mini-batch (so 1 x 8 and 4 x 2 make the same update). None: mini_batch_size / ranks (one micro-step)."""
    forward_micro_batch_size: int = bounded(8, ge=1)
    """Rows per no-grad forward (learner evaluate, reference, reward scorer; always use_cache=False):
    peak memory grows with this, not with prompts_per_step."""
    gradient_checkpointing: bool = False
    """Gradient checkpointing of the PPO actor and critic (as `sft.gradient_checkpointing`)."""
    offload_optimizer: bool = False
    """DeepSpeed optimizer offload of the actor and critic (as `sft.offload_optimizer`)."""
    offload_params: bool = False
    """DeepSpeed parameter offload of the actor and critic (needs ppo.zero_stage 3)."""
    offload_reference: bool = False
    """The frozen reference model (the reference actors, and the learner's copy for kl_estimator full)
    waits in host RAM between steps: moved to the GPU for its forward and back afterwards."""
    offload_reward: bool = False
    """The reward scorer's model (discriminator / RM) likewise waits in host RAM between steps."""
    actor_lr: float = bounded(1e-6, ge=0.0)
    critic_lr: float = bounded(1e-6, ge=0.0)
    lr_schedule: str = choice("cosine", LR_SCHEDULES)
    """Learning-rate schedule of both engines over the run's optimizer steps (ppo.steps x the updates of
    one step): cosine decay to 0 (the paper, no warm-up) or constant."""
    warmup_steps: int = bounded(0, ge=0)
    """Linear warm-up, in optimizer steps, before the schedule (the paper: 0)."""
    critic_init: str = choice("reward", CRITIC_INITS)
    """Where the critic (backbone + value head) starts: `reward` (as the paper's code: the run's reward
    model, i.e. the sequence RM in `sequence` mode and the discriminator in the token modes, head
    weights included) or `policy` (the initial policy's backbone with a freshly initialised head)."""
    temperature: float = bounded(1.0, gt=0.0)
    """Sampling temperature (> 0); log-probs are computed from logits / temperature."""
    top_p: float = bounded(0.9, gt=0.0, le=1.0)
    stop: list[str] = field(default_factory=lambda: ["\n\nHuman:"])
    """Stop strings of generation (PPO rollouts and the report's samples): a response ends before the
    first one it contains (the marker is not part of it), with EOS appended and finish reason `stop`,
    as if the model had stopped there. The default ends HH-format responses that run on into an
    invented next turn. []: stop at EOS only."""
    truncated: str = choice("keep", TRUNCATED)
    """A response cut at model.max_response_len without EOS (finish reason `length`): `keep` scores it
    like any other (the paper; in `sequence` mode the RM reads its last, non-EOS token) or `penalize`
    (OpenRLHF/TRL's missing-EOS penalty: ppo.missing_eos_penalty is subtracted at its last token)."""
    missing_eos_penalty: float = bounded(1.0, ge=0.0)
    """With ppo.truncated=penalize: subtracted from the reward of a truncated response's last token."""
    rollout_backend: str = choice("auto", ROLLOUT_BACKENDS)
    """vllm, hf, or auto (vLLM when importable)."""
    vllm_tensor_parallel: int = bounded(1, ge=1)
    """GPUs (tensor-parallel workers) per vLLM engine. Above 1 each TP rank gets its own 1-GPU bundle and vLLM's
    Ray executor places its workers on them (`tlcr_ray.placement`); the NCCL weight sync then has
    1 + rollout.num_actors x this ranks."""
    vllm_memory_utilization: float = bounded(0.5, gt=0.0, le=1.0)
    """Share of each GPU (RAM on CPU) one vLLM worker takes. With colocate: all the GPU is shared: keep the
    sum of what the colocated groups need below 1 (`tlcr plan` adds them up)."""
    colocate: str = choice("none", COLOCATE)
    """`none`: each group on its own placement group (separate GPUs; ppo.<group>.num_gpus are GPUs per actor,
    for a TP engine its TP degree). `all`: one placement group of ppo.learner.num_actors bundles, every
    group's actors on them (learner rank r on bundle r, rollout engine i's TP workers on bundles
    i*TP.., reference/reward from the last bundle down) with ppo.<group>.num_gpus read as each actor's
    share of its bundle's one GPU (shares on a bundle sum to <= 1). Between phases the rollout engines
    sleep (vLLM sleep mode; HF moves its weights to host) and the learner offloads its optimizer
    states (DeepSpeed offload_states); both are no-ops on CPU, logged to <run>/phases.jsonl."""
    placement_wait_s: float = bounded(300.0, gt=0.0)
    """How long a placement group may wait for its resources (an autoscaling cluster adds nodes meanwhile)
    before the stage fails naming what is missing; also the wait of `--dry-run`."""
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
    checkpoint_every: int = bounded(5, ge=1)
    """Steps between resumable checkpoints (`checkpoints/step-N`: both engines' DeepSpeed state, the
    policy's HF folder the rollout engines restart from, the loop state); the last step always writes one."""
    keep_checkpoints: int = bounded(2, ge=1)
    """Resumable checkpoints kept (the newest)."""
    export_every: int = bounded(0, ge=0)
    """Steps between HF exports of the policy into `<run>/model` (replaced each time, in ppo.export_dtype,
    with `tlcr_export.json` naming the step); 0: only the final one."""
    keep_resume_state: bool = False
    """Keep `checkpoints/` after the run finishes; false deletes it once the final model is written (a
    rerun of a finished run then only reports it)."""
    export_dtype: str = choice("auto", EXPORT_DTYPES, DTYPE_ALIASES)
    """Dtype of the final policy folder `<run>/model` (and the export_every ones): auto (model.dtype) or
    float32/bfloat16/float16. Checkpoints always store the training dtype (a resume must be exact)."""
    bucket_mib: float = bounded(256.0, gt=0.0)
    """Weight sync, export and checkpoint under ZeRO-3 gather at most this many MiB at a time (plus one
    parameter larger than that); each bucket is written, broadcast or put in the object store, then freed."""
    weight_sync: str = choice("auto", WEIGHT_SYNCS)
    """How updated weights reach the rollout engines after each step (`tlcr_ray.rl.weight_sync`). auto:
    `cuda_ipc` when colocated on CUDA with every engine on a learner rank's GPU (CUDA IPC handles, no
    copy), else `nccl` for vLLM on other GPUs (learner rank 0 broadcasts), else `shm` when every engine is
    on learner rank 0's node (each bucket written once to /dev/shm and mapped by the engines), else
    `object_store` (buckets through Ray's object store). An explicit value that cannot work fails: at load
    for cuda_ipc/nccl against the config, at start for shm (an engine on another node)."""
    sync_check: bool = True
    """After a weight sync, compare the rollout's log-probs of one sequence with the learner's (logged as
    sync_logprob_err / sync_logprob_change; three extra forwards)."""
    sync_check_every: int = bounded(10, ge=1)
    """The sync check runs after the first step's sync and then after every Nth step (1: every step)."""
    heldout_every: int = bounded(0, ge=0)
    """Every N PPO steps (and before the first, as step 0) rollout 0 samples one reply to each held-out
    prompt (the `pipeline.eval_prompts` carved out of the RL partition, never trained on) with seed
    `ppo.heldout_seed`, and the step's metrics row gets `heldout_planted_share` (the share holding a
    planted phrase: the planted benchmark's gold metric, tlcr_ray.data.planted), `heldout_len` and the
    replies. 0: off."""
    heldout_seed: int = 0
    """Sampling seed of the held-out probe: the same at every step and in every mode (paired)."""
    resume: str = choice("auto", RESUME)
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
