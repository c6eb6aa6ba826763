"""What every thin PPO actor shares: its device and a pid (the fault tests kill actors by pid)."""
from __future__ import annotations

import os

import ray
import torch


def actor_device() -> torch.device:
    """cuda when Ray gave this actor a GPU (it sets CUDA_VISIBLE_DEVICES per actor), else cpu."""
    return torch.device("cuda" if ray.get_gpu_ids() else "cpu")


class ActorBase:
    def pid(self) -> int:
        return os.getpid()
