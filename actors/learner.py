"""Learner group: N data-parallel `PPOLearner` ranks (DeepSpeed actor + critic) as Ray actors."""
from __future__ import annotations

import os
import tempfile

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tlcr_ray.ppo_learner import PPOLearner


@ray.remote(max_restarts=0)
class LearnerWorker:
    def __init__(self, policy_dir: str, ppo_cfg, rank: int, world_size: int, init_method: str, dtype: str):
        self.learner = PPOLearner(policy_dir, ppo_cfg, rank=rank, world_size=world_size,
                                  init_method=init_method, dtype=dtype)

    def pid(self) -> int:
        return os.getpid()

    def call(self, method: str, *args):
        """Run one PPOLearner method; object-ref arguments arrive resolved."""
        return getattr(self.learner, method)(*args)


class LearnerGroup:
    """Creates the ranks on a placement group (one bundle each) and fans calls out to all of them."""

    def __init__(self, policy_dir: str, ppo_cfg, dtype: str, placement_group, name: str = "tlcr-ppo-learner",
                 rendezvous_dir: str | None = None):
        n = ppo_cfg.learner.num_actors
        # file:// rendezvous: torch's TCPStore would listen on every address.
        rendezvous = tempfile.mktemp(prefix="tlcr-learner-rdzv-", dir=rendezvous_dir)
        self.workers = [
            LearnerWorker.options(
                name=f"{name}-rank{rank}", num_cpus=ppo_cfg.learner.num_cpus, num_gpus=ppo_cfg.learner.num_gpus,
                resources=ppo_cfg.learner.resources or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=rank),
            ).remote(policy_dir, ppo_cfg, rank, n, f"file://{rendezvous}", dtype)
            for rank in range(n)
        ]

    def call(self, method: str, *args) -> list:
        """Object refs of every rank's result, in rank order (collective methods need all ranks)."""
        return [w.call.remote(method, *args) for w in self.workers]

    def pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])
