"""SFT, discriminator and RM training on Ray Train: `TorchTrainer` workers run `tlcr_ray.training.loop`.

    tlcr sft        --config configs/demo.yaml
    tlcr train-disc --config configs/demo.yaml
    tlcr train-rm   --config configs/demo.yaml
    tlcr dpo        --config configs/demo.yaml     # baseline: DPO on the reward pairs, SFT model as reference
    tlcr figa       --config configs/demo.yaml     # baseline: FIGA on the Levenshtein labels

Each stage writes <output_dir>/<stage>/: ray/ (Ray Train storage: the last K DeepSpeed checkpoints),
metrics.jsonl and tb/ (loss, lr, accuracy, tokens/s per optimizer step), model/ (the final HF folder)
and summary.json (DPO also reference_logps.json, computed once before training). Rerunning a stage
restores its latest checkpoint and continues from that step.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tqdm import tqdm

from ray_init import ensure_ray
from tlcr_ray.config import TrainConfig
from tlcr_ray.io import iter_jsonl, read_json, write_json_atomic
from tlcr_ray.layout import RunLayout
from tlcr_ray.models import load_tokenizer, resolve_model
from tlcr_ray.oom import TEST_OOM_ENV, OutOfMemory, find_oom, oom_message
from tlcr_ray.plan import require_fit
from tlcr_ray.training.batching import total_steps
from tlcr_ray.training.examples import stage_examples, stage_init
from tlcr_ray.training.gather import read_export_info
from tlcr_ray.training.loop import FAIL_AT_STEP_ENV, LoopSpec, run_rank

CHECKPOINT_TAG = "ds"


def run_sft(cfg, args=None) -> dict:
    return _dry_run_or_train(cfg, "sft", args)


def run_disc(cfg, args=None) -> dict:
    return _dry_run_or_train(cfg, "disc", args)


def run_rm(cfg, args=None) -> dict:
    return _dry_run_or_train(cfg, "rm", args)


def _dry_run_or_train(cfg, stage: str, args) -> dict:
    if getattr(args, "dry_run", False):  # `--dry-run`: the placement and the memory plan, no model (actors.dry_run)
        from actors.dry_run import supervised_dry_run

        return supervised_dry_run(cfg, stage)
    return train_stage(cfg, stage)


def run_dpo(cfg, args=None) -> dict:
    return _dry_run_or_train(cfg, "dpo", args)


def run_figa(cfg, args=None) -> dict:
    return _dry_run_or_train(cfg, "figa", args)


def train_stage(cfg, stage: str) -> dict:
    """Train one stage end to end on Ray Train and return its summary."""
    train_cfg: TrainConfig = getattr(cfg, stage)
    if train_cfg.use_gpu:  # refused before data, models or Ray load if it cannot fit (`tlcr plan`)
        require_fit(cfg, [stage], stage)
    paths = RunLayout.of(cfg).stage(stage)
    stage_dir = paths.dir.resolve()
    init, why = stage_init(cfg, stage)
    print(why, file=sys.stderr)
    init = resolve_model(init)
    tokenizer_path = resolve_model(cfg.model.tokenizer) if cfg.model.tokenizer else init
    tokenizer = load_tokenizer(tokenizer_path)
    train, heldout, data_stats = stage_examples(cfg, stage, tokenizer)
    steps = total_steps(len(train), train_cfg, train_cfg.num_workers)
    stage_dir.mkdir(parents=True, exist_ok=True)
    done = read_export_info(paths.model) if paths.model.exists() else None
    if done and done.get("final") and done.get("step") == steps and not paths.ray_storage.exists() \
            and paths.summary.exists():  # finished, its resumable state deleted (keep_resume_state false)
        print(f"{stage}: {paths.model} is the finished stage's model (step {steps}); nothing to do "
              "(delete it to train again)", file=sys.stderr)
        return read_json(paths.summary)

    ensure_ray()
    env = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", TEST_OOM_ENV) if k in os.environ}
    spec = LoopSpec(stage=stage, train_cfg=train_cfg, init=init, tokenizer=tokenizer_path, train=train,
                    heldout=heldout, total_steps=steps, stage_dir=str(stage_dir),
                    fail_at_step=int(os.environ.get(FAIL_AT_STEP_ENV, 0)),
                    reference_logps=str(RunLayout.of(cfg).dpo_reference_logps.resolve()) if stage == "dpo" else None)
    # The examples travel once through the object store, not inside the pickled loop config.
    loop_config = {"spec": ray.put(spec), "env": env}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker={"CPU": train_cfg.cpus_per_worker},
                                     # one node when it holds every worker: ZeRO's collectives stay on NVLink
                                     placement_strategy=_worker_strategy(stage, train_cfg)),
        run_config=RunConfig(name=paths.ray_storage.name, storage_path=str(stage_dir),  # <stage>/ray
                             checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures)),
    )
    started = time.time()
    try:
        with _ProgressFromMetrics(paths.metrics, steps, desc=stage) as progress:
            result = trainer.fit()
    except Exception as exc:
        if find_oom(exc) is None:
            raise
        raise OutOfMemory(oom_message(cfg, stage, exc, latest_checkpoint(paths.ray_storage)), stage) from exc
    metrics = dict(result.metrics or {})
    summary = {
        "stage": stage, "model": str(paths.model.resolve()), "init_from": init, "steps": steps,
        "train_examples": len(train), "heldout_examples": len(heldout), "data": data_stats,
        "wall_s": round(time.time() - started, 1),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        # Ray's result carries the metrics of the latest checkpoint, which a restored run may not have written.
        "resumed_from": progress.resumed_from,
        **{k: metrics[k] for k in ("loss", "accuracy", "eval_loss", "eval_accuracy") if k in metrics},
    }
    shutil.rmtree(paths.export, ignore_errors=True)  # superseded by the final model
    if not train_cfg.keep_resume_state:  # DeepSpeed weights + optimizer states: the stage is done
        shutil.rmtree(paths.ray_storage, ignore_errors=True)
        summary["checkpoint"] = None
    summary["resume_state"] = str(paths.ray_storage) if train_cfg.keep_resume_state else "deleted"
    write_json_atomic(paths.summary, summary)
    return summary


def _worker_strategy(stage: str, train_cfg) -> str:
    from actors.dry_run import supervised_layout
    from actors.placement import node_resources

    return supervised_layout(stage, train_cfg, node_resources()).groups[0].strategy


def latest_checkpoint(storage: Path) -> str | None:
    """The newest Ray Train checkpoint folder (step_NNNNNN) under the stage's storage, if any."""
    found = sorted((p for p in storage.rglob("step_*") if p.is_dir()), key=lambda p: p.name) if storage.exists() else []
    return str(found[-1]) if found else None


class _ProgressFromMetrics:
    """A driver-side tqdm bar fed by the metrics.jsonl that rank 0 appends to (the workers run elsewhere).

    Reads the whole (small) file each second and looks only at rows written since `fit()` began, so a
    rank that truncates the log on resume cannot make it miss rows.
    """

    def __init__(self, path: Path, total: int, desc: str):
        self.path, self.total, self.desc = path, total, desc
        self.resumed_from = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self):
        self._since = time.time() - 1.0
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        bar = tqdm(total=self.total, desc=self.desc, unit="step", file=sys.stderr)
        while True:
            stopping = self._stop.wait(1.0)
            rows = [r for _, r in iter_jsonl(self.path, on_invalid="skip")] if self.path.exists() else []
            for row in rows:
                if row.get("time", 0) < self._since:
                    continue
                if row.get("event") == "resumed":
                    self.resumed_from = row["from_step"]
                if "step" in row and row["step"] >= bar.n:
                    bar.n = row["step"]
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}", refresh=False)
            bar.refresh()
            if stopping:
                break
        bar.close()


# ---------------------------------------------------------------- inside each Ray Train worker

class RayTrainCheckpoints:
    """`tlcr_ray.training.loop.Checkpoints` over Ray Train: every rank saves its DeepSpeed shard into its
    own temp folder and Ray Train merges them into one checkpoint in the stage's storage."""

    def restore(self, engine) -> int:
        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return 0
        with checkpoint.as_directory() as folder:
            _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        return client_state["step"]

    def save(self, engine, step: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as folder:
            engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state={"step": step})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step_{step:06d}")

    def report(self, metrics: dict) -> None:
        ray.train.report(metrics)


def _train_loop(config: dict) -> None:
    """Runs in every Ray Train worker: the stage's loop body on this rank."""
    os.environ.update(config["env"])
    ctx = ray.train.get_context()
    run_rank(ray.get(config["spec"]), ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
             RayTrainCheckpoints())
