"""`tlcr plan`: will a config fit its GPUs? Per-GPU bytes of every stage and PPO actor group.

    report = plan(load_config("configs/a100-7b.yaml"), gpu_memory_bytes=gpu_bytes("a100-80gb"))
    report["groups"]["ppo.learner"]["per_gpu"]["peak"], report["fits"]
    print(format_table(report))

Pure arithmetic on the config and the model's shape (`plan_models`); no Ray, no torch. Notation:
P params, N data-parallel ranks, e bytes per weight element (4 fp32, 2 bf16/fp16), b rows of a
micro-batch, s tokens per row, h hidden, I intermediate, L layers, V vocabulary, R response tokens.

Model states of one DeepSpeed engine (DeepSpeed 0.19.8 with the torch AdamW we pass in; /N = sharded):
    weights e·P (ZeRO-3: /N) · 16-bit grads e·P (ZeRO-2/3: /N) · fp32 master 4·P/N (ZeRO>=1; ZeRO-0:
    4·P in bf16/fp16, none in fp32) · Adam m, v 8·P (ZeRO>=1: /N) · at the step also the fp32 grads
    4·P/N (ZeRO-3: of one sub-group, <= sub_group_size 1e9 elements) and torch AdamW's temporary
    sqrt(v), 4 bytes per stepped element. ZeRO-3 adds the largest module's 16-bit params and grads,
    2e·largest. Bf16 ZeRO-2 is 2P + 18P/N, exactly DeepSpeed's estimate_zero2_model_states_mem_needs;
    ZeRO-3 is 20P/N + 4·largest where its estimator says 18P/N (it omits the 16-bit grad partition).
    `offload_optimizer` moves the fp32 master, Adam's m, v, the fp32 grads and the step to host RAM
    (ZeRO-2/3: the 16-bit grads too, reduced bucket by bucket into the host partition), as DeepSpeed's
    estimators with cpu_offload (ZeRO-2: 2P on GPU); `offload_params` (ZeRO-3) the 16-bit weights too,
    leaving the gathered layer (the estimator's largest_layer_memory). `offloaded_host_bytes` is what moved.
Activations, per decoder layer without gradient checkpointing (HF Llama with SDPA, which keeps no
s² scores; derived from what autograd saves, cf. Korthikanti et al. 2022's 34sbh + 5as²b):
    s·b·(2(4+e)h [two RMSNorms upcast to fp32] + 7e·h [q, k, v (GQA repeated), attention out,
    o_proj/qkv/MLP inputs] + 4e·I [gate, silu, up, product] + 2e·k·d [GQA: the KV cache's k, v])
  + final norm and LM-head input s·b·h·(4+2e) + the 4D mask b·s² + logits b·s_V·V·f bytes:
    f = 12 (SFT: e-bit logits, fp32 copy, log-softmax, its gradient), the PPO actor 16 + e (also
    the entropy's exp and product, on the R response positions only), the reference e + 8.
  + the backward's working set e·s·b·(2h + 3I). With gradient checkpointing (<stage>.gradient_checkpointing,
  ppo.gradient_checkpointing) the layers keep only their inputs, L·e·s·b·h, plus one layer's activations
  as above. b is <stage>.micro_batch_size, and for the PPO actor/critic ppo.micro_batch_size.
  No-grad forwards (evaluate, reference, reward) run ppo.forward_micro_batch_size rows at a time with
  use_cache=False and peak at s·b·(2e·h + 4e·I): the residual and norm output and the MLP's I-wide
  temporaries. kl_estimator full adds the learner's reference copy (weights as the actor's, ZeRO-3 /N)
  and its [b, R, V] logits with both log-softmaxes (e + 16 bytes). ppo.offload_reference/offload_reward
  park a scorer's weights in host RAM between steps: the forward's peak is unchanged, the `idle` phase
  holds no weights. Checked against CPU measurements: bench/bench_plan.py.
Buffers: DeepSpeed's gradient bucket, reduce_bucket_size 5e8 elements (e·5e8 bytes on GPU; on CPU the
touched e·P, none at world 1; ZeRO-1/2 in backward, ZeRO-3 always), ZeRO-3's prefetch bucket 5e7
elements, 1 GiB CUDA context + NCCL per GPU process (0.5 GiB interpreter per CPU process), and the
weight sync, streamed (`tlcr_ray.training.gather`): ZeRO-3 gathers one bucket of ppo.bucket_mib (or
the largest parameter) at a time on every rank, min(e·P, bucket + e·V·h), which rank 0 packs into
2 x 1 GiB NCCL broadcast buffers (CUDA + vLLM), every rank into a flat GPU bucket (cuda_ipc), one
/dev/shm bucket (shm; into HF engines, which copy on load, one file kept for the run, so every phase of a
CPU learner holds it), or copies to host for the object store (which then holds e·P: the bound planned
for auto off a colocated GPU); checkpoints and HF exports stream the same way.
vLLM takes vllm_memory_utilization x the GPU (weights/TP, ~2 GiB activations/graphs, KV cache the
rest) or weights + vllm_kv_cache_gib + 2 GiB, and +2 GiB of NCCL receive buffers during a sync.
A peak is the largest of the phases (train, step, evaluate, sync), each the sum of what is live then
(in backward the grads replace the activations being freed: the larger of the two counts).
CPU groups (num_gpus 0) are planned as host processes: per_gpu holds one process's bytes and the
group fits when num_actors x peak, and all PPO CPU groups together, fit the host's RAM.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math

from tlcr_ray.config import ConfigError, rollout_dtype
from tlcr_ray.layout import POLICY_STAGES
from tlcr_ray.methods import METHODS
from tlcr_ray.plan_checkpoints import checkpoint_sizes, format_checkpoints
from tlcr_ray.plan_models import ModelShape, gpu_bytes, host_memory, local_cuda_memory, model_shape
from tlcr_ray.rl.minibatches import fuses_evaluation

GIB = 2**30
DS_DEFAULTS = {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8), "prefetch_bucket_size": int(5e7),
               "max_live_parameters": int(1e9), "sub_group_size": int(1e9)}
"""deepspeed/runtime/zero/config.py defaults (0.19.8); tlcr sets none of them."""
CUDA_CONTEXT, CPU_PROCESS, VLLM_OVERHEAD, SYNC_BUFFERS = GIB, GIB // 2, 2 * GIB, 2 * GIB
ELEM = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}
GROUPS = ("sft", "disc", "rm", "dpo", "figa", "ppo.rollout", "ppo.reward", "ppo.reference", "ppo.learner")


def engine_states(params: int, largest: int, e: int, zero: int, world: int, on_gpu: bool,
                  offload_optimizer: bool = False, offload_params: bool = False) -> dict[str, int]:
    """GPU bytes of one DeepSpeed engine on one rank (see the module docstring); "offloaded" is what
    offload_optimizer / offload_params put in host RAM instead."""
    n = max(1, world)
    step_elems = params if zero == 0 else min(params // n, DS_DEFAULTS["sub_group_size"] if zero == 3 else params)
    st = _on_device(params, largest, e, zero, n, on_gpu, step_elems)
    moved = (["master", "adam", "fp32_grads", "adam_temp"] + (["grads"] if zero >= 2 else [])) if offload_optimizer else []
    moved += ["weights"] if offload_params and zero == 3 else []
    st["offloaded"] = sum(st[k] for k in moved)
    st.update({k: 0 for k in moved})
    return st


def _on_device(params: int, largest: int, e: int, zero: int, n: int, on_gpu: bool, step_elems: int) -> dict[str, int]:
    return {
        "weights": e * params // (n if zero == 3 else 1),
        "grads": e * params // (n if zero >= 2 else 1),
        "master": 4 * params // n if zero >= 1 else (4 * params if e < 4 else 0),
        "adam": 8 * params // (n if zero >= 1 else 1),
        "fp32_grads": 0 if (zero == 0 and e == 4) else 4 * step_elems,
        "adam_temp": 4 * step_elems,
        "bucket": (0 if n == 1 and (zero == 0 or not on_gpu) else e * (DS_DEFAULTS["reduce_bucket_size"] if on_gpu
                                                                      else min(params, DS_DEFAULTS["reduce_bucket_size"]))),
        "gathered": 2 * e * largest if zero == 3 else 0,
        "prefetch": e * DS_DEFAULTS["prefetch_bucket_size"] if zero == 3 else 0,
    }


def model_states(st: dict) -> int:
    """What DeepSpeed's estimators cover: params, grads, optimizer states (at the step), ZeRO-3's gathered layer."""
    return sum(st[k] for k in ("weights", "grads", "master", "adam", "fp32_grads", "gathered"))


def _persistent(st: dict, zero: int) -> int:
    """Live between steps (ZeRO-3 also keeps its flat grad partition and its bucket)."""
    return st["weights"] + st["master"] + st["adam"] + (st["grads"] + st["bucket"] if zero == 3 else 0)


def _train_extra(st: dict, zero: int, act: int) -> int:
    """Backward frees activations as it fills the grads: the peak is near the larger of the two, not the sum."""
    return (st["gathered"] + st["prefetch"] + act) if zero == 3 else st["bucket"] + max(act, st["grads"])


def _step_extra(st: dict, zero: int) -> int:
    return (0 if zero == 3 else st["grads"]) + st["fp32_grads"] + st["adam_temp"]


def train_activations(m: ModelShape, b: int, s: int, e: int, logit_rows: int = 0, logit_factor: int = 12,
                      checkpointing: bool = False) -> int:
    """Saved activations of one forward + backward (module docstring); logits over `logit_rows` positions/row."""
    h, i = m.hidden, m.intermediate
    cache = 2 * e * m.kv_heads * m.d if m.kv_heads < m.heads else 0  # GQA: HF's KV cache keeps the unrepeated k, v
    layer = s * b * (2 * (4 + e) * h + 7 * e * h + 4 * e * i + cache)
    layers = (m.layers * e * s * b * h + layer) if checkpointing else m.layers * layer
    backward = e * s * b * (2 * h + 3 * i)  # activation gradients of the layer being back-propagated
    return layers + backward + s * b * h * (4 + 2 * e) + b * s * s + b * logit_rows * m.vocab * logit_factor


def inference_activations(m: ModelShape, b: int, s: int, e: int) -> int:
    """Peak of a no-grad forward of b rows (use_cache=False): the MLP's moment (module docstring) and the mask."""
    return s * b * (2 * e * m.hidden + 4 * e * m.intermediate) + b * s * s


def _result(gpus, device, phases: dict, states: int, act: int, kv: int, buffers: int, procs: int = 1, **extra):
    peak_phase = max(phases, key=phases.get)
    per = {"model_states": states, "activations": act, "kv_cache": kv, "buffers": buffers,
           "peak": phases[peak_phase] * procs}
    return {"gpus": gpus, "device": device, "per_gpu": per, "peak_phase": peak_phase, "phases": phases, **extra}


def plan_stage(cfg, stage: str, m: ModelShape, checkpointing: bool = False) -> dict:
    """SFT / disc / RM / DPO / FIGA on Ray Train: each of num_workers ranks runs one DeepSpeed engine."""
    t = getattr(cfg, stage)
    e, z, on_gpu = ELEM[t.precision], t.zero_stage, t.use_gpu
    lm = stage in POLICY_STAGES  # the causal LM itself (its logits), not a head on the backbone
    st = engine_states(m.params if lm else m.backbone_params, m.largest_module, e, z, t.num_workers, on_gpu,
                       t.offload_optimizer, t.offload_params)
    rows = t.micro_batch_size * (2 if stage in ("rm", "dpo") else 1)  # RM / DPO: chosen and rejected in one forward
    act = train_activations(m, rows, t.max_len, e, t.max_len if lm else 0, 12,
                            checkpointing or t.gradient_checkpointing)
    ctx = CUDA_CONTEXT if on_gpu else CPU_PROCESS
    phases = {"train": ctx + _persistent(st, z) + _train_extra(st, z, act), "step": ctx + _persistent(st, z)
              + _step_extra(st, z)}
    return _result(t.num_workers if on_gpu else 0, "cuda" if on_gpu else "cpu", phases, model_states(st), act, 0,
                   ctx + st["bucket"] + st["prefetch"], breakdown=st, offloaded_host_bytes=st["offloaded"],
                   inputs={"rows": rows, "seq": t.max_len, "zero_stage": z, "world": t.num_workers,
                           "gradient_checkpointing": checkpointing or t.gradient_checkpointing})


def plan_learner(cfg, m: ModelShape, checkpointing: bool = False) -> dict:
    """ppo.learner: actor (policy) + critic (backbone + value head; none under ReMax) engines on each rank;
    ppo.critic shared: the actor alone, with the value head's h + 1 parameters."""
    ppo, res = cfg.ppo, cfg.ppo.learner
    e, z, n, on_gpu = ELEM[cfg.model.dtype], ppo.zero_stage, res.num_actors, res.num_gpus > 0
    seq, R = cfg.model.max_prompt_len + cfg.model.max_response_len, cfg.model.max_response_len
    offload = (ppo.offload_optimizer, ppo.offload_params)
    # ReMax (ppo.algorithm remax) trains the policy alone: no critic engine, no value forward. A shared
    # critic is a head inside the actor's engine (its activations: b x R values, nothing to count).
    shared = ppo.algorithm != "remax" and getattr(ppo, "critic", "separate") == "shared"
    no_critic = ppo.algorithm == "remax" or shared
    head = m.hidden + 1 if shared else 0
    actor = engine_states(m.params + head, m.largest_module, e, z, n, on_gpu, *offload)
    critic = {k: 0 for k in actor} if no_critic else engine_states(m.backbone_params, m.largest_module, e, z, n,
                                                                   on_gpu, *offload)
    # Rows per micro-step (ppo.micro_batch_size, else the rank's share of a mini-batch) and per no-grad forward.
    micro = ppo.micro_batch_size or -(-ppo.mini_batch_size // n)
    rows = min(ppo.forward_micro_batch_size, -(-ppo.prompts_per_step // n))
    ckpt = checkpointing or ppo.gradient_checkpointing
    # Logits: e-bit (e), fp32 copy / temperature (4; shared in fp32 at T=1), log-softmax (4), entropy's exp, product (8).
    f = e + (4 if (e != 4 or ppo.temperature != 1.0) else 0) + 12
    act_actor = train_activations(m, micro, seq, e, R, f, ckpt)
    act_critic = 0 if no_critic else train_activations(m, micro, seq, e, 0, 0, ckpt)
    full = ppo.kl_estimator == "full"  # the reference copy's logits and both log-softmaxes, per forward micro-batch
    act_eval = inference_activations(m, rows, seq, e) + rows * R * m.vocab * (f + (e + 16 if full else 0))
    # kl_estimator full: a frozen reference copy (ZeRO-3: sharded, and with offload_reference in host RAM).
    ref_weights = 0 if not full else (e * m.params // n if z == 3 else e * m.params)
    ref_idle = 0 if ppo.offload_reference else ref_weights
    base = (CUDA_CONTEXT if on_gpu else CPU_PROCESS) + _persistent(actor, z) + _persistent(critic, z) + ref_idle
    # The sync streams (tlcr_ray/training/gather.py): ZeRO-3 gathers one bucket (ppo.bucket_mib, or one
    # larger parameter; a tied weight's second name regathers it) at a time on every rank.
    largest_param = e * m.vocab * m.hidden
    gathered = min(e * m.params, int(ppo.bucket_mib * 2**20) + largest_param) if z == 3 else 0
    clone = e * (m.params + (m.vocab * m.hidden if m.tied else 0))
    # nccl: rank 0 packs the buckets into the broadcast buffers; cuda_ipc: every rank packs its bucket into
    # one flat GPU buffer; shm: one such bucket in host shared memory; object store: the store's host copy
    # of the whole policy (`planned_weight_sync`).
    sync = planned_weight_sync(cfg, on_gpu)
    flat_bucket = min(clone, int(ppo.bucket_mib * 2**20) + largest_param)
    host_copy = {"shm": flat_bucket, "nccl": 0, "cuda_ipc": 0}.get(sync, clone)
    # shm into HF engines (they copy on load) keeps its one bucket file for the whole run (`handover.ReusedShm`):
    # every phase holds it, the sync no more. Under auto, shm is what one node takes (the store, the bound here).
    may_shm = sync == "shm" or (getattr(ppo, "weight_sync", "auto") == "auto" and sync == "object_store")
    kept_file = flat_bucket if may_shm and not on_gpu and _backend(cfg) == "hf" else 0
    base += kept_file
    on_device = {"nccl": SYNC_BUFFERS, "cuda_ipc": flat_bucket}.get(sync, 0) if on_gpu else host_copy - kept_file
    sync_device = gathered + on_device
    # ppo.fuse_evaluation on a one-pass update: the critic's forward runs before the actor's backward, so
    # its saved activations are alive through it (`PPOLearner.train_in_one_pass`).
    held_critic = act_critic if fuses_evaluation(ppo, n) else 0
    phases = {"train": base + max(_train_extra(actor, z, act_actor) + held_critic, _train_extra(critic, z, act_critic)),
              "step": base + max(_step_extra(actor, z), _step_extra(critic, z)),
              "evaluate": base + actor["gathered"] + actor["prefetch"] + act_eval + (ref_weights - ref_idle),
              "sync": base + sync_device}
    states = model_states(actor) + model_states(critic) - critic["gathered"] + ref_weights  # one gathers at a time
    buffers = (CUDA_CONTEXT if on_gpu else CPU_PROCESS) + max(actor["bucket"], critic["bucket"]) \
        + actor["prefetch"] + sync_device + kept_file
    procs = _procs_per_gpu(res)
    return _result(math.ceil(n * res.num_gpus), "cuda" if on_gpu else "cpu", phases, states,
                   max(act_actor + held_critic, act_critic, act_eval), 0, buffers, procs,
                   breakdown={"actor": actor, "critic": critic, "reference_copy": ref_weights, "sync_gathered": gathered,
                              "sync_host": host_copy, "sync_kept_file": kept_file},
                   offloaded_host_bytes=actor["offloaded"] + critic["offloaded"] + (ref_weights - ref_idle),
                   inputs={"world": n, "micro_rows": micro, "accumulation": -(-(-(-ppo.mini_batch_size // n)) // micro),
                           "eval_rows": rows, "seq": seq, "response": R, "gradient_checkpointing": ckpt,
                           "zero_stage": z, "dtype": cfg.model.dtype, "weight_sync": sync})


def planned_weight_sync(cfg, on_gpu: bool) -> str:
    """The ppo.weight_sync a run would take as far as the config tells (`tlcr_ray.rl.weight_sync` decides
    at start from where the actors landed): auto is cuda_ipc colocated on GPUs (TP 1), nccl for vLLM on
    other GPUs, else the object store, the upper bound of shm (same node: unknown here)."""
    ppo = cfg.ppo
    if getattr(ppo, "weight_sync", "auto") != "auto":
        return ppo.weight_sync
    if on_gpu and getattr(ppo, "colocate", "none") == "all":
        return "cuda_ipc" if ppo.vllm_tensor_parallel == 1 or _backend(cfg) == "hf" else "object_store"
    return "nccl" if on_gpu and _backend(cfg) == "vllm" else "object_store"


def _backend(cfg) -> str:
    """ppo.rollout_backend as `rl.rollout.resolve_backend` resolves `auto` (vLLM when importable)."""
    import importlib.util

    auto = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return auto if cfg.ppo.rollout_backend == "auto" else cfg.ppo.rollout_backend


def _procs_per_gpu(res) -> int:
    """Actors of one group sharing a GPU (num_gpus < 1); Ray may also pack other groups' fractions beside them."""
    return 1 if res.num_gpus <= 0 or res.num_gpus >= 1 else max(1, min(res.num_actors, int(1 / res.num_gpus)))


def plan_scorer(cfg, group: str, m: ModelShape) -> dict:
    """ppo.reference (policy log-probs) and ppo.reward (discriminator / RM): no-grad forwards of their rows."""
    res = getattr(cfg.ppo, group)
    e, on_gpu = ELEM[cfg.model.dtype], res.num_gpus > 0
    seq, R = cfg.model.max_prompt_len + cfg.model.max_response_len, cfg.model.max_response_len
    rows = min(cfg.ppo.forward_micro_batch_size, -(-cfg.ppo.prompts_per_step // res.num_actors))
    weights = e * (m.params if group == "reference" else m.backbone_params)
    act = inference_activations(m, rows, seq, e) + (rows * R * m.vocab * (e + 8) if group == "reference" else 0)
    ctx = CUDA_CONTEXT if on_gpu else CPU_PROCESS
    offload = getattr(cfg.ppo, f"offload_{group}")  # between steps the weights wait in host RAM
    return _result(math.ceil(res.num_actors * res.num_gpus), "cuda" if on_gpu else "cpu",
                   {"forward": ctx + weights + act, "idle": ctx + (0 if offload else weights)}, weights, act, 0, ctx,
                   _procs_per_gpu(res), offloaded_host_bytes=weights if offload else 0,
                   inputs={"rows": rows, "seq": seq, "dtype": cfg.model.dtype, "offload": offload})


def plan_rollout(cfg, m: ModelShape, gpu_memory: int, host_memory: int | None) -> dict:
    """ppo.rollout: vLLM (a share of the device, weights/TP + KV cache) or HF generate (weights + its KV cache)."""
    ppo, res = cfg.ppo, cfg.ppo.rollout
    e, on_gpu, backend = ELEM[cfg.model.dtype], res.num_gpus > 0, _backend(cfg)  # e: what the learner sends
    held = ELEM[rollout_dtype(cfg)]  # ppo.rollout_dtype: what the engine keeps
    max_len = cfg.model.max_prompt_len + cfg.model.max_response_len + 1
    rows = -(-ppo.prompts_per_step // res.num_actors)
    tp = ppo.vllm_tensor_parallel if backend == "vllm" else 1
    weights, per_token = held * m.params // tp, m.kv_bytes_per_token(held) // tp
    handover = planned_weight_sync(cfg, ppo.learner.num_gpus > 0)
    bucket = min(e * m.params, int(ppo.bucket_mib * 2**20) + e * m.vocab * m.hidden)
    inputs = {"backend": backend, "rows": rows, "max_model_len": max_len, "tensor_parallel": tp, "weight_sync": handover,
              "dtype": rollout_dtype(cfg)}
    if backend == "vllm":
        device = gpu_memory if on_gpu else (host_memory or 0)
        budget = (weights + int(ppo.vllm_kv_cache_gib * GIB) + VLLM_OVERHEAD if ppo.vllm_kv_cache_gib is not None
                  else int(ppo.vllm_memory_utilization * device))
        kv = budget - weights - VLLM_OVERHEAD
        # NCCL receive buffers / the store's state dict; handed over: views of the learner's bucket.
        sync = {"cuda_ipc": 0, "shm": bucket}.get(handover, SYNC_BUFFERS if on_gpu else 2 * e * m.params)
        inputs.update(kv_tokens=max(0, kv) // max(1, per_token), kv_tokens_needed=rows * max_len,
                      kv_ok=kv >= per_token * max_len or not device)  # RAM unknown: not judged
        phases = {"generate": budget, "sync": budget + sync}
        buffers = VLLM_OVERHEAD + sync
    else:  # HF generate: weights, its KV cache (a cat copies it: x2), the prefill's MLP, last-position logits
        kv, buffers = 2 * rows * max_len * per_token, CUDA_CONTEXT if on_gpu else CPU_PROCESS
        act = rows * cfg.model.max_prompt_len * held * (2 * m.hidden + 4 * m.intermediate) + rows * m.vocab * 8
        # The sync: the state dict that arrives and the load's copy of it (handed over: a bucket's views).
        arrives = {"cuda_ipc": 0, "shm": bucket}.get(handover, e * m.params + held * m.params)
        phases = {"generate": buffers + weights + kv + act, "sync": buffers + weights + arrives}
        buffers += arrives
    return _result(math.ceil(res.num_actors * max(res.num_gpus, 0)), "cuda" if on_gpu else "cpu", phases,
                   weights, 0 if backend == "vllm" else act, max(0, kv), buffers, _procs_per_gpu(res), inputs=inputs)


def _group(cfg, name: str, m: ModelShape, gpu_memory: int, host_memory: int | None) -> dict:
    g = name.removeprefix("ppo.")
    if g == name:
        out, actors = plan_stage(cfg, name, m), getattr(cfg, name).num_workers
    else:
        out = (plan_learner(cfg, m) if g == "learner" else plan_rollout(cfg, m, gpu_memory, host_memory)
               if g == "rollout" else plan_scorer(cfg, g, m))
        actors = getattr(cfg.ppo, g).num_actors
    peak, room = out["per_gpu"]["peak"], gpu_memory if out["device"] == "cuda" else host_memory
    if getattr(cfg.ppo, "colocate", "none") == "all" and g != name:
        # Colocated, each group's actors sit on distinct bundles: one process of the group per GPU.
        tp = out.get("inputs", {}).get("tensor_parallel", 1) if g == "rollout" else 1
        out["per_gpu"]["peak"], out["gpus"] = max(out["phases"].values()), getattr(cfg.ppo, g).num_actors * tp
        peak = out["per_gpu"]["peak"]
    if out["device"] != "cuda":  # CPU: all of the group's processes on this host
        peak *= actors
        out.update(cpu=True, host_bytes=peak)
    out["margin"] = None if room is None else room - peak
    out["fits"] = out.get("inputs", {}).get("kv_ok", True) and (room is None or peak <= room)
    return out


def plan(cfg, gpu_memory_bytes: int, host_memory_bytes: int | None = None, groups=GROUPS, gpu: str | None = None,
         knobs: bool = True) -> dict:
    """The whole plan as a JSON-able dict (module docstring; `tlcr plan --json` prints it)."""
    m = model_shape(cfg.model.base)
    out = {name: _group(cfg, name, m, gpu_memory_bytes, host_memory_bytes) for name in groups}
    cpu_ppo = sum(g["host_bytes"] for n, g in out.items() if g.get("cpu") and n.startswith("ppo."))
    cpu_ok = host_memory_bytes is None or cpu_ppo <= host_memory_bytes
    from tlcr_ray.plan_knobs import suggest  # it re-plans the changed configs with `_group`

    for name, g in out.items():
        if knobs and not g["fits"]:
            g["knobs"] = suggest(cfg, name, m, gpu_memory_bytes, host_memory_bytes)
    from tlcr_ray.plan_colocate import plan_colocated  # it reads this module's pieces

    colocated = plan_colocated(cfg, out, gpu_memory_bytes)
    extra = {"colocated": colocated} if colocated else {}
    return {**extra, "gpu": gpu, "gpu_memory_bytes": gpu_memory_bytes, "host_memory_bytes": host_memory_bytes,
            "fits": all(g["fits"] for g in out.values()) and cpu_ok and (not colocated or colocated["fits"]),
            "cpu_ppo_total_bytes": cpu_ppo,
            "model": {"base": cfg.model.base, **dataclasses.asdict(m), "params": m.params,
                      "backbone_params": m.backbone_params},
            "offload": offload_summary(cfg, colocated), "groups": out, "checkpoints": checkpoint_sizes(cfg, m),
            "ppo_runs": sum(METHODS[name].stage is None for name in cfg.pipeline.methods)}


def offload_summary(cfg, colocated: bool = False) -> str:
    """Which offload knobs the config turns on (the table's header line)."""
    on = [f"{sec}.{k}" for sec in ("sft", "disc", "rm", "dpo", "figa", "ppo")
          for k in ("offload_optimizer", "offload_params") if getattr(getattr(cfg, sec), k)]
    on += [f"ppo.{k}" for k in ("offload_reference", "offload_reward") if getattr(cfg.ppo, k)]
    if colocated:
        on.append("PPO learner optimizer states while the engines generate (ppo.colocate all)")
    return ", ".join(on) or "none"


def _with(cfg, changes: dict):
    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        setattr(functools.reduce(getattr, path, new), key, value)
    return new


def format_table(report: dict, config_name: str = "") -> str:
    """One row per group (GiB), the verdict and margin, then how to make each misfit fit."""
    mdl, mem = report["model"], report["gpu_memory_bytes"]
    gib = lambda b: f"{b / GIB:7.1f}"  # noqa: E731
    lines = [f"tlcr plan {config_name}: {mdl['base']} ({mdl['name']}, {mdl['params'] / 1e9:.2f}B params, "
             f"hidden {mdl['hidden']}, {mdl['layers']} layers, vocab {mdl['vocab']}; shape from {mdl['source']})",
             f"GPU: {report['gpu'] + ', ' if report['gpu'] else ''}{mem / GIB:.1f} GiB per GPU; offload: "
             f"{report['offload']}",
             "", f"{'group':<14}{'gpus':>5} {'states':>7} {'activ':>7} {'kv':>7} {'buffers':>7} {'peak':>7}  "
             f"{'at':<9}{'margin':>8}  verdict"]
    for name, g in report["groups"].items():
        p = g["per_gpu"]
        where = "cpu" if g.get("cpu") else str(g["gpus"])
        margin = "" if g["margin"] is None else gib(g["margin"])
        room = report["host_memory_bytes"] if g.get("cpu") else mem
        tight = g["margin"] is not None and room and g["margin"] < 0.1 * room  # under 10% left: fragmentation
        verdict = ("fits (tight)" if tight else "fits") if g["fits"] else "DOES NOT FIT"
        verdict += f" (host RAM, {g['host_bytes'] / GIB:.1f} GiB for all actors)" if g.get("cpu") else ""
        verdict += "" if g.get("inputs", {}).get("kv_ok", True) else " (KV cache below one max_model_len sequence)"
        lines.append(f"{name:<14}{where:>5} {gib(p['model_states'])} {gib(p['activations'])} {gib(p['kv_cache'])} "
                     f"{gib(p['buffers'])} {gib(p['peak'])}  {g['peak_phase']:<9}{margin:>8}  {verdict}")
    for name, g in report["groups"].items():
        if g.get("knobs"):
            lines.append(f"\nto fit {name}: " + "; ".join(g["knobs"]))
    if report.get("colocated"):
        from tlcr_ray.plan_colocate import format_colocated

        lines.append(format_colocated(report["colocated"]))
    lines += format_checkpoints(report["checkpoints"], report["ppo_runs"]) if "checkpoints" in report else []
    lines += ["", "GiB per GPU (cpu: per process); peak = the largest phase, not the columns' sum (tlcr_ray/plan.py). "
              + ("Everything fits." if report["fits"] else "It does NOT fit.")]
    return "\n".join(lines)


def run_cli(cfg, args) -> dict | None:
    """`tlcr plan`: the GPU from --gpu / --gpu-memory-gib, else the config's `gpu`, the local CUDA device, a100-80gb."""
    gpu, custom = args.gpu or cfg.gpu, args.gpu_memory_gib
    local = None if (gpu or custom) else local_cuda_memory()
    mem = int(custom * GIB) if custom else local or gpu_bytes(gpu or "a100-80gb")
    gpu = None if custom else gpu or ("cuda:0" if local else "a100-80gb")
    report = plan(cfg, mem, host_memory(), gpu=gpu)
    if getattr(args, "json", False):
        return report
    print(format_table(report, getattr(args, "config", "") or ""))
    return None


def require_fit(cfg, groups, what: str) -> dict | None:
    """Refuse (ConfigError) a GPU config that cannot fit, before Ray or any model starts. The GPU memory is
    cuda:0's when this process sees CUDA, else the config's `gpu`; neither (or an unknown model): no check."""
    mem = local_cuda_memory() if groups else None
    gpu = "cuda:0" if mem else getattr(cfg, "gpu", None)
    if gpu is None or not groups:
        return None
    try:
        report = plan(cfg, mem or gpu_bytes(gpu), host_memory(), groups=tuple(groups), gpu=gpu)
    except ConfigError as exc:
        if "model.base" not in str(exc):
            raise
        return print(f"{what}: memory plan skipped: {exc}", flush=True)
    for name, g in report["groups"].items():
        if not g["fits"] and not g.get("cpu"):
            raise ConfigError(
                f"{name} does not fit {gpu}: about {g['per_gpu']['peak'] / GIB:.1f} GiB per GPU at its peak "
                f"({g['peak_phase']}), the GPU has {report['gpu_memory_bytes'] / GIB:.1f} GiB. To fit: "
                f"{'; '.join(g.get('knobs', []))}. `tlcr plan --config ...` shows the whole plan.")
    col = report.get("colocated")
    if col and not col["fits"]:
        raise ConfigError(f"ppo.colocate all does not fit {gpu}: bundle {col['worst_bundle']} ({', '.join(col['groups'])}) "
                          f"needs about {col['peak'] / GIB:.1f} GiB at its peak ({col['peak_phase']}), the GPU has "
                          f"{report['gpu_memory_bytes'] / GIB:.1f} GiB. Lower ppo.vllm_memory_utilization, spread the "
                          f"groups (more bundles: ppo.learner.num_actors), or use ppo.colocate none. `tlcr plan` shows "
                          f"the phases.")
    return report
