"""Reference actor: per-token log-probs (and, for the full KL, logits) of the frozen initial (SFT) policy."""
from __future__ import annotations

import time

import ray
import torch

from actors.common import ActorBase, actor_device
from tlcr_ray.rl.batch import RolloutBatch, pack, response_logits_of, select_rows, token_logprobs


@ray.remote(max_restarts=0)
class Reference(ActorBase):
    def __init__(self, model_dir: str, dtype: str = "float32", temperature: float = 1.0):
        from tlcr_ray.models import load_policy

        self.temperature = temperature
        self.device = actor_device()
        self.model = load_policy(model_dir, dtype=dtype).to(self.device).eval()

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, pad_id: int, rows: range | None = None, with_logits: bool = False) -> dict:
        """-> {"logprobs": [rows, R] (0 on padding), "seconds"}, plus "logits" [rows, R, vocab] when
        `with_logits` (ppo.kl_estimator full). The whole batch is packed, `rows` of it scored."""
        start = time.perf_counter()
        packed = select_rows(pack(batch.prompt_ids, batch.response_ids, pad_id), rows)
        logits = response_logits_of(self.model, packed, self.device)
        logprobs = token_logprobs(logits, packed.response_ids.to(self.device), self.temperature).cpu()
        out = {"logprobs": logprobs * packed.response_mask}
        if with_logits:
            out["logits"] = logits.float().cpu()
        out["seconds"] = time.perf_counter() - start
        return out
