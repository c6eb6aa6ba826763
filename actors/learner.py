"""Learner group: N data-parallel `PPOLearner` ranks (DeepSpeed actor + critic; ppo.critic shared: one
engine, the policy with a value head) as Ray actors.

The ranks are placed first, then meet: file:// in the node's /tmp when all are on one CPU node,
else TCP at rank 0's node IP and a port rank 0 picks (`tlcr_ray.rl.rendezvous`). Every group method
returns one object ref per rank, in rank order; collective methods (all of them under ZeRO-3) must
reach every rank, which is why callers go through the group.
"""
from __future__ import annotations

import os
import tempfile
import uuid

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.common import placement_info
from tlcr_ray.oom import maybe_inject_oom
from tlcr_ray.rl.batch import RolloutBatch
from tlcr_ray.rl.colocate import offload_learner, reload_learner
from tlcr_ray.rl.learner import PPOLearner
from tlcr_ray.rl.rendezvous import free_port, needs_tcp_rendezvous, rendezvous_init_method


@ray.remote(max_restarts=0)
class LearnerWorker:
    """One rank; object-ref arguments arrive resolved."""

    def __init__(self):
        self.learner: PPOLearner | None = None
        self.train_calls = 0

    def pid(self) -> int:
        return os.getpid()

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def placement_info(self) -> tuple[str, list[str]]:
        return placement_info()

    def free_port(self) -> int:
        return free_port(ray.util.get_node_ip_address())

    def start(self, policy_dir: str, ppo_cfg, rank: int, world_size: int, init_method: str, dtype: str,
              critic_dir: str | None = None) -> None:
        self.learner = PPOLearner(policy_dir, ppo_cfg, rank=rank, world_size=world_size,
                                  init_method=init_method, dtype=dtype, critic_dir=critic_dir)

    def evaluate(self, batch: RolloutBatch, pad_id: int, policy: bool = True) -> dict:
        return self.learner.evaluate(batch, pad_id, policy)

    def train(self, batch: RolloutBatch, pad_id: int, advantages: torch.Tensor, returns: torch.Tensor,
              old_logprobs: torch.Tensor, old_values: torch.Tensor) -> dict:
        self._count_update()
        return self.learner.train(batch, pad_id, advantages, returns, old_logprobs, old_values)

    def train_in_one_pass(self, batch: RolloutBatch, pad_id: int, rewards: torch.Tensor, ref_logprobs: torch.Tensor,
                          old_logprobs: torch.Tensor | None, baseline: torch.Tensor | None) -> dict:
        self._count_update()
        return self.learner.train_in_one_pass(batch, pad_id, rewards, ref_logprobs, old_logprobs, baseline)

    def fuses_evaluation(self) -> bool:
        return self.learner.fused

    def _count_update(self) -> None:
        self.train_calls += 1
        maybe_inject_oom("ppo.learner", self.train_calls)  # TLCR_TEST_OOM, a test hook (tlcr_ray.oom)

    def full_state_dict(self) -> dict | None:
        return self.learner.full_state_dict()

    def state_bucket_refs(self) -> list | None:
        """Rank 0: one object ref per bucket of the policy's weights, each put as soon as it is gathered
        (this process never holds more than one bucket); None on the other ranks (collective under ZeRO-3)."""
        refs = []
        for bucket in self.learner.state_buckets():
            if bucket is not None:
                refs.append(ray.put(bucket))
            bucket = None  # a comprehension would keep it alive while the next bucket is gathered
        return refs if self.learner.rank == 0 else None

    def push_weights(self, kind: str, rollouts: list) -> dict:
        """ppo.weight_sync shm | cuda_ipc: rank 0 hands each bucket to every rollout actor and waits for all
        their acks before the next (`PPOLearner.push_weights`; into one reused file when every engine copies on
        load); -> {"seconds", "load_seconds" (rank 0: the
        slowest engine's loading time)}. Every rank is called (collective under ZeRO-3)."""
        load_seconds, copies = 0.0, False
        if self.learner.rank == 0:
            copies = all(ray.get([r.begin_weight_load.remote() for r in rollouts]))
        seconds = self.learner.push_weights(kind, lambda handle: ray.get(
            [r.load_weight_handle.remote(handle) for r in rollouts]), reuse_file=copies)
        if self.learner.rank == 0:
            load_seconds = max(ray.get([r.finish_weight_load.remote() for r in rollouts]))
        return {"seconds": seconds, "load_seconds": load_seconds}

    def release_shm_file(self) -> None:
        self.learner.release_shm_file()

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> list[list[float]]:
        return self.learner.score(prompt_ids, response_ids, pad_id)

    def weight_update_info(self) -> dict | None:
        return self.learner.weight_update_info()

    def init_weight_sender(self, master_address: str, master_port: int, world_size: int) -> None:
        self.learner.init_weight_sender(master_address, master_port, world_size)

    def send_weights(self) -> float:
        return self.learner.send_weights()

    def save_checkpoint(self, folder: str, step: int | None = None) -> None:
        self.learner.save_checkpoint(folder, step)

    def offload_states(self) -> dict:
        return offload_learner(self.learner)

    def reload_states(self) -> dict:
        return reload_learner(self.learner)

    def load_checkpoint(self, folder: str) -> None:
        self.learner.load_checkpoint(folder)

    def export_hf(self, path: str, step: int | None = None, final: bool = False) -> None:
        self.learner.export_hf(path, step=step, final=final)


class LearnerGroup:
    """Creates the ranks on a placement group (one bundle each) and fans calls out to all of them."""

    def __init__(self, policy_dir: str, ppo_cfg, dtype: str, placement_group, name: str = "tlcr-ppo-learner",
                 runtime_env: dict | None = None, critic_dir: str | None = None):
        """`critic_dir`: where a separate critic starts (a head-model folder: its backbone and head; None:
        the policy with a fresh head); unused with ppo.critic shared."""
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
        # A fresh name that no file has yet: the file:// rendezvous creates it (rank 0's node /tmp).
        rdzv_file = os.path.join(tempfile.gettempdir(), f"tlcr-learner-rdzv-{uuid.uuid4().hex}")
        self.init_method = rendezvous_init_method(self.node_ips, on_gpu, rdzv_file, port)
        self.ready = [w.start.remote(policy_dir, ppo_cfg, rank, n, self.init_method, dtype, critic_dir)
                      for rank, w in enumerate(self.workers)]

    def evaluate(self, batch_ref, pad_id: int, policy: bool = True) -> list:
        """Old log-probs, values, entropy of each rank's rows ([rows, R] each); `policy` False: values only."""
        return [w.evaluate.remote(batch_ref, pad_id, policy) for w in self.workers]

    def train(self, batch_ref, pad_id: int, advantages, returns, old_logprobs, old_values) -> list:
        return [w.train.remote(batch_ref, pad_id, advantages, returns, old_logprobs, old_values)
                for w in self.workers]

    def train_in_one_pass(self, batch_ref, pad_id: int, rewards, ref_logprobs, old_logprobs, baseline) -> list:
        """`PPOLearner.train_in_one_pass` (one rank: ppo.fuse_evaluation needs world size 1)."""
        return [w.train_in_one_pass.remote(batch_ref, pad_id, rewards, ref_logprobs, old_logprobs, baseline)
                for w in self.workers]

    def fuses_evaluation(self) -> bool:
        """Whether the ranks fold the evaluation into a one-pass update (`PPOLearner.fused`)."""
        return all(ray.get([w.fuses_evaluation.remote() for w in self.workers]))

    def full_state_dict(self) -> list:
        """Rank 0's ref holds the whole CPU state dict; the others None (collective under ZeRO-3)."""
        return [w.full_state_dict.remote() for w in self.workers]

    def state_bucket_refs(self) -> list:
        """Rank 0's ref holds a list of per-bucket object refs; the others None (collective under ZeRO-3)."""
        return [w.state_bucket_refs.remote() for w in self.workers]

    def push_weights(self, kind: str, rollouts: list) -> list:
        """ppo.weight_sync shm | cuda_ipc: rank 0 delivers to `rollouts` itself; -> one ref per rank."""
        return [w.push_weights.remote(kind, rollouts) for w in self.workers]

    def release_shm_files(self) -> list:
        """Each rank unlinks its reused bucket file (ppo.weight_sync shm into HF engines), if it made one."""
        return [w.release_shm_file.remote() for w in self.workers]

    def placement_info(self) -> list[tuple[str, list[str]]]:
        """(node id, GPU ids) of every rank, in rank order."""
        return ray.get([w.placement_info.remote() for w in self.workers])

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> list:
        return [w.score.remote(prompt_ids, response_ids, pad_id) for w in self.workers]

    def weight_update_info(self) -> list:
        return [w.weight_update_info.remote() for w in self.workers]

    def init_weight_sender(self, master_address: str, master_port: int, world_size: int) -> list:
        return [w.init_weight_sender.remote(master_address, master_port, world_size) for w in self.workers]

    def send_weights(self) -> list:
        return [w.send_weights.remote() for w in self.workers]

    def save_checkpoint(self, folder: str, step: int | None = None) -> list:
        return [w.save_checkpoint.remote(folder, step) for w in self.workers]

    def offload_states(self) -> list:
        """ppo.colocate all: optimizer states to host while the rollout engines generate (`tlcr_ray.rl.colocate`)."""
        return [w.offload_states.remote() for w in self.workers]

    def reload_states(self) -> list:
        return [w.reload_states.remote() for w in self.workers]

    def load_checkpoint(self, folder: str) -> list:
        return [w.load_checkpoint.remote(folder) for w in self.workers]

    def export_hf(self, path: str, step: int | None = None, final: bool = False) -> list:
        """The policy as an HF folder in ppo.export_dtype (`tlcr_export.json`: step, final)."""
        return [w.export_hf.remote(path, step, final) for w in self.workers]

    def pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.workers])
