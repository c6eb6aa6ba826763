"""Reference actor: per-token log-probs of the frozen initial (SFT) policy."""
from __future__ import annotations

import os
import time

import ray
import torch

from tlcr_ray.rollout import RolloutBatch, pack, policy_logprobs, select_rows


@ray.remote(max_restarts=0)
class Reference:
    def __init__(self, model_dir: str, dtype: str = "float32", temperature: float = 1.0):
        from tlcr_ray.models import load_policy

        self.temperature = temperature
        device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        self.model = load_policy(model_dir, dtype=dtype).to(device).eval()

    def pid(self) -> int:
        return os.getpid()

    def logprobs(self, batch: RolloutBatch, pad_id: int, rows: range | None = None) -> dict:
        """-> {"logprobs": [rows, R] (0 on padding), "seconds"}; the whole batch is packed, `rows` scored."""
        start = time.perf_counter()
        packed = select_rows(pack(batch.prompt_ids, batch.response_ids, pad_id), rows)
        logprobs = policy_logprobs(self.model, packed, self.temperature)
        return {"logprobs": logprobs, "seconds": time.perf_counter() - start}
