"""What every thin PPO actor shares: its device, a pid (the fault tests kill actors by pid) and where it runs."""
from __future__ import annotations

import os

import ray
import torch


def actor_device() -> torch.device:
    """cuda when Ray gave this actor a GPU (it sets CUDA_VISIBLE_DEVICES per actor), else cpu."""
    return torch.device("cuda" if ray.get_gpu_ids() else "cpu")


def placement_info() -> tuple[str, list[str]]:
    """(node id, the GPU ids Ray assigned this actor): where the weight sync's same-node / same-GPU rules look."""
    return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]


class ActorBase:
    def pid(self) -> int:
        return os.getpid()

    def placement_info(self) -> tuple[str, list[str]]:
        return placement_info()
