"""Evaluation on Ray workers: the library's evaluation functions run unchanged inside a Ray task (or, for
answer generation, an actor that keeps its model between batches) that asks eval.num_gpus GPUs, loads
the models on the worker's device in the model's dtype and samples with the configured rollout backend;
the driver gets plain results back and writes the files (`tlcr_ray.eval.runner`).

    runner = eval_runner(cfg)   # WorkerRunner when the cluster has GPUs (eval.on_workers), else LocalRunner
    metrics = run_one(runner, evaluate_rm, cfg)
    runner.ran_on               # [{"pid", "node_id", "device", "gpu_ids"}, ...] of each finished call
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator

import ray

from ray_init import ensure_ray
from tlcr_ray.config import Config
from tlcr_ray.eval.runner import Call, EvalPlace, LocalRunner, eval_dispatch, with_absolute_paths


def _worker_place(backend: str) -> EvalPlace:
    """cuda when Ray gave this worker a GPU AND torch can use it (a fake GPU resource on a CPU machine
    is only bookkeeping), else cpu."""
    import torch

    return EvalPlace("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu", backend)


def _whereabouts(place: EvalPlace) -> dict:
    return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "device": place.device,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "backend": place.backend}


# max_calls=1: the worker process exits after each call, so the GPU memory a vLLM engine held is free
# for the next task (Ray's default for GPU tasks too; explicit because CPU workers run it as well).
@ray.remote(max_calls=1)
def _evaluate(call: Call, backend: str) -> tuple:
    fn, args = call
    place = _worker_place(backend)
    return fn(*args, place=place), _whereabouts(place)


@ray.remote(max_restarts=0)
class AnswerWorker:
    """One policy for MT-Bench/AlpacaEval answers on a worker (`tlcr_ray.eval.answers.AnswerModel`)."""

    def __init__(self, model_dir: str, dtype: str, settings, engine_kwargs: dict, backend: str):
        from tlcr_ray.eval.answers import AnswerModel

        self.place = _worker_place(backend)
        self.model = AnswerModel(model_dir, dtype, settings, self.place, engine_kwargs)

    def generate(self, prompts: list[str]) -> list[tuple[str, str]]:
        return self.model.generate(prompts)

    def whereabouts(self) -> dict:
        return _whereabouts(self.place)


class WorkerAnswers:
    """An `AnswerEngine` on an AnswerWorker actor: every batch is queued at once and the answers come back
    in order, one batch at a time, so the driver appends each to its cache as it arrives."""

    def __init__(self, runner: "WorkerRunner", args: tuple):
        self.runner, self.args, self.actor = runner, args, None

    def stream(self, batches: Iterable[list[str]]) -> Iterator[list[tuple[str, str]]]:
        if self.actor is None:
            model_dir, *rest = self.args
            self.actor = AnswerWorker.options(**self.runner.resources).remote(os.path.abspath(model_dir), *rest,
                                                                               self.runner.backend)
            self.runner.ran_on.append(ray.get(self.actor.whereabouts.remote()))
        for ref in [self.actor.generate.remote(batch) for batch in batches]:
            yield ray.get(ref)

    def close(self) -> None:
        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None


def _portable(arg):
    """A config with its relative paths made absolute (the worker runs elsewhere); anything else as it is."""
    return with_absolute_paths(arg) if isinstance(arg, Config) else arg


class WorkerRunner:
    """`EvalRunner` on Ray workers: each call one task asking `num_gpus` GPUs and `num_cpus` CPUs; independent
    calls run at once (one per GPU)."""

    where, parallel = "workers", True

    def __init__(self, backend: str, num_gpus: float, num_cpus: float):
        self.backend, self.resources = backend, {"num_gpus": num_gpus, "num_cpus": num_cpus}
        self.ran_on: list[dict] = []

    def run_all(self, calls: list[Call]) -> list:
        calls = [(fn, tuple(_portable(a) for a in args)) for fn, args in calls]
        outcomes = ray.get([_evaluate.options(**self.resources).remote(call, self.backend) for call in calls])
        self.ran_on += [where for _, where in outcomes]
        return [result for result, _ in outcomes]

    def answer_engine(self, model_dir: str, dtype: str, settings, engine_kwargs: dict) -> WorkerAnswers:
        return WorkerAnswers(self, (model_dir, dtype, settings, engine_kwargs))


def eval_runner(cfg: Config):
    """Connect to the cluster (or, with eval.on_workers=always and none named, start a local Ray) and pick
    the runner from its resources (`tlcr_ray.eval.runner.eval_dispatch`); says which on stderr."""
    ev = cfg.eval
    ensure_ray()
    decision = eval_dispatch(ev.on_workers, ray.cluster_resources(), ev.num_gpus)
    if not decision.on_workers:
        print(f"tlcr: evaluation runs in the driver: {decision.reason}", file=sys.stderr, flush=True)
        return LocalRunner()
    print(f"tlcr: evaluation runs on Ray workers ({decision.num_gpus:g} GPU, {ev.num_cpus:g} CPU each, backend "
          f"{cfg.ppo.rollout_backend}, dtype {cfg.model.dtype}): {decision.reason}", file=sys.stderr, flush=True)
    return WorkerRunner(cfg.ppo.rollout_backend, decision.num_gpus, ev.num_cpus)
