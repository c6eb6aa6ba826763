"""Reward actor: discriminator -> per-token p and r (or the sequence RM's score on the last token)."""
from __future__ import annotations

import time

import ray
import torch

from actors.common import ActorBase, actor_device
from tlcr_ray.rl.batch import RolloutBatch, pack, select_rows
from tlcr_ray.rl.rewards import discriminator_probs, sequence_rewards, token_rewards


@ray.remote(max_restarts=0)
class RewardScorer(ActorBase):
    def __init__(self, model_dir: str, reward_cfg, dtype: str = "float32"):
        from tlcr_ray.models import load_head_model

        self.cfg = reward_cfg
        self.device = actor_device()
        self.model = load_head_model(model_dir, dtype=dtype).to(self.device).eval()

    @torch.no_grad()
    def score(self, batch: RolloutBatch, pad_id: int, rows: range | None = None) -> dict:
        """-> {"rewards": [rows, R], "p": [rows, R] (token modes) or "scores": [rows] (sequence)}.

        The whole batch is packed (so R matches the other actors') and `rows` of it are scored.
        """
        start = time.perf_counter()
        packed = select_rows(pack(batch.prompt_ids, batch.response_ids, pad_id), rows)
        mask = packed.response_mask
        if self.cfg.mode == "sequence":
            scores = self.model(packed.input_ids.to(self.device), packed.attention_mask.to(self.device)).float().cpu()
            out = {"scores": scores, "rewards": sequence_rewards(scores, mask, self.cfg.sequence_clip)}
        else:
            p = discriminator_probs(self.model, packed.input_ids, packed.attention_mask, packed.prompt_len, mask)
            rewards = token_rewards(p, self.cfg.mode, self.cfg.fixed_pos_threshold, self.cfg.fixed_neg_threshold)
            out = {"p": p, "rewards": rewards * mask}
        out["seconds"] = time.perf_counter() - start
        return out
