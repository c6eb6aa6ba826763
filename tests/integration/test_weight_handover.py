"""The learner -> rollout weight sync through real Ray actors on 127.0.0.1: after a sync every HF engine
holds exactly the learner's weights, by the same-node handover (shm) and by the object store.

The engines start from a different random model than the learner's, so a sync that loaded nothing (or
part of the weights) fails the equality.
"""
from __future__ import annotations

import os

import pytest
import torch

from tlcr_ray.config import PPOConfig
from tlcr_ray.rl.handover import SHM_PREFIX, shm_dir

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tokenizer_dir) -> str:
    from tlcr_ray.testing.tiny_model import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("other") / "model", tokenizer_dir, seed=1))


@pytest.fixture(scope="module")
def learners(ray_local, tiny_model_dir):
    from ray.util.placement_group import placement_group, remove_placement_group

    from actors.groups import get_all
    from actors.learner import LearnerGroup

    pg = placement_group([{"CPU": 1}])
    ray_local.get(pg.ready())
    cfg = PPOConfig(mini_batch_size=2, zero_stage=2, algorithm="remax", bucket_mib=0.05)  # many small buckets
    group = LearnerGroup(tiny_model_dir, cfg, "float32", pg, name="tlcr-test-handover-learner")
    get_all(group.ready)
    yield group
    for w in group.workers:
        ray_local.kill(w, no_restart=True)
    remove_placement_group(pg)


def _rollouts(n: int, model_dir: str) -> list:
    from actors.rollout import Rollout

    return [Rollout.options(num_cpus=0).remote(model_dir, "hf", {"dtype": "float32", "seed": i}) for i in range(n)]


def _leftover_files(pid: int) -> list[str]:
    return [f for f in os.listdir(shm_dir()) if f.startswith(f"{SHM_PREFIX}{pid}-")]


def _assert_hold(ray_local, rollouts, learner_state, method) -> None:
    for rollout in rollouts:
        after = ray_local.get(rollout.engine_state_dict.remote())
        assert after.keys() == learner_state.keys()
        for name, tensor in learner_state.items():
            assert torch.equal(after[name], tensor), f"{method}: {name} differs after the sync"


@pytest.mark.parametrize("method", ["shm", "object_store"])
def test_after_a_sync_every_engine_holds_exactly_the_learners_weights(ray_local, learners, other_model_dir, method):
    from actors.groups import get_all

    learner_state = get_all(learners.full_state_dict())[0]
    rollouts = _rollouts(2, other_model_dir)
    try:
        before = ray_local.get(rollouts[0].engine_state_dict.remote())
        differ = [n for n, t in learner_state.items() if not torch.equal(before[n], t)]
        # The engines start elsewhere: every matrix differs (norm weights start at 1.0 in both models).
        assert set(differ) >= {n for n in learner_state if "norm" not in n}
        if method == "shm":
            results = get_all(learners.push_weights("shm", rollouts))
            assert results[0]["load_seconds"] > 0
            # HF engines copy on load: every bucket went through one file, kept for the next sync.
            kept = _leftover_files(learners.pids()[0])
            assert len(kept) == 1
        else:
            bucket_refs = get_all(learners.state_bucket_refs())[0]
            assert len(bucket_refs) > 3
            get_all([r.load_weight_buckets.remote(bucket_refs) for r in rollouts])
        _assert_hold(ray_local, rollouts, learner_state, method)
        if method == "shm":  # a second sync rewrites the same file under the engines' kept mappings
            ray_local.get(rollouts[0].load_state_dict.remote(before))
            get_all(learners.push_weights("shm", rollouts))
            assert _leftover_files(learners.pids()[0]) == kept
            _assert_hold(ray_local, rollouts, learner_state, method)
            get_all(learners.release_shm_files())
            assert _leftover_files(learners.pids()[0]) == []
    finally:
        for r in rollouts:
            ray_local.kill(r, no_restart=True)


def test_the_groups_pick_shm_when_learner_and_engines_share_the_node(ray_local, learners, other_model_dir):
    from types import SimpleNamespace

    from actors.groups import ActorGroups, get_all

    rollouts = _rollouts(1, other_model_dir)
    try:
        learner_at = learners.placement_info()
        rollout_at = get_all([r.placement_info.remote() for r in rollouts])
        assert rollout_at[0][0] == learner_at[0][0] and rollout_at[0][1] == []  # one node, no GPUs
        live = SimpleNamespace(learners=learners, rollouts=rollouts, colocated=False)
        assert ActorGroups.choose_weight_sync(live, PPOConfig(rollout_backend="hf")) == "shm"
        assert ActorGroups.choose_weight_sync(live, PPOConfig(rollout_backend="hf", weight_sync="object_store")) \
            == "object_store"
    finally:
        ray_local.kill(rollouts[0], no_restart=True)
