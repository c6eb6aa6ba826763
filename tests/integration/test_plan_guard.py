"""The stages check `tlcr plan` before they start: a GPU config that cannot fit is a ConfigError (exit 2)
naming the group, before Ray, any data or any model is touched."""
from __future__ import annotations

from pathlib import Path

import pytest

from tlcr_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
A100 = REPO / "configs" / "a100-7b.yaml"
A100_2NODE = REPO / "configs" / "a100-7b-2node.yaml"  # separate pools: the learner's sync clone on its own GPU


@pytest.fixture(autouse=True)
def no_local_cuda(monkeypatch):
    """As on the cluster's CPU-only head node: the plan takes the GPU size from the config's `gpu`."""
    monkeypatch.setattr("tlcr_ray.plan.local_cuda_memory", lambda: None)


def test_supervised_stage_refuses_a_config_that_cannot_fit_before_ray_starts(tmp_path):
    import ray

    from actors.supervised import train_stage

    cfg = load_config(A100, [f"output_dir={tmp_path}", "gpu=a100-40gb", "disc.micro_batch_size=64",
                             "disc.max_len=4096"])
    was_up = ray.is_initialized()  # another module's session Ray may be up already: this call starts none
    with pytest.raises(ConfigError, match=r"^disc does not fit a100-40gb: about .* GiB per GPU .* To fit: "):
        train_stage(cfg, "disc")
    assert ray.is_initialized() == was_up and not any(tmp_path.iterdir())


def test_ppo_refuses_a_learner_that_cannot_fit_before_ray_starts(tmp_path):
    import ray

    from actors.controller import run

    # The shipped 2-node layout fits 40 GB since the weight sync streams; under ZeRO-2 the learner does not.
    was_up = ray.is_initialized()  # another module's session Ray may be up already: this call starts none
    with pytest.raises(ConfigError, match=r"^ppo\.learner does not fit a100-40gb: .*\(step\).*ppo\.zero_stage 2 → 3"):
        run(load_config(A100_2NODE, [f"output_dir={tmp_path}", "gpu=a100-40gb", "ppo.zero_stage=2"]))
    assert ray.is_initialized() == was_up and not any(tmp_path.iterdir())


def test_the_shipped_gpu_config_passes_and_cpu_configs_are_not_checked(tmp_path):
    from tlcr_ray.plan import require_fit

    cfg = load_config(A100)
    assert require_fit(cfg, ["sft", "disc", "rm", "ppo.rollout", "ppo.reward", "ppo.reference", "ppo.learner"],
                       "all")["fits"]
    tiny = load_config(REPO / "configs" / "tiny.yaml", ["gpu=a100-40gb"])  # asks for no GPU: nothing to check
    assert not tiny.sft.use_gpu and all(getattr(tiny.ppo, g).num_gpus == 0 for g in ("rollout", "learner"))
