"""Where evaluation runs (`tlcr_ray.eval.runner`): the decision from eval.on_workers and the cluster's
resources, and that without a cluster the CLI picks the driver without loading Ray at all."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tlcr_ray.config import ConfigError, load_config
from tlcr_ray.eval.runner import DRIVER, EvalPlace, LocalRunner, eval_dispatch, needs_cluster, run_one

REPO = Path(__file__).resolve().parents[2]
EIGHT_GPUS = {"CPU": 96.0, "GPU": 8.0, "memory": 1e12}
CPU_ONLY = {"CPU": 2.0, "memory": 1e10}


@pytest.mark.parametrize("setting, cluster, num_gpus, on_workers, asked", [
    ("auto", EIGHT_GPUS, 1.0, True, 1.0),
    ("auto", {"CPU": 8.0, "GPU": 1.0}, 1.0, True, 1.0),
    ("auto", {"CPU": 8.0, "GPU": 1.0}, 2.0, False, 0.0),  # fewer GPUs than one evaluation needs
    ("auto", CPU_ONLY, 1.0, False, 0.0),                 # a CPU cluster: the driver, as before
    ("auto", None, 1.0, False, 0.0),                     # no cluster at all
    ("auto", EIGHT_GPUS, 0.0, False, 0.0),               # auto never sends GPU-less work to workers
    ("never", EIGHT_GPUS, 1.0, False, 0.0),
    ("always", CPU_ONLY, 0.0, True, 0.0),                # CPU workers on request
    ("always", CPU_ONLY, 1.0, True, 1.0),                # waits for an autoscaler to add a GPU
])
def test_dispatch_follows_the_cluster_resources(setting, cluster, num_gpus, on_workers, asked):
    decision = eval_dispatch(setting, cluster, num_gpus)
    assert (decision.on_workers, decision.num_gpus) == (on_workers, asked)
    assert decision.reason


def test_the_reason_names_what_the_cluster_lacks():
    assert "reports no GPU" in eval_dispatch("auto", CPU_ONLY, 1.0).reason
    assert "fewer than eval.num_gpus=2" in eval_dispatch("auto", {"GPU": 1.0}, 2.0).reason
    assert "8 GPUs" in eval_dispatch("auto", EIGHT_GPUS, 1.0).reason


@pytest.mark.parametrize("setting, address, running, expected", [
    ("auto", None, False, False),        # `tlcr eval` on a laptop: nothing to ask, no Ray started
    ("auto", "local", False, False),
    ("auto", "10.0.0.1:6379", False, True),
    ("auto", None, True, True),          # the pipeline's training stages started a Ray: ask it
    ("never", "10.0.0.1:6379", True, False),
    ("always", None, False, True),
])
def test_a_cluster_is_asked_only_when_there_is_one(setting, address, running, expected):
    assert needs_cluster(setting, address, running) is expected


def test_on_workers_is_a_checked_choice_and_gpus_are_bounded():
    assert load_config(None).eval.on_workers == "auto"
    with pytest.raises(ConfigError, match="eval.on_workers"):
        load_config(None, ["eval.on_workers=sometimes"])
    with pytest.raises(ConfigError, match="eval.num_gpus"):
        load_config(None, ["eval.num_gpus=-1"])


def test_head_models_keep_float32_on_cpu_and_take_the_model_dtype_on_a_gpu():
    cfg = load_config(None, ["model.dtype=bf16"])
    assert DRIVER.head_dtype(cfg) == "float32"
    assert EvalPlace("cuda", "vllm").head_dtype(cfg) == "bfloat16"


def test_the_local_runner_calls_the_function_here_on_the_driver_place():
    def where(x, *, place):
        return x, place, os.getpid()

    assert run_one(None, where, 3) == (3, DRIVER, os.getpid())
    assert LocalRunner().run_all([(where, (1,)), (where, (2,))])[1][0] == 2


CLI_WITHOUT_RAY = """
import os, sys
sys.modules["ray"] = None  # importing Ray would fail: the choice must not need it
os.environ.pop("RAY_ADDRESS", None)
from tlcr_ray.cli import eval_runner
from tlcr_ray.config import load_config
print(type(eval_runner(load_config(None))).__name__)
"""


def test_the_cli_picks_the_driver_without_loading_ray_when_no_cluster_is_named():
    proc = subprocess.run([sys.executable, "-c", CLI_WITHOUT_RAY], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "LocalRunner"


def test_a_worker_gets_the_config_with_absolute_local_paths(tmp_path, monkeypatch):
    from tlcr_ray.eval.runner import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "pairs.jsonl").write_text("")
    cfg = load_config(None, ["output_dir=runs/x", "data.path=planted:pairs.jsonl", "model.base=meta-llama/Llama-2-7b-hf",
                             "reward.discriminator=runs/missing"])
    moved = with_absolute_paths(cfg)
    assert moved.output_dir == str(tmp_path / "runs" / "x")
    assert moved.data.path == f"planted:{tmp_path / 'pairs.jsonl'}"
    assert moved.model.base == "meta-llama/Llama-2-7b-hf"      # a hub id stays one
    assert moved.reward.discriminator == "runs/missing"       # nothing there: left for the worker's error
    assert cfg.output_dir == "runs/x"                          # the driver's config is untouched
    assert with_absolute_paths(load_config(None)).model.base == load_config(None).model.base  # embedded:...
