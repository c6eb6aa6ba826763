"""Configs are checked when they are read: enum-like fields against `tlcr_ray.choices`, numbers against
their bounds, aliases normalised to one spelling; `tlcr` exits 2 on a bad value before Ray or torch load."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tlcr_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")

# key, a bad value: every enum-like field, and the numbers with cheap bounds.
BAD = [
    ("reward.mode", "dense"), ("sft.lr_schedule", "linear"), ("disc.lr_schedule", "step"), ("rm.lr_schedule", "x"),
    ("ppo.lr_schedule", "linear"), ("ppo.rollout_backend", "sglang"), ("ppo.kl_estimator", "k9"),
    ("ppo.critic_init", "random"), ("ppo.critic", "tied"), ("ppo.vf_coef", "0"), ("ppo.vf_coef", "-0.5"),
    ("ppo.truncated", "drop"), ("ppo.resume", "always"), ("model.dtype", "int8"),
    ("serve.dtype", "fp8"),
    ("sft.precision", "fp8"), ("disc.precision", "float64"), ("rm.precision", "int4"), ("serve.mode", "sequence"),
    ("serve.sequence_score", "max"), ("reviser.kind", "gpt"), ("data.on_bad_row", "ignore"),
    ("data.split", "train"), ("pipeline.ppo_modes", "[continuous, dense]"),
    ("ppo.temperature", "0"), ("ppo.temperature", "-1.0"), ("ppo.top_p", "1.5"), ("ppo.mini_batch_size", "0"),
    ("ppo.sync_check_every", "0"), ("ppo.warmup_steps", "-1"), ("ppo.lam", "1.5"),
    ("serve.num_cpus", "0"), ("serve.num_cpus", "-2"),
]


@pytest.mark.parametrize("key,value", BAD)
def test_a_bad_value_is_a_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [f"{key}={value}"])
    message = str(info.value)
    assert key in message and "tiny.yaml" in message and "--set" in message


def test_a_bad_value_in_the_file_names_the_file_and_the_allowed_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ppo:\n  kl_estimator: k9\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: ppo\.kl_estimator: 'k9' is not allowed; expected one of "
                                          r"k1, k3, full"):
        load_config(path)


def test_aliases_are_normalised_to_one_spelling():
    cfg = load_config(TINY, ["model.dtype=bf16", "serve.dtype=fp16", "sft.precision=bfloat16",
                             "disc.precision=float16", "rm.precision=fp32"])
    assert (cfg.model.dtype, cfg.serve.dtype) == ("bfloat16", "float16")
    assert (cfg.sft.precision, cfg.disc.precision, cfg.rm.precision) == ("bf16", "fp16", "fp32")
    assert load_config(REPO / "configs" / "a100-7b.yaml").sft.precision == "bf16"


def test_an_override_changes_only_its_own_section_under_a_yaml_alias():
    # configs/tiny.yaml: `rm: *train` is the very mapping `sft` is (a YAML alias).
    cfg = load_config(TINY, ["rm.max_steps=9"])
    assert (cfg.sft.max_steps, cfg.disc.max_steps, cfg.rm.max_steps) == (4, 4, 9)


def test_the_shipped_configs_are_valid():
    for name in ("demo.yaml", "tiny.yaml", "a100-7b.yaml", "a100-7b-2node.yaml"):
        load_config(REPO / "configs" / name)


def test_serve_num_cpus_is_auto_by_default_and_takes_a_number_or_null():
    assert load_config(None).serve.num_cpus is None
    assert load_config(None, ["serve.num_cpus=2"]).serve.num_cpus == 2
    assert load_config(None, ["serve.num_cpus=0.5"]).serve.num_cpus == 0.5
    assert load_config(None, ["serve.num_cpus=null"]).serve.num_cpus is None


def test_reward_thresholds_are_checked_together():
    with pytest.raises(ConfigError, match="reward.fixed_neg_threshold"):
        load_config(None, ["reward.fixed_neg_threshold=0.7"])


def test_the_choice_lists_have_one_definition():
    from tlcr_ray import choices
    from tlcr_ray.rl import ppo_math, rewards
    from tlcr_ray.training import optim

    assert rewards.MODES is choices.MODES and rewards.TOKEN_MODES is choices.TOKEN_MODES
    assert ppo_math.KL_ESTIMATORS is choices.KL_ESTIMATORS
    assert optim.PRECISIONS is choices.PRECISIONS and optim.WEIGHT_DTYPES is choices.WEIGHT_DTYPES


def test_fp16_weights_train_with_loss_scaling():
    from tlcr_ray.choices import PRECISION_OF_DTYPE, WEIGHT_DTYPES
    from tlcr_ray.training.optim import deepspeed_config

    assert WEIGHT_DTYPES == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    ds = deepspeed_config(micro_batch_size=1, grad_accum=1, zero_stage=2, max_grad_norm=1.0,
                          precision=PRECISION_OF_DTYPE["float16"])
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]  # 0: dynamic


# Every bad value through the real CLI in one fresh interpreter: exit 2, the key on stderr, and neither
# Ray nor torch imported (the check ran before any start-up).
CLI_CASES = """
import contextlib, io, json, sys
from tlcr_ray.cli import main
out = []
for key, value in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["ppo", "--config", sys.argv[2], "--set", f"{key}={value}"])
    out.append([key, rc, err.getvalue()])
print(json.dumps({"cases": out, "ray": "ray" in sys.modules, "torch": "torch" in sys.modules}))
"""


def test_the_cli_exits_2_before_ray_or_torch_start():
    proc = subprocess.run([sys.executable, "-c", CLI_CASES, json.dumps(BAD), TINY], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    for key, rc, stderr in result["cases"]:
        assert rc == 2 and key in stderr and "config error" in stderr, (key, rc, stderr)
    assert not result["ray"] and not result["torch"]


def test_tlcr_ppo_with_a_bad_kl_estimator_exits_2_within_seconds():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tlcr_ray.cli", "ppo", "--config", TINY,
                           "--set", "ppo.kl_estimator=k9"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ppo.kl_estimator" in proc.stderr and "k1, k3, full" in proc.stderr
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("section", ["sft", "disc", "rm", "ppo"])
def test_offload_params_without_zero3_and_optimizer_offload_under_zero0_are_load_time_errors(section):
    with pytest.raises(ConfigError, match=rf"{section}.offload_params.*zero_stage=3"):
        load_config(None, [f"{section}.offload_params=true", f"{section}.zero_stage=2"])
    with pytest.raises(ConfigError, match=rf"{section}.offload_optimizer"):
        load_config(None, [f"{section}.offload_optimizer=true", f"{section}.zero_stage=0"])
    cfg = load_config(None, [f"{section}.offload_params=true", f"{section}.offload_optimizer=true",
                             f"{section}.zero_stage=3"])
    assert getattr(cfg, section).offload_params and getattr(cfg, section).offload_optimizer


def test_the_deepspeed_config_carries_the_offload_settings():
    from tlcr_ray.config import TrainConfig
    from tlcr_ray.training.optim import deepspeed_config, stage_deepspeed_config

    ds = stage_deepspeed_config(TrainConfig(zero_stage=3, offload_optimizer=True, offload_params=True))
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the torch AdamW we pass steps the host partition
    plain = stage_deepspeed_config(TrainConfig())
    assert "offload_optimizer" not in plain["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in plain
    with pytest.raises(ValueError, match="stage 3"):
        deepspeed_config(micro_batch_size=1, grad_accum=1, zero_stage=2, precision="fp32", max_grad_norm=1.0,
                         offload_params=True)


def test_a_shared_critic_is_an_option_of_ppo_with_a_critic():
    assert load_config(TINY).ppo.critic == "separate"  # the default: today's separate critic engine
    cfg = load_config(TINY, ["ppo.critic=shared", "ppo.vf_coef=0.25"])
    assert (cfg.ppo.critic, cfg.ppo.vf_coef) == ("shared", 0.25)
    # ReMax has no critic at all: a shared one asked for with it is refused at load, naming the key.
    with pytest.raises(ConfigError, match=r"--set ppo\.critic: 'shared' .*ppo\.algorithm=remax"):
        load_config(TINY, ["ppo.critic=shared", "ppo.algorithm=remax", "reward.mode=sequence"])
    # A pipeline's ReMax run sets ppo.algorithm itself (tlcr_ray/pipeline.py): the config that runs it with
    # shared-critic PPO runs loads, and that ReMax run builds no critic (tests/integration/test_ppo_shared_critic.py).
    assert load_config(TINY, ["ppo.critic=shared", "pipeline.methods=[sft, ppo-seq, remax]"]).ppo.critic == "shared"
