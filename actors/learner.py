"""Learner group: N data-parallel `PPOLearner` ranks (DeepSpeed actor + critic) as Ray actors.

The ranks are placed first, then meet: file:// in the node's /tmp when all are on one CPU node,
else TCP at rank 0's node IP and a port rank 0 picks (`tlcr_ray.ppo_learner.rendezvous_init_method`).
"""
from __future__ import annotations

import os
import tempfile

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tlcr_ray.ppo_learner import PPOLearner, free_port, needs_tcp_rendezvous, rendezvous_init_method


@ray.remote(max_restarts=0)
class LearnerWorker:
    def __init__(self):
        self.learner = None

    def pid(self) -> int:
        return os.getpid()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port(ray.util.get_node_ip_address())

    def start(self, policy_dir: str, ppo_cfg, rank: int, world_size: int, init_method: str, dtype: str) -> None:
        self.learner = PPOLearner(policy_dir, ppo_cfg, rank=rank, world_size=world_size,
                                  init_method=init_method, dtype=dtype)

    def call(self, method: str, *args):
        """Run one PPOLearner method; object-ref arguments arrive resolved."""
        return getattr(self.learner, method)(*args)


class LearnerGroup:
    """Creates the ranks on a placement group (one bundle each) and fans calls out to all of them."""

    def __init__(self, policy_dir: str, ppo_cfg, dtype: str, placement_group, name: str = "tlcr-ppo-learner",
                 rendezvous_dir: str | None = None, runtime_env: dict | None = None):
        n = ppo_cfg.learner.num_actors
        self.workers = [
            LearnerWorker.options(
                name=f"{name}-rank{rank}", num_cpus=ppo_cfg.learner.num_cpus, num_gpus=ppo_cfg.learner.num_gpus,
                resources=ppo_cfg.learner.resources or None, runtime_env=runtime_env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=rank),
            ).remote()
            for rank in range(n)
        ]
        self.node_ips = ray.get([w.node_ip.remote() for w in self.workers])
        on_gpu = ppo_cfg.learner.num_gpus > 0
        port = ray.get(self.workers[0].free_port.remote()) if needs_tcp_rendezvous(self.node_ips, on_gpu) else None
        self.init_method = rendezvous_init_method(
            self.node_ips, on_gpu, tempfile.mktemp(prefix="tlcr-learner-rdzv-", dir=rendezvous_dir), port)
        self.ready = [w.start.remote(policy_dir, ppo_cfg, rank, n, self.init_method, dtype)
                      for rank, w in enumerate(self.workers)]

    def call(self, method: str, *args) -> list:
        """Object refs of every rank's result, in rank order (collective methods need all ranks)."""
        return [w.call.remote(method, *args) for w in self.workers]

    def pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])
