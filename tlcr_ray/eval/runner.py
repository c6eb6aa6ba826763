"""Where evaluation runs: in this process (the driver, on its CPU, as always), or in Ray tasks/actors on
GPU workers. The evaluation functions take a runner and leave the choice to it:

    runner = LocalRunner()                        # the default of every evaluation function
    rows = runner.run_all([(fn, (cfg, ...)), ...])  # fn(*args, place=EvalPlace) here, or one Ray task each
    engine = runner.answer_engine(model_dir, dtype, cfg.eval, engine_kwargs)  # MT-Bench/AlpacaEval answers

A function handed to a runner loads its models on `place.device` and generates with `place.backend`, and
returns plain data (rows, metrics, answers); the driver writes the files, so the outputs, their atomic
writes and the resume caches are the same wherever the work ran. The Ray side is `actors/evaluation.py`
(`WorkerRunner`); the CLI face picks the runner (`needs_cluster`, then `eval_dispatch` on the connected
cluster's resources, never on whether the driver has CUDA). This module imports neither Ray nor torch.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

Call = tuple[Callable[..., Any], tuple]
"""(function, positional args): run as function(*args, place=EvalPlace)."""


@dataclass(frozen=True)
class EvalPlace:
    """What an evaluation function runs on: a torch device and a rollout backend (`ppo.rollout_backend`
    spelling; `auto` is resolved where it runs)."""

    device: str = "cpu"
    backend: str = "hf"

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def head_dtype(self, cfg) -> str:
        """The discriminator's and RM's dtype: the model's dtype on a GPU; float32 on a CPU (as the
        driver always scored: bf16 matmuls on a CPU are slow and coarser)."""
        return cfg.model.dtype if self.on_gpu else "float32"


DRIVER = EvalPlace()
"""The driver's place: its CPU and HF `generate`, what evaluation did before it could run on workers."""


@dataclass(frozen=True)
class Dispatch:
    """Where evaluation goes: `on_workers`, each task/actor asking `num_gpus`; `reason` says why."""

    on_workers: bool
    num_gpus: float
    reason: str


def needs_cluster(setting: str, ray_address: str | None, ray_running: bool) -> bool:
    """Is there a cluster to ask about its resources? `never`: no; `always`: yes (a local Ray is
    started when none runs); `auto`: only when Ray already runs in this process (the pipeline's
    training stages started it) or RAY_ADDRESS names a cluster: a plain `tlcr eval` on a laptop starts
    no Ray just to find no GPU."""
    if setting == "never":
        return False
    if setting == "always":
        return True
    return ray_running or bool(ray_address and ray_address != "local")


def eval_dispatch(setting: str, cluster: dict[str, float] | None, num_gpus: float) -> Dispatch:
    """`eval.on_workers` and the cluster's total resources (`ray.cluster_resources()`; None: no
    cluster) -> where evaluation runs. `auto` dispatches when the cluster has at least `num_gpus` GPUs
    (and `num_gpus` > 0); `always` dispatches anyway (an autoscaler may add the GPUs; with
    eval.num_gpus=0 the tasks run on CPU workers)."""
    if setting == "never":
        return Dispatch(False, 0.0, "eval.on_workers=never")
    gpus = float((cluster or {}).get("GPU", 0.0))
    if setting == "always":
        return Dispatch(True, num_gpus, f"eval.on_workers=always (the cluster has {gpus:g} GPUs)")
    if setting != "auto":
        raise ValueError(f"eval.on_workers {setting!r}: expected auto, never or always")
    if cluster is None:
        return Dispatch(False, 0.0, "no Ray cluster connected")
    if num_gpus > 0 and gpus >= num_gpus:
        return Dispatch(True, num_gpus, f"the cluster has {gpus:g} GPUs")
    why = "reports no GPU" if not gpus else f"has {gpus:g} GPUs, fewer than eval.num_gpus={num_gpus:g}"
    return Dispatch(False, 0.0, f"the cluster {why}" if num_gpus > 0 else "eval.num_gpus=0 under auto")


PATH_FIELDS = ("output_dir", "data.path", "model.base", "model.tokenizer", "reward.discriminator",
               "reward.reward_model", "ppo.policy", "disc.labels_path", "eval.model", "eval.mt_bench_dir",
               "eval.alpaca_reference")
"""The config's file and folder fields that an evaluation on a worker reads."""
PATH_SCHEMES = ("planted:",)
"""Prefixes followed by a local path (`data.path: planted:<source>`); other `name:` values are not paths."""


def with_absolute_paths(cfg):
    """A copy of `cfg` whose relative local paths (those that exist from this process's working directory)
    are absolute: a worker runs in another directory (a cluster's, or the job's working_dir)."""
    out = copy.deepcopy(cfg)
    for dotted in PATH_FIELDS:
        *parents, name = dotted.split(".")
        owner = out
        for parent in parents:
            owner = getattr(owner, parent)
        value = getattr(owner, name)
        if not isinstance(value, str) or not value:
            continue
        scheme = next((s for s in PATH_SCHEMES if value.startswith(s)), "")
        path = value[len(scheme):]
        if (scheme or ":" not in path.split("/")[0]) and not os.path.isabs(path) and os.path.exists(path):
            setattr(owner, name, scheme + os.path.abspath(path))
    return out


class AnswerEngine(Protocol):
    def stream(self, batches: Iterable[list[str]]) -> Iterator[list[tuple[str, str]]]:
        """Prompt texts per batch -> (answer, "stop" | "length") per prompt, one batch at a time, in order."""

    def close(self) -> None:
        """Free the model (a worker's GPU)."""


class EvalRunner(Protocol):
    where: str
    """"driver" or "workers" (recorded in the results)."""
    parallel: bool
    """True when independent calls run at once (one task per policy rather than one call for all)."""

    def run_all(self, calls: list[Call]) -> list: ...

    def answer_engine(self, model_dir: str, dtype: str, settings, engine_kwargs: dict) -> AnswerEngine: ...


class LocalAnswers:
    """Answers from a model loaded in this process (on first use)."""

    def __init__(self, model_dir: str, dtype: str, settings, engine_kwargs: dict, place: EvalPlace = DRIVER):
        self.args, self.model = (model_dir, dtype, settings, place, engine_kwargs), None

    def stream(self, batches: Iterable[list[str]]) -> Iterator[list[tuple[str, str]]]:
        from tlcr_ray.eval.answers import AnswerModel

        for batch in batches:
            if self.model is None:
                self.model = AnswerModel(*self.args)
            yield self.model.generate(batch)

    def close(self) -> None:
        self.model = None


class LocalRunner:
    """Everything in this process, one call after another, on the driver's place."""

    where, parallel = "driver", False

    def __init__(self, place: EvalPlace = DRIVER):
        self.place = place

    def run_all(self, calls: list[Call]) -> list:
        return [fn(*args, place=self.place) for fn, args in calls]

    def answer_engine(self, model_dir: str, dtype: str, settings, engine_kwargs: dict) -> LocalAnswers:
        return LocalAnswers(model_dir, dtype, settings, engine_kwargs, self.place)


def run_one(runner: EvalRunner | None, fn: Callable[..., Any], *args) -> Any:
    """fn(*args, place=...) through `runner` (None: here)."""
    return (runner or LocalRunner()).run_all([(fn, args)])[0]
