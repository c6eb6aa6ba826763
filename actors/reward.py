"""Reward actor: discriminator -> per-token p and r (or the sequence RM's score on the last token)."""
from __future__ import annotations

import time

import ray
import torch

from actors.common import ActorBase, actor_device
from tlcr_ray.models import resident
from tlcr_ray.rl.batch import RolloutBatch, pack, select_rows
from tlcr_ray.rl.rewards import score_packed


@ray.remote(max_restarts=0)
class RewardScorer(ActorBase):
    def __init__(self, model_dir: str, reward_cfg, dtype: str = "float32", micro_batch_size: int | None = None,
                 offload: bool = False):
        """`micro_batch_size`: rows per forward (ppo.forward_micro_batch_size); `offload`
        (ppo.offload_reward): the model waits in host RAM between calls."""
        from tlcr_ray.models import load_head_model

        self.cfg, self.micro_batch_size, self.offload = reward_cfg, micro_batch_size, offload
        self.device = actor_device()
        model = load_head_model(model_dir, dtype=dtype).eval()
        self.model = model if offload else model.to(self.device)

    @torch.no_grad()
    def score(self, batch: RolloutBatch, pad_id: int, rows: range | None = None) -> dict:
        """-> {"rewards": [rows, R], "p": [rows, R] (token modes) or "scores": [rows] (sequence)}.

        The whole batch is packed (so R matches the other actors') and `rows` of it are scored.
        """
        start = time.perf_counter()
        packed = select_rows(pack(batch.prompt_ids, batch.response_ids, pad_id), rows)
        with resident(self.model, self.device, self.offload):
            out = score_packed(self.model, packed, self.cfg, self.micro_batch_size)
        out["seconds"] = time.perf_counter() - start
        return out
