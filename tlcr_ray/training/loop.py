"""The body of one supervised stage on one data-parallel rank: DeepSpeed over the pure-torch pieces.

    run_rank(LoopSpec(stage="disc", ...), rank=0, world=1, device=torch.device("cpu"), checkpoints=io)

The Ray layer (`actors/supervised.py`) calls this inside each Ray Train worker and supplies
`checkpoints` (restore from / report to Ray Train's storage); nothing here imports Ray, so a plain
process can run the same loop.
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from tlcr_ray.config import TrainConfig
from tlcr_ray.layout import POLICY_STAGES
from tlcr_ray.models import (
    SequenceRewardModel,
    TokenDiscriminator,
    enable_gradient_checkpointing,
    load_policy,
    load_tokenizer,
)
from tlcr_ray.oom import maybe_inject_oom
from tlcr_ray.tracking import MetricsLog
from tlcr_ray.training.batching import collate, micro_batches
from tlcr_ray.training.losses import StepStats, compute_loss
from tlcr_ray.training.optim import WEIGHT_DTYPES, lr_scheduler, param_groups, stage_deepspeed_config

FAIL_AT_STEP_ENV = "TLCR_FAIL_AT_STEP"
"""Fault injection for the resume test: a run that started from scratch raises at this optimizer step."""


class Checkpoints(Protocol):
    def restore(self, engine) -> int:
        """Load the latest checkpoint into `engine`; -> its step (0: none)."""

    def save(self, engine, step: int, metrics: dict) -> None:
        """Save `engine` at `step` (collective: every rank calls it)."""

    def report(self, metrics: dict) -> None:
        """Report metrics without a checkpoint."""


@dataclass
class LoopSpec:
    stage: str
    train_cfg: TrainConfig
    init: str
    """Model folder to start from."""
    tokenizer: str
    train: list[dict]
    heldout: list[dict]
    total_steps: int
    stage_dir: str
    fail_at_step: int = 0
    reference_logps: str | None = None
    """DPO only: the cache file of the reference's log-probs (RunLayout.dpo_reference_logps)."""


def build_model(stage: str, init_path: str, dtype: str = "float32", seed: int = 0,
                gradient_checkpointing: bool = False) -> nn.Module:
    """sft / dpo / figa: the causal LM itself; disc / rm: its backbone with a fresh head.
    `gradient_checkpointing` (<stage>.gradient_checkpointing): HF's, non-reentrant, on the LM or the head
    model's backbone."""
    if stage in POLICY_STAGES:
        model = load_policy(init_path, dtype)
    else:
        cls = {"disc": TokenDiscriminator, "rm": SequenceRewardModel}[stage]
        model = cls.from_pretrained(init_path, dtype=dtype, seed=seed)
    return enable_gradient_checkpointing(model) if gradient_checkpointing else model


def build_engine(spec: LoopSpec):
    """The model, AdamW, the lr schedule and the DeepSpeed engine of the stage -> (engine, schedule)."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    cfg = spec.train_cfg
    torch.manual_seed(cfg.seed)
    # Half-precision runs load half-precision weights (7B in fp32 is 28 GB per worker); DeepSpeed keeps fp32 masters.
    model = build_model(spec.stage, spec.init, WEIGHT_DTYPES[cfg.precision], seed=cfg.seed,
                        gradient_checkpointing=cfg.gradient_checkpointing)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    warmup = round(cfg.warmup_ratio * spec.total_steps)
    schedule = lr_scheduler(optimizer, total=spec.total_steps, warmup=warmup, schedule=cfg.lr_schedule)
    engine, _, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                  config=stage_deepspeed_config(cfg))
    return engine, schedule


def run_rank(spec: LoopSpec, rank: int, world: int, device: torch.device, checkpoints: Checkpoints) -> None:
    """Train from the latest checkpoint to `total_steps`; rank 0 logs metrics and exports the model."""
    stage, cfg, steps = spec.stage, spec.train_cfg, spec.total_steps
    tokenizer = load_tokenizer(spec.tokenizer)
    reference = None
    if stage == "dpo":  # before the policy engine exists: the reference is never in memory beside it
        reference = reference_logps(spec, rank, world, device, tokenizer.pad_token_id)
    engine, schedule = build_engine(spec)
    start = checkpoints.restore(engine)
    log = MetricsLog(spec.stage_dir, resume_step=start, drop_after_resume=False) if rank == 0 else None
    if log and start:
        log.event(event="resumed", from_step=start)
    if log and reference:
        log.event(event="reference_logps", **reference)
    model_dir = Path(spec.stage_dir) / "model"
    batches = micro_batches(spec.train, cfg.micro_batch_size, rank, world, cfg.seed, start=start * cfg.grad_accum)
    pad_id = tokenizer.pad_token_id
    for step in range(start + 1, steps + 1):
        if step == spec.fail_at_step and start == 0:
            raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")
        maybe_inject_oom(stage, step)  # TLCR_TEST_OOM, a test hook (tlcr_ray.oom)
        began, lr = time.time(), schedule.get_last_lr()[0]
        stats = StepStats()
        engine.train()
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in collate(stage, next(batches), pad_id).items()}
            loss, correct, counted = compute_loss(stage, engine, batch, cfg)
            engine.backward(loss)
            engine.step()
            stats.add(loss.item(), correct, counted, int(batch["attention_mask"].sum()))
        row = {"lr": lr, **all_reduce(stats, device)}
        row["tokens_per_s"] = row["tokens"] / (time.time() - began)
        if log:
            log.write(step, row)
        final = step == steps
        if final and spec.heldout:
            row.update({f"eval_{k}": v for k, v in evaluate(stage, engine, spec.heldout, cfg, rank, world, pad_id,
                                                           device).items() if k != "tokens"})
            if log:
                log.event(eval_step=step, **{k: v for k, v in row.items() if k.startswith("eval_")})
        if final:
            export(stage, engine, cfg, model_dir, tokenizer, rank, step, final=True)
        elif cfg.export_every and step % cfg.export_every == 0:
            export(stage, engine, cfg, Path(spec.stage_dir) / "export", tokenizer, rank, step)
        # The last step's resumable state would be deleted at once unless keep_resume_state: the final
        # export (tlcr_export.json "final") is what marks the stage done.
        if step % cfg.checkpoint_every == 0 or (final and cfg.keep_resume_state):
            checkpoints.save(engine, step, {"step": step, **row})
        elif final:
            checkpoints.report({"step": step, **row})
    if start >= steps:  # restored a finished run
        if not (model_dir / "config.json").exists():
            export(stage, engine, cfg, model_dir, tokenizer, rank, steps, final=True)
        checkpoints.report({"step": steps})
    if log:
        log.close()


def all_reduce(stats: StepStats, device) -> dict:
    """Sum one step's statistics over the data-parallel ranks -> loss, accuracy, tokens."""
    import torch.distributed as dist

    total = torch.tensor([stats.loss, stats.correct, stats.counted, stats.tokens, stats.micro_batches],
                         dtype=torch.float64, device=device)
    dist.all_reduce(total)
    summed = StepStats(*[float(x) for x in total[:3]], int(total[3]), int(total[4]))
    return summed.summary()


@torch.no_grad()
def evaluate(stage, engine, heldout, train_cfg, rank, world, pad_id, device) -> dict:
    """Loss and accuracy on the held-out examples, sharded over ranks."""
    engine.eval()
    stats = StepStats()
    shard, size = heldout[rank::world], train_cfg.micro_batch_size
    for i in range(0, len(shard), size):
        batch = {k: v.to(device) for k, v in collate(stage, shard[i:i + size], pad_id).items()}
        loss, correct, counted = compute_loss(stage, engine, batch, train_cfg)
        stats.add(loss.item(), correct, counted, int(batch["attention_mask"].sum()))
    return all_reduce(stats, device)


def reference_logps(spec: LoopSpec, rank: int, world: int, device, pad_id: int) -> dict:
    """DPO: the reference (the stage's init, i.e. the SFT model) log-probs of every train and held-out pair,
    attached to the examples. Rank 0 reads the cache; without one, each rank scores its shard, the shards
    are gathered and rank 0 writes the cache (atomically), so a resumed or rerun stage reads it.
    -> {"pairs", "computed", "seconds"} for the metrics log."""
    import torch.distributed as dist

    from tlcr_ray.training import dpo

    began, examples = time.time(), spec.train + spec.heldout
    box = [dpo.read_cached(spec.reference_logps, examples, spec.init) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    logps = box[0]
    if logps is None:
        model = load_policy(spec.init, WEIGHT_DTYPES[spec.train_cfg.precision]).to(device)
        mine = dpo.compute_reference_logps(model, examples[rank::world], pad_id, spec.train_cfg.micro_batch_size,
                                           device)
        del model
        gc.collect()  # the reference's weights go before the policy, its Adam states and its grads arrive
        shards = [None] * world
        dist.all_gather_object(shards, mine)
        logps = {k: v for shard in shards for k, v in shard.items()}
        if rank == 0:
            dpo.write_cached(spec.reference_logps, examples, spec.init, logps)
        dist.barrier()
    dpo.attach(examples, logps)
    return {"pairs": len(examples), "computed": box[0] is None, "seconds": round(time.time() - began, 1)}


def export(stage, engine, cfg: TrainConfig, path: Path, tokenizer, rank: int, step: int, final: bool = False) -> None:
    """Rank 0 writes the HF folder in cfg.export_dtype, streamed bucket by bucket (cfg.bucket_mib): under
    ZeRO-3 every rank takes part in each bucket's gather and nothing holds the whole model."""
    import torch.distributed as dist

    from tlcr_ray.training.gather import export_cast, state_buckets, tied_names, write_hf_folder

    module = engine.module
    stored, gathered, rounding = export_cast(cfg.export_dtype, cfg.export_rounding, next(module.parameters()).dtype)
    buckets = state_buckets(module, zero3=cfg.zero_stage == 3, rank=rank, bucket_bytes=int(cfg.bucket_mib * 2**20),
                            dtype=gathered, skip=tied_names(module))
    write_hf_folder(buckets, path, module=module, rank=rank, tokenizer=tokenizer if rank == 0 else None,
                    dtype=stored, extra={"stage": stage, "step": step, "final": final}, rounding=rounding,
                    seed=cfg.seed)
    dist.barrier()
