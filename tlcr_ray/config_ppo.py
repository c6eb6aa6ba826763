"""The `ppo` section of a tlcr config (and its actor groups' resources), every field documented where it
is declared; `tlcr_ray.config` assembles it into `Config` with the other sections
(`tlcr_ray.config_sections`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from tlcr_ray.choices import (
    COLOCATE,
    CRITIC_INITS,
    CRITICS,
    DTYPE_ALIASES,
    EXPORT_DTYPES,
    EXPORT_ROUNDINGS,
    FUSE_EVALUATION,
    KL_ESTIMATORS,
    OLD_LOGPROBS,
    LR_SCHEDULES,
    PPO_ALGORITHMS,
    RESUME,
    ROLLOUT_BACKENDS,
    TRUNCATED,
    WEIGHT_SYNCS,
)
from tlcr_ray.config_sections import bounded, choice


@dataclass
class GroupResources:
    """Resources of one actor group; a CPU config runs every group on a laptop."""

    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources (e.g. {"worker_node": 1}) to pin a group to a node type."""
    threads: int = bounded(0, ge=0)
    """torch/OMP threads of this group's actors (0: ppo.threads_per_actor). The reward and reference
    forwards run beside the learner's evaluation: on a small CPU machine one thread each keeps the
    three from oversubscribing the cores."""


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
    """The separate critic's lr; with ppo.critic shared the value head's (its own param group in the one
    engine, logged as critic_lr as before)."""
    lr_schedule: str = choice("cosine", LR_SCHEDULES)
    """Learning-rate schedule of both engines over the run's optimizer steps (ppo.steps x the updates of
    one step): cosine decay to 0 (the paper, no warm-up) or constant."""
    warmup_steps: int = bounded(0, ge=0)
    """Linear warm-up, in optimizer steps, before the schedule (the paper: 0)."""
    critic: str = choice("separate", CRITICS)
    """`separate`: the critic is its own model (backbone + value head, ppo.critic_init) in its own
    DeepSpeed engine, with its own forward, backward and optimizer step. `shared`: a Linear(hidden, 1)
    value head on the policy's own last hidden state (TRL's old AutoModelForCausalLMWithValueHead):
    one model, one forward gives log-probs and values, one backward of policy_loss + ppo.vf_coef x
    value_loss and one optimizer step; one model's memory instead of two. The head starts at zero
    (V = 0, and no value-loss gradient reaches the policy through it before the head's first step);
    ppo.critic_init does not apply. The head trains at ppo.critic_lr, the policy (whose backbone then
    also fits the values) at ppo.actor_lr. Not with ppo.algorithm remax (no critic at all)."""
    vf_coef: float = bounded(0.1, gt=0.0)
    """ppo.critic shared: weight of the value loss in the one combined loss. 0.1 as TRL's PPOTrainer for
    the same value-head-on-the-LM model: the returns are sums of token rewards, so early on the squared
    error can be many times the whitened-advantage policy loss, and its gradient must not dominate the
    policy backbone's update. Unused with a separate critic (each engine has its own loss)."""
    critic_init: str = choice("reward", CRITIC_INITS)
    """Where a separate critic (backbone + value head) starts: `reward` (as the paper's code: the run's
    reward model, i.e. the sequence RM in `sequence` mode and the discriminator in the token modes, head
    weights included) or `policy` (the initial policy's backbone with a freshly initialised head).
    Ignored with ppo.critic shared (the head is the policy's, zero-initialised)."""
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
    old_logprobs: str = choice("learner", OLD_LOGPROBS)
    """The old (behaviour) log-probs of PPO's ratio and of the KL shaping: `learner` recomputes them with a
    teacher-forced forward of the policy (OpenRLHF's and verl's choice: robust to an engine whose numbers
    differ, like vLLM's kernels or a bf16 ppo.rollout_dtype); `rollout` takes the ones the HF engine
    computed while sampling (TRL's choice), which are the learner's own up to float rounding when the
    engine runs HF `generate` in model.dtype: the learner's step then skips one policy forward. Needs
    ppo.rollout_backend hf, ppo.rollout_dtype auto (or = model.dtype) and kl_estimator k1/k3 (full
    needs the learner's logits); the entropy metric then comes from the update's forward."""
    fuse_evaluation: str = choice("auto", FUSE_EVALUATION)
    """`auto`: when one PPO update is a single optimizer step of a single micro-step over the whole batch
    on one learner rank (ppo_epochs 1, mini_batch_size >= prompts_per_step, micro_batch_size unset or
    >= it, kl_estimator k1/k3, a policy without active dropout), the update's own forwards run on the
    very weights the learner's evaluation would: their detached log-probs and values ARE the old ones,
    so no evaluation runs and the learner computes the advantages itself (a separate critic's forward
    then runs before the actor's backward: both graphs are held at once). The update is the same to
    float rounding (`rl.learner.PPOLearner.train_in_one_pass`). `off`: always evaluate first."""
    rollout_dtype: str = choice("auto", EXPORT_DTYPES, DTYPE_ALIASES)
    """Weight dtype of the PPO rollout engines (evaluation generates in model.dtype): auto (model.dtype) or
    float32/bfloat16/float16. bfloat16 under an fp32 learner is the GPU recipe (vLLM in bf16, fp32 masters)
    brought to CPU: decoding reads every weight once per token, so half the bytes generate ~1.4x faster
    (SmolLM2-135M, 2 cores, avx512_bf16). The engines then sample from the bf16-rounded policy while the
    learner recomputes the old log-probs in its own dtype (PPO's ratio is taken against those), and the
    sync check's `sync_logprob_err` measures the rounding (~1e-2), not 0."""
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
    export_rounding: str = choice("nearest", EXPORT_ROUNDINGS)
    """fp32 -> bfloat16 export rounding of the policy folders: nearest or stochastic (as <stage>.export_rounding)."""
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
