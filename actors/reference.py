"""Reference actor: per-token log-probs of the frozen initial (SFT) policy, in forward micro-batches."""
from __future__ import annotations

import time

import ray
import torch

from actors.common import ActorBase, actor_device
from tlcr_ray.models import resident
from tlcr_ray.rl.batch import RolloutBatch, pack, policy_logprobs, select_rows


@ray.remote(max_restarts=0)
class Reference(ActorBase):
    def __init__(self, model_dir: str, dtype: str = "float32", temperature: float = 1.0,
                 micro_batch_size: int | None = None, offload: bool = False):
        """`micro_batch_size`: rows per forward (ppo.forward_micro_batch_size); `offload`
        (ppo.offload_reference): the model waits in host RAM between calls."""
        from tlcr_ray.models import load_policy

        self.temperature, self.micro_batch_size, self.offload = temperature, micro_batch_size, offload
        self.device = actor_device()
        model = load_policy(model_dir, dtype=dtype).eval()
        self.model = model if offload else model.to(self.device)

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, pad_id: int, rows: range | None = None) -> dict:
        """-> {"logprobs": [rows, R] (0 on padding), "seconds"}. The whole batch is packed, `rows` of it
        scored. (kl_estimator full is computed on the learner, which holds its own reference copy.)"""
        start = time.perf_counter()
        packed = select_rows(pack(batch.prompt_ids, batch.response_ids, pad_id), rows)
        with resident(self.model, self.device, self.offload):
            logprobs = policy_logprobs(self.model, packed, self.temperature, self.micro_batch_size, self.device)
        return {"logprobs": logprobs, "seconds": time.perf_counter() - start}
