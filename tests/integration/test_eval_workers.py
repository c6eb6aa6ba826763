"""Evaluation dispatched to a Ray worker when the cluster has the GPU it asks for (a fake GPU resource on
this CPU machine): a local Ray on 127.0.0.1 with `num_gpus=1`, a tiny run folder (SFT and TLCR policies,
discriminator, RM, token labels), and every evaluation run twice, through the worker runner that
`eval.on_workers: auto` picks and in the driver. Each worker call must have run in another process that
held the GPU resource, and give what the driver gives for the same seed. Then `tlcr eval rm` (the CLI's
`main`, in the process whose Ray has the GPU, as in the pipeline) says it evaluated on workers.

The scenario runs in a subprocess, so its Ray (with the fake GPU) is not the session's `ray_local`. (A
second process joining this loopback-only Ray through RAY_ADDRESS hangs in `ray.init` outside a network
namespace: Ray 2.60 looks for a raylet on the machine's own address; tests/cluster/ joins inside one.)
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _overrides(spec: dict) -> list[str]:
    return [f"output_dir={spec['run']}", f"model.base={spec['tiny']}", f"reward.discriminator={spec['disc']}",
            f"reward.reward_model={spec['rm']}", "model.max_response_len=6", "pipeline.eval_prompts=3",
            "pipeline.eval_seeds=[0,1]", "eval.max_new_tokens=5", "eval.batch_size=2", "eval.temperature=1.0",
            "eval.limit=3", "eval.num_cpus=1"]


def _evaluations(cfg, runner) -> dict:
    from tlcr_ray.eval.benchmarks import AnswerGenerator
    from tlcr_ray.eval.heldout import evaluate_disc, evaluate_rm
    from tlcr_ray.eval.policy_table import reward_table
    from tlcr_ray.eval.report import labelled_pair_probs
    from tlcr_ray.eval.runner import run_one
    from tlcr_ray.io import KeyedJsonl

    table = reward_table(cfg, runner)
    gen = AnswerGenerator(f"{cfg.output_dir}/sft/model", cfg.eval,
                          KeyedJsonl(Path(cfg.output_dir) / f"answers-{runner.where}.jsonl"), runner=runner)
    try:
        answers = gen.answer([[{"role": "user", "content": q}] for q in ("Hi there", "Name a colour.", "Why?")], "t")
    finally:
        gen.close()
    return {"table": table, "rm": run_one(runner, evaluate_rm, cfg), "disc": run_one(runner, evaluate_disc, cfg),
            "pairs": run_one(runner, labelled_pair_probs, cfg, 4),
            "answers": [(a["answer"], a["finish_reason"]) for a in answers]}


def run_scenario(spec: dict) -> dict:
    import ray

    from actors.evaluation import WorkerRunner, eval_runner
    from tlcr_ray.cli import main
    from tlcr_ray.config import load_config
    from tlcr_ray.eval.runner import LocalRunner
    from ray_init import ensure_ray

    ensure_ray(num_cpus=2, num_gpus=1, env_vars={"RAY_AUTH_MODE": "disabled"})
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(spec))
    runner = eval_runner(cfg)
    out = {"driver_pid": os.getpid(), "driver_node": ray.get_runtime_context().get_node_id(),
           "runner": type(runner).__name__}
    if isinstance(runner, WorkerRunner):
        out["workers"] = _evaluations(cfg, runner)
        out["ran_on"] = runner.ran_on
    out["driver"] = _evaluations(cfg, LocalRunner())
    overrides = [arg for o in _overrides(spec) for arg in ("--set", o)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["eval", "rm", "--config", "configs/tiny.yaml", *overrides])  # stops the Ray on its way out
    out["cli"] = {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()[-4000:]}
    return out


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, tiny_model_dir, head_models, planted_rows) -> dict:
    from tlcr_ray.labeling.labels import write_labels

    run = tmp_path_factory.mktemp("eval-workers") / "run"
    shutil.copytree(tiny_model_dir, run / "sft" / "model")
    shutil.copytree(tiny_model_dir, run / "ppo-continuous" / "model")  # the TLCR row
    write_labels(run / "label" / "labels.jsonl", planted_rows(40, seed=3))
    spec = {"run": str(run), "tiny": tiny_model_dir, **head_models}
    (run.parent / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, __file__, str(run.parent)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=840)
    result = run.parent / "scenario.json"
    assert result.exists(), f"the scenario died (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(result.read_text())


def test_auto_picks_the_workers_when_the_cluster_has_a_gpu(scenario):
    assert scenario["runner"] == "WorkerRunner"


def test_every_evaluation_ran_in_a_worker_process_holding_the_gpu(scenario):
    # 2 policy tasks (SFT, TLCR: one per GPU task) + the answer actor + rm + disc + the heat-map pairs.
    assert len(scenario["ran_on"]) == 6
    for where in scenario["ran_on"]:
        assert where["pid"] != scenario["driver_pid"]
        assert where["gpu_ids"] == ["0"]   # Ray handed it the (fake) GPU
        assert where["device"] == "cpu"    # ...which torch cannot use here: the CPU, not a crash
    assert scenario["workers"]["table"]["evaluated_on"] == "workers"
    assert scenario["driver"]["table"]["evaluated_on"] == "driver"


def _same(worker, driver, path="") -> None:
    """Equal structures; floats to 1e-4 (the worker's torch runs on fewer threads)."""
    if isinstance(driver, dict):
        assert worker.keys() == driver.keys(), path
        for key in driver:
            _same(worker[key], driver[key], f"{path}.{key}")
    elif isinstance(driver, list):
        assert len(worker) == len(driver), path
        for i, (w, d) in enumerate(zip(worker, driver)):
            _same(w, d, f"{path}[{i}]")
    elif isinstance(driver, float):
        assert worker == pytest.approx(driver, abs=1e-3, rel=1e-4, nan_ok=True), path
    else:
        assert worker == driver, path


@pytest.mark.parametrize("part", ["table", "rm", "disc", "pairs", "answers"])
def test_the_worker_gives_what_the_driver_gives_for_the_same_seed(scenario, part):
    worker, driver = scenario["workers"][part], scenario["driver"][part]
    if part == "table":
        assert list(driver["rows"]) == ["SFT", "TLCR"] and driver["prompts"] == 3
        worker, driver = {k: v for k, v in worker.items() if k != "evaluated_on"}, \
            {k: v for k, v in driver.items() if k != "evaluated_on"}
    if part == "disc":
        assert driver["sequences"] > 0
    _same(worker, driver, part)


def test_the_cli_evaluates_on_the_workers_and_writes_the_same_result(scenario):
    cli = scenario["cli"]
    assert cli["rc"] == 0, cli["stderr"]
    assert "evaluation runs on Ray workers" in cli["stderr"] and "the cluster has 1 GPUs" in cli["stderr"]
    printed = json.loads(cli["stdout"][cli["stdout"].index("{"):])
    _same({k: printed[k] for k in scenario["driver"]["rm"]}, scenario["driver"]["rm"], "cli")


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    (folder / "scenario.json").write_text(json.dumps(run_scenario(json.loads((folder / "spec.json").read_text()))))
