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
    Offload (offload_optimizer/offload_param) is not configured anywhere in tlcr: all of it is on GPU.
Activations, per decoder layer without gradient checkpointing (HF Llama with SDPA, which keeps no
s² scores; derived from what autograd saves, cf. Korthikanti et al. 2022's 34sbh + 5as²b):
    s·b·(2(4+e)h [two RMSNorms upcast to fp32] + 7e·h [q, k, v (GQA repeated), attention out,
    o_proj/qkv/MLP inputs] + 4e·I [gate, silu, up, product] + 2e·k·d [GQA: the KV cache's k, v])
  + final norm and LM-head input s·b·h·(4+2e) + the 4D mask b·s² + logits b·s_V·V·f bytes:
    f = 12 (SFT: e-bit logits, fp32 copy, log-softmax, its gradient), the PPO actor 16 + e (also
    the entropy's exp and product, on the R response positions only), the reference e + 8.
  + the backward's working set e·s·b·(2h + 3I). With gradient checkpointing (not yet a config
  knob) the layers keep only their inputs, L·e·s·b·h, plus one layer's activations as above.
  No-grad forwards (evaluate, reference, reward) peak at s·b·(2e·h + 4e·I + 2e·L·k·d): the residual and
  norm output, the MLP's I-wide temporaries, and the KV cache HF builds of every layer (the scoring
  forwards do not pass use_cache=False). Checked against CPU measurements: bench/bench_plan.py.
Buffers: DeepSpeed's gradient bucket, reduce_bucket_size 5e8 elements (e·5e8 bytes on GPU; on CPU the
touched e·P, none at world 1; ZeRO-1/2 in backward, ZeRO-3 always), ZeRO-3's prefetch bucket 5e7
elements, 1 GiB CUDA context + NCCL per GPU process (0.5 GiB interpreter per CPU process), and the
weight sync, streamed (`tlcr_ray.training.gather`): ZeRO-3 gathers one bucket of ppo.bucket_mib (or
the largest parameter) at a time on every rank, min(e·P, bucket + e·V·h), which rank 0 packs into
2 x 1 GiB NCCL broadcast buffers (CUDA + vLLM) or copies to host for the object store (CPU/HF: the
store then holds e·P); checkpoints and HF exports stream the same way.
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

from tlcr_ray.config import ConfigError
from tlcr_ray.plan_checkpoints import checkpoint_sizes, format_checkpoints
from tlcr_ray.plan_models import ModelShape, gpu_bytes, host_memory, local_cuda_memory, model_shape

GIB = 2**30
DS_DEFAULTS = {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8), "prefetch_bucket_size": int(5e7),
               "max_live_parameters": int(1e9), "sub_group_size": int(1e9)}
"""deepspeed/runtime/zero/config.py defaults (0.19.8); tlcr sets none of them."""
CUDA_CONTEXT, CPU_PROCESS, VLLM_OVERHEAD, SYNC_BUFFERS = GIB, GIB // 2, 2 * GIB, 2 * GIB
ELEM = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}
GROUPS = ("sft", "disc", "rm", "ppo.rollout", "ppo.reward", "ppo.reference", "ppo.learner")


def engine_states(params: int, largest: int, e: int, zero: int, world: int, on_gpu: bool) -> dict[str, int]:
    """Bytes of one DeepSpeed engine on one rank (see the module docstring)."""
    n = max(1, world)
    step_elems = params if zero == 0 else min(params // n, DS_DEFAULTS["sub_group_size"] if zero == 3 else params)
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
    """Peak of a no-grad forward: the MLP's moment (module docstring) plus HF's KV cache of every layer."""
    return s * b * (2 * e * m.hidden + 4 * e * m.intermediate + m.kv_bytes_per_token(e)) + b * s * s


def _result(gpus, device, phases: dict, states: int, act: int, kv: int, buffers: int, procs: int = 1, **extra):
    peak_phase = max(phases, key=phases.get)
    per = {"model_states": states, "activations": act, "kv_cache": kv, "buffers": buffers,
           "peak": phases[peak_phase] * procs}
    return {"gpus": gpus, "device": device, "per_gpu": per, "peak_phase": peak_phase, "phases": phases, **extra}


def plan_stage(cfg, stage: str, m: ModelShape, checkpointing: bool = False) -> dict:
    """SFT / disc / RM on Ray Train: each of num_workers ranks runs one DeepSpeed engine."""
    t = getattr(cfg, stage)
    e, z, on_gpu = ELEM[t.precision], t.zero_stage, t.use_gpu
    st = engine_states(m.params if stage == "sft" else m.backbone_params, m.largest_module, e, z, t.num_workers, on_gpu)
    rows = t.micro_batch_size * (2 if stage == "rm" else 1)  # RM: chosen and rejected in one forward
    act = train_activations(m, rows, t.max_len, e, t.max_len if stage == "sft" else 0, 12,
                            checkpointing or getattr(t, "gradient_checkpointing", False))
    ctx = CUDA_CONTEXT if on_gpu else CPU_PROCESS
    phases = {"train": ctx + _persistent(st, z) + _train_extra(st, z, act), "step": ctx + _persistent(st, z)
              + _step_extra(st, z)}
    return _result(t.num_workers if on_gpu else 0, "cuda" if on_gpu else "cpu", phases, model_states(st), act, 0,
                   ctx + st["bucket"] + st["prefetch"], breakdown=st,
                   inputs={"rows": rows, "seq": t.max_len, "zero_stage": z, "world": t.num_workers})


def plan_learner(cfg, m: ModelShape, checkpointing: bool = False) -> dict:
    """ppo.learner: actor (policy) + critic (backbone + value head) engines on each of num_actors ranks."""
    ppo, res = cfg.ppo, cfg.ppo.learner
    e, z, n, on_gpu = ELEM[cfg.model.dtype], ppo.zero_stage, res.num_actors, res.num_gpus > 0
    seq, R = cfg.model.max_prompt_len + cfg.model.max_response_len, cfg.model.max_response_len
    actor = engine_states(m.params, m.largest_module, e, z, n, on_gpu)
    critic = engine_states(m.backbone_params, m.largest_module, e, z, n, on_gpu)
    micro, rows = max(1, ppo.mini_batch_size // n), -(-ppo.prompts_per_step // n)
    # Logits: e-bit (e), fp32 copy / temperature (4; shared in fp32 at T=1), log-softmax (4), entropy's exp, product (8).
    f = e + (4 if (e != 4 or ppo.temperature != 1.0) else 0) + 12
    act_actor = train_activations(m, micro, seq, e, R, f, checkpointing)
    act_critic = train_activations(m, micro, seq, e, 0, 0, checkpointing)
    act_eval = inference_activations(m, rows, seq, e) + rows * R * m.vocab * f
    base = (CUDA_CONTEXT if on_gpu else CPU_PROCESS) + _persistent(actor, z) + _persistent(critic, z)
    # The sync streams (tlcr_ray/training/gather.py): ZeRO-3 gathers one bucket (ppo.bucket_mib, or one
    # larger parameter; a tied weight's second name regathers it) at a time on every rank.
    largest_param = e * m.vocab * m.hidden
    gathered = min(e * m.params, int(ppo.bucket_mib * 2**20) + largest_param) if z == 3 else 0
    clone = e * (m.params + (m.vocab * m.hidden if m.tied else 0))
    nccl = on_gpu and _backend(cfg) == "vllm"
    # nccl: rank 0 packs the buckets into the broadcast buffers on the GPU; object store: each bucket is
    # copied to host and put in the store (host: the store's copy of the whole policy, once).
    sync_device = gathered + ((SYNC_BUFFERS if nccl else 0) if on_gpu else clone + gathered)
    phases = {"train": base + max(_train_extra(actor, z, act_actor), _train_extra(critic, z, act_critic)),
              "step": base + max(_step_extra(actor, z), _step_extra(critic, z)),
              "evaluate": base + actor["gathered"] + actor["prefetch"] + act_eval,
              "sync": base + sync_device}
    states = model_states(actor) + model_states(critic) - critic["gathered"]  # one engine gathers at a time
    buffers = (CUDA_CONTEXT if on_gpu else CPU_PROCESS) + max(actor["bucket"], critic["bucket"]) \
        + actor["prefetch"] + sync_device
    procs = _procs_per_gpu(res)
    return _result(math.ceil(n * res.num_gpus), "cuda" if on_gpu else "cpu", phases, states,
                   max(act_actor, act_critic, act_eval), 0, buffers, procs,
                   breakdown={"actor": actor, "critic": critic, "sync_gathered": gathered,
                              "sync_object_store_host": 0 if nccl else clone},
                   inputs={"world": n, "micro_rows": micro, "eval_rows": rows, "seq": seq, "response": R,
                           "zero_stage": z, "dtype": cfg.model.dtype, "weight_sync": "nccl" if nccl else "object_store"})


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
    rows = -(-cfg.ppo.prompts_per_step // res.num_actors)
    weights = e * (m.params if group == "reference" else m.backbone_params)
    act = inference_activations(m, rows, seq, e) + (rows * R * m.vocab * (e + 8) if group == "reference" else 0)
    ctx = CUDA_CONTEXT if on_gpu else CPU_PROCESS
    return _result(math.ceil(res.num_actors * res.num_gpus), "cuda" if on_gpu else "cpu",
                   {"forward": ctx + weights + act}, weights, act, 0, ctx, _procs_per_gpu(res),
                   inputs={"rows": rows, "seq": seq, "dtype": cfg.model.dtype})


def plan_rollout(cfg, m: ModelShape, gpu_memory: int, host_memory: int | None) -> dict:
    """ppo.rollout: vLLM (a share of the device, weights/TP + KV cache) or HF generate (weights + its KV cache)."""
    ppo, res = cfg.ppo, cfg.ppo.rollout
    e, on_gpu, backend = ELEM[cfg.model.dtype], res.num_gpus > 0, _backend(cfg)
    max_len = cfg.model.max_prompt_len + cfg.model.max_response_len + 1
    rows = -(-ppo.prompts_per_step // res.num_actors)
    tp = ppo.vllm_tensor_parallel if backend == "vllm" else 1
    weights, per_token = e * m.params // tp, m.kv_bytes_per_token(e) // tp
    inputs = {"backend": backend, "rows": rows, "max_model_len": max_len, "tensor_parallel": tp}
    if backend == "vllm":
        device = gpu_memory if on_gpu else (host_memory or 0)
        budget = (weights + int(ppo.vllm_kv_cache_gib * GIB) + VLLM_OVERHEAD if ppo.vllm_kv_cache_gib is not None
                  else int(ppo.vllm_memory_utilization * device))
        kv = budget - weights - VLLM_OVERHEAD
        sync = SYNC_BUFFERS if on_gpu else 2 * e * m.params  # NCCL receive buffers / the state dict from the store
        inputs.update(kv_tokens=max(0, kv) // max(1, per_token), kv_tokens_needed=rows * max_len,
                      kv_ok=kv >= per_token * max_len or not device)  # RAM unknown: not judged
        phases = {"generate": budget, "sync": budget + sync}
        buffers = VLLM_OVERHEAD + sync
    else:  # HF generate: weights, its KV cache (a cat copies it: x2), the prefill's MLP, last-position logits
        kv, buffers = 2 * rows * max_len * per_token, CUDA_CONTEXT if on_gpu else CPU_PROCESS
        act = rows * cfg.model.max_prompt_len * e * (2 * m.hidden + 4 * m.intermediate) + rows * m.vocab * 8
        phases = {"generate": buffers + weights + kv + act, "sync": buffers + weights + 2 * e * m.params}
        buffers += 2 * e * m.params  # the sync: the state dict that arrives and the load's copy of it
    return _result(math.ceil(res.num_actors * max(res.num_gpus, 0)), "cuda" if on_gpu else "cpu", phases,
                   weights, 0 if backend == "vllm" else act, max(0, kv), buffers, _procs_per_gpu(res), inputs=inputs)


def _group(cfg, name: str, m: ModelShape, gpu_memory: int, host_memory: int | None, ckpt: bool = False) -> dict:
    g = name.removeprefix("ppo.")
    if g == name:
        out, actors = plan_stage(cfg, name, m, ckpt), getattr(cfg, name).num_workers
    else:
        out = (plan_learner(cfg, m, ckpt) if g == "learner" else plan_rollout(cfg, m, gpu_memory, host_memory)
               if g == "rollout" else plan_scorer(cfg, g, m))
        actors = getattr(cfg.ppo, g).num_actors
    peak, room = out["per_gpu"]["peak"], gpu_memory if out["device"] == "cuda" else host_memory
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
    for name, g in out.items():
        if knobs and not g["fits"]:
            g["knobs"] = suggest(cfg, name, m, gpu_memory_bytes, host_memory_bytes)
    return {"gpu": gpu, "gpu_memory_bytes": gpu_memory_bytes, "host_memory_bytes": host_memory_bytes,
            "fits": all(g["fits"] for g in out.values()) and cpu_ok, "cpu_ppo_total_bytes": cpu_ppo,
            "model": {"base": cfg.model.base, **dataclasses.asdict(m), "params": m.params,
                      "backbone_params": m.backbone_params},
            "offload": "not configured", "groups": out, "checkpoints": checkpoint_sizes(cfg, m),
            "ppo_runs": len(cfg.pipeline.ppo_modes)}


def _with(cfg, changes: dict):
    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        setattr(functools.reduce(getattr, path, new), key, value)
    return new


def _candidates(cfg, name: str):
    """(description, config changes) to try, smallest change first within each knob."""
    if not name.startswith("ppo."):
        t = getattr(cfg, name)
        mb, ga = t.micro_batch_size, t.grad_accum
        for k in (2**j for j in range(1, mb.bit_length()) if mb % 2**j == 0):
            yield (f"{name}.micro_batch_size {mb} → {mb // k} ({name}.grad_accum {ga} → {ga * k} keeps the "
                   f"batch)", {f"{name}.micro_batch_size": mb // k, f"{name}.grad_accum": ga * k})
        if t.zero_stage < 3:
            yield f"{name}.zero_stage {t.zero_stage} → 3", {f"{name}.zero_stage": 3}
        if t.precision == "fp32":
            yield f"{name}.precision fp32 → bf16", {f"{name}.precision": "bf16"}
        for k in (2, 4):
            yield f"{name}.num_workers {t.num_workers} → {t.num_workers * k}", {f"{name}.num_workers": t.num_workers * k}
        return
    g = name.split(".", 1)[1]
    res, ppo = getattr(cfg.ppo, g), cfg.ppo
    if g == "learner" and ppo.zero_stage < 3:
        yield f"ppo.zero_stage {ppo.zero_stage} → 3", {"ppo.zero_stage": 3}
    for k in (2, 4):
        yield (f"ppo.{g}.num_actors {res.num_actors} → {res.num_actors * k}", {f"ppo.{g}.num_actors": res.num_actors * k})
    if g == "learner":
        for k in (2, 4):
            if ppo.mini_batch_size // k >= res.num_actors:
                yield (f"ppo.mini_batch_size {ppo.mini_batch_size} → {ppo.mini_batch_size // k}",
                       {"ppo.mini_batch_size": ppo.mini_batch_size // k})
    if g == "rollout" and _backend(cfg) == "vllm":
        for util in (0.8, 0.7, 0.6, 0.5):
            if util < ppo.vllm_memory_utilization:
                yield (f"ppo.vllm_memory_utilization {ppo.vllm_memory_utilization} → {util}",
                       {"ppo.vllm_memory_utilization": util})
        tp = ppo.vllm_tensor_parallel
        yield (f"ppo.vllm_tensor_parallel {tp} → {tp * 2} (ppo.rollout.num_gpus {res.num_gpus:g} → {tp * 2})",
               {"ppo.vllm_tensor_parallel": tp * 2, "ppo.rollout.num_gpus": float(tp * 2)})
    if cfg.model.dtype == "float32":
        yield "model.dtype float32 → bfloat16", {"model.dtype": "bfloat16"}


def suggest(cfg, name: str, m: ModelShape, gpu_memory: int, host_memory: int | None) -> list[str]:
    """Single changes that fit (the first of each knob), else the knobs together; then mechanics not yet in tlcr."""
    found, tried, last = [], set(), {}
    for text, changes in _candidates(cfg, name):
        knob = text.split(" ", 1)[0]
        last[knob] = (text, changes)  # each knob's furthest setting, for the combination below
        if knob not in tried and _group(_with(cfg, changes), name, m, gpu_memory, host_memory)["fits"]:
            found.append(text)
            tried.add(knob)
    combined, texts = cfg, []
    for text, changes in last.values() if not found else ():
        combined, texts = _with(combined, changes), texts + [text]
        if _group(combined, name, m, gpu_memory, host_memory)["fits"]:
            found.append("together: " + "; ".join(texts))
            break
    g = _group(cfg, name, m, gpu_memory, host_memory)
    if g["peak_phase"] == "sync" and name == "ppo.learner" and cfg.ppo.bucket_mib > 64:
        found.append(f"ppo.bucket_mib {cfg.ppo.bucket_mib:g} → 64 (a smaller weight-sync bucket)")
    if name not in ("ppo.rollout", "ppo.reward", "ppo.reference"):
        ckpt = _group(cfg, name, m, gpu_memory, host_memory, ckpt=True)
        found.append(f"gradient checkpointing (not yet available): peak {ckpt['per_gpu']['peak'] / GIB:.1f} GiB"
                     + ("" if ckpt["fits"] else ", still too much"))
    return found or ["nothing single fits: combine the knobs above or use a larger GPU"]


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
    return report
