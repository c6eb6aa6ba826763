"""Rollout actor: one generation engine (vLLM or HF `generate`) behind the RolloutEngine interface."""
from __future__ import annotations

import os
import time

import ray

from tlcr_ray.rollout import RolloutBatch, make_engine


@ray.remote(max_restarts=0)
class Rollout:
    def __init__(self, model_dir: str, backend: str, dtype: str = "float32", memory_utilization: float = 0.5,
                 tensor_parallel: int = 1, seed: int = 0):
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.engine = make_engine(backend, model_dir, dtype=dtype, device=device,
                                  gpu_memory_utilization=memory_utilization,
                                  tensor_parallel_size=tensor_parallel, seed=seed)

    def pid(self) -> int:
        return os.getpid()

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> tuple[RolloutBatch, float]:
        start = time.perf_counter()
        batch = self.engine.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, seed=seed)
        return batch, time.perf_counter() - start

    def load_state_dict(self, state_dict) -> float:
        """The state dict arrives resolved from its object ref (put once by the learner's return)."""
        start = time.perf_counter()
        self.engine.load_state_dict(state_dict)
        return time.perf_counter() - start

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        return self.engine.score(prompt_ids, response_ids)
