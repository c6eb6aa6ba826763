"""SFT, discriminator and RM training on Ray Train: `TorchTrainer` workers run DeepSpeed over tlcr_ray.train.

    tlcr sft        --config configs/demo.yaml
    tlcr train-disc --config configs/demo.yaml
    tlcr train-rm   --config configs/demo.yaml

Each stage writes <output_dir>/<stage>/: ray/ (Ray Train storage: the last K DeepSpeed checkpoints),
metrics.jsonl and tb/ (loss, lr, accuracy, tokens/s per optimizer step), model/ (the final HF folder)
and summary.json. Rerunning a stage restores its latest checkpoint and continues from that step.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tqdm import tqdm

from tlcr_ray import train as stages
from tlcr_ray.config import TrainConfig
from tlcr_ray.models import load_tokenizer, resolve_model

# Fault injection for the resume test: a run that started from scratch raises at this optimizer step.
FAIL_AT_STEP_ENV = "TLCR_FAIL_AT_STEP"
CHECKPOINT_TAG = "ds"


def run_sft(cfg, args=None) -> dict:
    return train_stage(cfg, "sft")


def run_disc(cfg, args=None) -> dict:
    return train_stage(cfg, "disc")


def run_rm(cfg, args=None) -> dict:
    return train_stage(cfg, "rm")


def ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. under `ray job submit`), else start a local Ray on 127.0.0.1.

    `address="local"` because a bare `ray.init()` joins whatever /tmp/ray/ray_current_cluster names.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)


def train_stage(cfg, stage: str) -> dict:
    """Train one stage end to end on Ray Train and return its summary."""
    train_cfg: TrainConfig = getattr(cfg, stage)
    stage_dir = cfg.stage_dir(stage).resolve()
    init, why = stages.stage_init(cfg, stage)
    print(why, file=sys.stderr)
    init = resolve_model(init)
    tokenizer_path = resolve_model(cfg.model.tokenizer) if cfg.model.tokenizer else init
    tokenizer = load_tokenizer(tokenizer_path)
    train, heldout, data_stats = stages.stage_examples(cfg, stage, tokenizer)
    steps = stages.total_steps(len(train), train_cfg, train_cfg.num_workers)
    stage_dir.mkdir(parents=True, exist_ok=True)

    ensure_ray()
    env = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE") if k in os.environ}
    loop_config = {
        "stage": stage, "train_cfg": asdict(train_cfg), "init": init, "tokenizer": tokenizer_path,
        "train": ray.put(train), "heldout": ray.put(heldout), "total_steps": steps,
        "stage_dir": str(stage_dir), "env": env, "fail_at_step": int(os.environ.get(FAIL_AT_STEP_ENV, 0)),
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker={"CPU": train_cfg.cpus_per_worker}),
        run_config=RunConfig(name="ray", storage_path=str(stage_dir),
                             checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures)),
    )
    started = time.time()
    with _ProgressFromMetrics(stage_dir / "metrics.jsonl", steps, desc=stage) as progress:
        result = trainer.fit()
    metrics = dict(result.metrics or {})
    summary = {
        "stage": stage, "model": str(stage_dir / "model"), "init_from": init, "steps": steps,
        "train_examples": len(train), "heldout_examples": len(heldout), "data": data_stats,
        "wall_s": round(time.time() - started, 1),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        # Ray's result carries the metrics of the latest checkpoint, which a restored run may not have written.
        "resumed_from": progress.resumed_from,
        **{k: metrics[k] for k in ("loss", "accuracy", "eval_loss", "eval_accuracy") if k in metrics},
    }
    tmp = stage_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(stage_dir / "summary.json")
    return summary


class _ProgressFromMetrics:
    """A driver-side tqdm bar fed by the metrics.jsonl that rank 0 appends to (the workers run elsewhere)."""

    def __init__(self, path: Path, total: int, desc: str):
        self.path, self.total, self.desc = path, total, desc
        self.resumed_from = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self):
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        bar = tqdm(total=self.total, desc=self.desc, unit="step", file=sys.stderr)
        while True:
            stopping = self._stop.wait(1.0)
            if self.path.exists():
                with self.path.open() as fh:
                    fh.seek(self._offset)
                    lines = fh.readlines()
                    self._offset = fh.tell()
                for line in lines:
                    row = json.loads(line)
                    if row.get("event") == "resumed":
                        self.resumed_from = row["from_step"]
                    if "step" in row:
                        bar.n = row["step"]
                        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}", refresh=False)
                if lines:
                    bar.refresh()
            if stopping:
                break
        bar.close()


# ---------------------------------------------------------------- the per-worker loop

def _train_loop(config: dict) -> None:
    """Runs in every Ray Train worker: DeepSpeed over the pure-torch stage, resuming from Ray's checkpoint."""
    os.environ.update(config["env"])
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    stage, train_cfg, steps = config["stage"], TrainConfig(**config["train_cfg"]), config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(config["tokenizer"])
    train, heldout = ray.get(config["train"]), ray.get(config["heldout"])

    torch.manual_seed(train_cfg.seed)
    # Half-precision runs load half-precision weights (7B in fp32 is 28 GB per worker); DeepSpeed keeps fp32 masters.
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(train_cfg.precision, "float32")
    model = stages.build_model(stage, config["init"], dtype, seed=train_cfg.seed)
    optimizer = torch.optim.AdamW(stages.param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr)
    warmup = round(train_cfg.warmup_ratio * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(stages.lr_factor, total=steps, warmup=warmup, schedule=train_cfg.lr_schedule))
    engine, _, _, schedule = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                  config=stages.deepspeed_config(train_cfg))

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        start = client_state["step"]
    log = _MetricsLog(Path(config["stage_dir"]), resumed_from=start) if rank == 0 else None

    batches = stages.micro_batches(train, train_cfg.micro_batch_size, rank, world, train_cfg.seed,
                                   start=start * train_cfg.grad_accum)
    pad_id = tokenizer.pad_token_id
    for step in range(start + 1, steps + 1):
        if step == config["fail_at_step"] and start == 0:
            raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")
        began, lr = time.time(), schedule.get_last_lr()[0]
        stats = stages.StepStats()
        engine.train()
        for _ in range(train_cfg.grad_accum):
            batch = {k: v.to(device) for k, v in stages.collate(stage, next(batches), pad_id).items()}
            loss, correct, counted = stages.compute_loss(stage, engine, batch)
            engine.backward(loss)
            engine.step()
            stats.add(loss.item(), correct, counted, int(batch["attention_mask"].sum()))
        row = {"step": step, "lr": lr, **_all_reduce(stats, device)}
        row["tokens_per_s"] = row["tokens"] / (time.time() - began)
        if log:
            log.write(row)
        final = step == steps
        if final and heldout:
            row.update({f"eval_{k}": v for k, v in _evaluate(stage, engine, heldout, train_cfg, rank, world,
                                                            pad_id, device).items() if k != "tokens"})
            if log:
                log.write({"eval_step": step, **{k: v for k, v in row.items() if k.startswith("eval_")}})
        if final:
            _export(stage, engine, train_cfg, Path(config["stage_dir"]) / "model", tokenizer, rank)
        if final or step % train_cfg.checkpoint_every == 0:
            _report_checkpoint(engine, step, row)
    model_dir = Path(config["stage_dir"]) / "model"
    if start >= steps and not (model_dir / "config.json").exists():  # restored a finished run
        _export(stage, engine, train_cfg, model_dir, tokenizer, rank)
    if start >= steps:
        ray.train.report({"step": steps})
    if log:
        log.close()


def _all_reduce(stats: stages.StepStats, device) -> dict:
    """Sum one step's statistics over the data-parallel ranks -> loss, accuracy, tokens."""
    import torch.distributed as dist

    total = torch.tensor([stats.loss, stats.correct, stats.counted, stats.tokens, stats.micro_batches],
                         dtype=torch.float64, device=device)
    dist.all_reduce(total)
    summed = stages.StepStats(*[float(x) for x in total[:3]], int(total[3]), int(total[4]))
    return summed.summary()


@torch.no_grad()
def _evaluate(stage, engine, heldout, train_cfg, rank, world, pad_id, device) -> dict:
    """Loss and accuracy on the held-out examples, sharded over ranks."""
    engine.eval()
    stats = stages.StepStats()
    shard = heldout[rank::world]
    for i in range(0, len(shard), train_cfg.micro_batch_size):
        batch = {k: v.to(device) for k, v in stages.collate(stage, shard[i:i + train_cfg.micro_batch_size],
                                                            pad_id).items()}
        loss, correct, counted = stages.compute_loss(stage, engine, batch)
        stats.add(loss.item(), correct, counted, int(batch["attention_mask"].sum()))
    return _all_reduce(stats, device)


def _export(stage, engine, train_cfg, path: Path, tokenizer, rank: int) -> None:
    """Rank 0 writes the HF folder; under ZeRO-3 every rank first helps gather the full weights."""
    import torch.distributed as dist

    state = engine._zero3_consolidated_16bit_state_dict() if train_cfg.zero_stage == 3 else None
    if rank == 0:
        stages.export_model(stage, engine.module, path, tokenizer, state_dict=state)
    dist.barrier()


def _report_checkpoint(engine, step: int, metrics: dict) -> None:
    """Every rank saves its DeepSpeed shard into its own temp folder; Ray Train merges them into one checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state={"step": step})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"step_{step:06d}")


class _MetricsLog:
    """Rank 0's metrics: append-only JSONL plus TensorBoard scalars."""

    def __init__(self, stage_dir: Path, resumed_from: int):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = (stage_dir / "metrics.jsonl").open("a")
        self.tb = SummaryWriter(str(stage_dir / "tb"))
        if resumed_from:
            self.write({"event": "resumed", "from_step": resumed_from})

    def write(self, row: dict) -> None:
        self.jsonl.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")
        self.jsonl.flush()
        step = row.get("step", row.get("eval_step"))
        if step is not None:
            for key, value in row.items():
                if key not in ("step", "eval_step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()
