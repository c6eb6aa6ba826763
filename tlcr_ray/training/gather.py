"""Streamed weights: gather a (ZeRO-3 sharded) model a bounded bucket at a time and hand each bucket on.

    for bucket in state_buckets(engine.module, zero3=True, rank=rank, bucket_bytes=256 * 2**20):
        if bucket is not None:              # rank 0: {hf_name: tensor}; other ranks: None
            consume(bucket)                 # write a shard / put it in the object store / broadcast it
    write_hf_folder(state_buckets(...), "runs/x/model", module=engine.module, rank=rank)

Every rank must drain the generator: under ZeRO-3 each bucket is an all-gather
(`deepspeed.zero.GatheredParameters`; on CPU gloo ranks a piecewise gather to rank 0), released before
the next one. So the extra memory of an export or a weight sync is one bucket (<= bucket_bytes, or a
single parameter larger than that) plus, for a tied weight named twice (lm_head = embed_tokens), that
parameter gathered again: at most bucket_bytes + the largest parameter, never the whole model
(`bench/bench_gather.py` measures it).
A yielded bucket's tensors are the gathered parameters themselves (copies when `dtype`/`device` differ,
or when a parameter is a view of a larger flat buffer, as under ZeRO-1/2: see `compact`): valid until
the next bucket is requested, so a consumer that keeps them must copy them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

DEFAULT_BUCKET_MIB = 256
"""ppo.bucket_mib / <stage>.bucket_mib default: large enough that a 7B model's sync is ~100 all-gathers."""


def param_bytes(tensor: torch.Tensor) -> int:
    """Full (unpartitioned) bytes of a parameter; ZeRO-3 keeps the full element count in `ds_numel`."""
    return getattr(tensor, "ds_numel", tensor.numel()) * tensor.element_size()


def plan_buckets(module: nn.Module, bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """The module's state-dict entries (HF names, in state-dict order) cut into buckets of at most
    `bucket_bytes` of distinct tensors (a larger tensor is a bucket of its own). A tensor named twice
    (tied weights) is listed again in the bucket where its second name falls."""
    buckets, current, size, seen = [], [], 0, set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        nbytes = 0 if id(tensor) in seen and any(t is tensor for _, t in current) else param_bytes(tensor)
        seen.add(id(tensor))
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
            nbytes = param_bytes(tensor)
        current.append((name, tensor))
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def state_buckets(module: nn.Module, *, zero3: bool, rank: int, bucket_bytes: int,
                  dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  skip: Iterable[str] = (), compact_views: bool = True) -> Iterator[dict[str, torch.Tensor] | None]:
    """Yield the module's weights bucket by bucket: {name: tensor} on rank 0, None on the other ranks.

    Collective under ZeRO-3 (every rank must iterate to the end). `skip`: names left out (e.g. a tied
    lm_head.weight an HF folder does not store). `dtype`/`device`: the yielded tensors' (default: as held).
    `compact_views` False: views into a larger storage (ZeRO-1/2) stay views, for a consumer that copies
    them out itself (the same-node handover, `tlcr_ray.rl.handover`); never pickle those.
    """
    skip = set(skip)
    for bucket in plan_buckets(module, bucket_bytes):
        entries = [(n, t) for n, t in bucket if n not in skip]
        if not entries:
            continue
        params = list({id(t): t for _, t in entries if isinstance(t, nn.Parameter)}.values())
        if zero3 and params and _gloo_partitions(params):
            yield _gather_to_rank0(entries, rank, dtype, device)
        elif zero3 and params:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield _rank0_view(entries, rank, dtype, device, compact_views)
        else:
            yield _rank0_view(entries, rank, dtype, device, compact_views)


GATHER_CHUNK_BYTES = 4 * 2**20
"""Piece size of a gloo gather: gloo stages each collective's output in a buffer of its own (2x a whole
parameter through `GatheredParameters`), so large parameters travel in pieces of this size."""


def _gloo_partitions(params: list[nn.Parameter]) -> bool:
    """True when these ZeRO-3 parameters live on CPU ranks joined by gloo, where `_gather_to_rank0` applies
    (NCCL gathers into its output without staging: DeepSpeed's own GatheredParameters is used there)."""
    import torch.distributed as dist

    p = params[0]
    if getattr(p, "ds_tensor", None) is None or getattr(p, "ds_secondary_tensor", None) is not None:
        return False
    return p.ds_tensor.device.type == "cpu" and dist.get_backend(getattr(p, "ds_process_group", None)) == "gloo"


def _gather_to_rank0(entries, rank: int, dtype, device) -> dict[str, torch.Tensor] | None:
    """The bucket's full tensors on rank 0 only, each assembled in one buffer from every rank's ZeRO-3
    partition in GATHER_CHUNK_BYTES pieces: the extra memory is the bucket itself plus one staged piece
    per rank, and the other ranks hold nothing but their partitions. DeepSpeed's state is not touched
    (the parameters stay partitioned)."""
    full = {}
    for _, tensor in entries:
        if id(tensor) not in full:
            full[id(tensor)] = _gather_param(tensor) if hasattr(tensor, "ds_tensor") else tensor.detach()
    if rank != 0:
        return None
    return {name: full[id(t)].to(device=device, dtype=dtype or full[id(t)].dtype) for name, t in entries}


def _gather_param(param: nn.Parameter) -> torch.Tensor | None:
    """One ZeRO-3 parameter's full tensor on the group's rank 0 (None elsewhere). Rank r holds elements
    [r * n, (r + 1) * n) of the flattened parameter (n = ds_tensor.ds_numel; the last rank is padded)."""
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status == ZeroParamStatus.AVAILABLE:  # a persistent (small) parameter: every rank holds it
        return param.detach() if dist.get_rank(param.ds_process_group) == 0 else None
    group = param.ds_process_group
    world, me = dist.get_world_size(group), dist.get_rank(group)
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    n = param.ds_tensor.ds_numel
    part = param.ds_tensor.detach().reshape(-1)[:n]
    rows = torch.empty(world, n, dtype=part.dtype) if me == 0 else None  # [world, n]: the flat parameter, padded
    step = max(1, GATHER_CHUNK_BYTES // part.element_size())
    for start in range(0, n, step):
        end = min(n, start + step)
        dist.gather(part[start:end].contiguous(), [rows[r, start:end] for r in range(world)] if me == 0 else None,
                    dst=dst, group=group)
    return None if rows is None else rows.view(-1)[:param.ds_numel].view(param.ds_shape)


def _rank0_view(entries, rank: int, dtype, device, compact_views: bool = True) -> dict[str, torch.Tensor] | None:
    if rank != 0:
        return None
    keep = compact if compact_views else (lambda t: t)
    return {name: keep(tensor.detach().to(device=device, dtype=dtype or tensor.dtype)) for name, tensor in entries}


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or a copy when it is a view into a larger storage. ZeRO-1/2 keep every parameter
    as a view of one flat buffer, and pickling a view (ray.put, torch.save) writes the whole storage:
    a bucket of 200 such views would carry the whole model 200 times."""
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def items_of(buckets: Iterable[dict[str, torch.Tensor] | None]) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of each bucket in turn, letting go of a bucket before the next one is
    gathered. A consumer's own loop variable would keep the previous bucket alive while the producer
    gathers the next (`for b in buckets` rebinds `b` only once the next bucket exists): two buckets at
    once instead of one."""
    for bucket in buckets:
        items = list(reversed(bucket.items())) if bucket else []
        bucket = None
        while items:  # popped, so that a pair the consumer is done with is not kept by this list
            yield items.pop()


def tied_names(module: nn.Module) -> set[str]:
    """State-dict names an HF folder leaves out because they alias another weight (lm_head of tied models)."""
    state = module.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    tied = set()
    for name, tensor in state.items():
        if id(tensor) in first:
            tied.add(name)
        else:
            first[id(tensor)] = name
    return tied


def _write_shards(buckets: Iterable[dict[str, torch.Tensor]], folder: Path, prefix: str = "") -> dict:
    """Each bucket its own safetensors shard (names with `prefix` stripped); -> the HF index (weight_map)."""
    from safetensors.torch import save_file

    weight_map, total, files = {}, 0, []
    for bucket in buckets:
        shard = {name[len(prefix):]: t.contiguous() for name, t in bucket.items()}
        bucket = None  # only `shard` holds the tensors now: dropped below, before the next gather
        if not shard:
            continue
        fname = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        files.append(fname)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update({name: fname for name in shard})
        shard = None
    if len(files) == 1:  # one shard: the plain single-file layout
        (folder / files[0]).rename(folder / "model.safetensors")
        return {"files": ["model.safetensors"], "total_size": total}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"files": files, "total_size": total}


def write_hf_folder(buckets: Iterable[dict[str, torch.Tensor] | None], path: str | Path, *, module: nn.Module,
                    rank: int, tokenizer=None, dtype: torch.dtype | None = None, extra: dict | None = None,
                    rounding: str = "nearest", seed: int = 0) -> None:
    """Stream `buckets` (from `state_buckets`, drained on every rank) into an HF folder, atomically (rank 0).

    A causal LM: config.json, generation_config.json and safetensors shards (model.safetensors, or
    model-NNNNN.safetensors + index). A head model (`backbone.*` / `head.*` names, `tlcr_ray.models.heads`):
    the backbone folder, head.safetensors and head.json. `dtype`: the stored dtype, written to config.json.
    `extra`: written as tlcr_export.json (e.g. the step it was taken at). `rounding` "stochastic": the
    buckets arrive in fp32 and are rounded to bf16 here (`tlcr_ray.training.rounding`, seeded by `seed`).
    """
    if rank != 0:
        for _ in buckets:  # the other ranks only take part in the gathers
            pass
        return
    from safetensors.torch import save_file

    from tlcr_ray.io import atomic_folder
    from tlcr_ray.training.rounding import round_bucket

    head_model = hasattr(module, "backbone") and hasattr(module, "head")
    model = module.backbone if head_model else module
    with atomic_folder(path) as tmp:
        head: dict[str, torch.Tensor] = {}

        def weights():
            for bucket in buckets:
                if rounding == "stochastic":
                    bucket = round_bucket(bucket, seed)
                if head_model:  # the head is a few KB: kept; the backbone's tensors go to shards
                    head.update({n[len("head."):]: t.detach().clone().cpu() for n, t in bucket.items()
                                 if n.startswith("head.")})
                    bucket = {n: t for n, t in bucket.items() if n.startswith("backbone.")}
                yield bucket
                bucket = None  # released before the next bucket is gathered (see items_of)

        written = _write_shards(weights(), tmp, prefix="backbone." if head_model else "")
        config = type(model.config).from_dict(model.config.to_dict())  # a copy: the live one keeps its dtype
        config.dtype = dtype or next(iter(model.parameters())).dtype
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None and getattr(model, "can_generate", lambda: False)():
            generation.save_pretrained(tmp)
        if head_model:
            from tlcr_ray.models.heads import HEAD_FORMAT_VERSION

            save_file(head, str(tmp / "head.safetensors"))
            meta = {"kind": module.kind, "hidden_size": module.config.hidden_size,
                    "format_version": HEAD_FORMAT_VERSION}
            (tmp / "head.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "tlcr_export.json").write_text(json.dumps({**(extra or {}), "bytes": written["total_size"],
                                                          "dtype": str(config.dtype).removeprefix("torch."),
                                                          "rounding": rounding}) + "\n")


def export_dtype(name: str | None, held: torch.dtype) -> torch.dtype:
    """The dtype an HF export is written in: `name` (float32 / bfloat16 / float16) or, for None/"auto", `held`."""
    if name in (None, "auto"):
        return held
    from tlcr_ray.models import torch_dtype

    return torch_dtype(name)


def export_cast(name: str | None, rounding: str, held: torch.dtype) -> tuple[torch.dtype, torch.dtype | None, str]:
    """An export's (stored dtype, dtype `state_buckets` should yield, rounding): `rounding`
    (<stage>.export_rounding) applies only to an fp32 model stored in bf16, whose buckets then stay fp32
    for the writer to round; else nearest, cast while gathering (a checkpoint's "auto" export stays exact)."""
    stored = export_dtype(name, held)
    if rounding == "stochastic" and stored == torch.bfloat16 and held == torch.float32:
        return stored, None, "stochastic"
    return stored, stored, "nearest"


def read_export_info(path: str | Path) -> dict | None:
    """tlcr_export.json of an exported folder (None when absent: an older export or another tool's)."""
    p = Path(path) / "tlcr_export.json"
    return json.loads(p.read_text()) if p.exists() else None
