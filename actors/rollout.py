"""Rollout actor: one generation engine (vLLM or HF `generate`) behind the RolloutEngine interface."""
from __future__ import annotations

import time

import ray

from actors.common import ActorBase, actor_device
from tlcr_ray.rl.batch import RolloutBatch
from tlcr_ray.rl.rollout import make_engine


@ray.remote(max_restarts=0)
class Rollout(ActorBase):
    def __init__(self, model_dir: str, backend: str, engine_kwargs: dict):
        """`engine_kwargs`: `tlcr_ray.rl.rollout.make_engine` keywords (dtype, seed, vLLM sizes, and the
        executor/sleep settings of its placement, `tlcr_ray.placement`)."""
        device = actor_device().type
        self.engine = make_engine(backend, model_dir, device=device, **engine_kwargs)

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, stop: list[str] | None = None) -> tuple[RolloutBatch, float]:
        start = time.perf_counter()
        batch = self.engine.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, seed=seed, stop=stop)
        return batch, time.perf_counter() - start

    def load_state_dict(self, state_dict) -> float:
        """The state dict arrives resolved from its object ref (put once by the learner's return)."""
        start = time.perf_counter()
        self.engine.load_state_dict(state_dict)
        return time.perf_counter() - start

    def load_weight_buckets(self, bucket_refs: list) -> float:
        """The learner's weights as object refs, one per bucket (`LearnerWorker.state_bucket_refs`),
        fetched one at a time as the engine loads them."""
        start = time.perf_counter()
        self.engine.load_weight_stream(ray.get(ref) for ref in bucket_refs)
        return time.perf_counter() - start

    # ppo.weight_sync shm | cuda_ipc: the learner's rank 0 calls these itself, one bucket handle at a time.
    def begin_weight_load(self) -> bool:
        """-> the engine's `copies_on_load` (True: the learner may reuse one bucket file)."""
        self.engine.begin_weight_load()
        self.handover_seconds = 0.0
        return self.engine.copies_on_load

    def load_weight_handle(self, handle: dict) -> None:
        """Returning is the ack: the learner frees the bucket once every engine has answered."""
        start = time.perf_counter()
        self.engine.load_weight_handle(handle)
        self.handover_seconds += time.perf_counter() - start

    def finish_weight_load(self) -> float:
        """-> seconds this engine spent loading (the buckets and the finish)."""
        start = time.perf_counter()
        self.engine.finish_weight_load()
        return self.handover_seconds + time.perf_counter() - start

    # CUDA + vLLM only: the NCCL broadcast from learner rank 0 (see tlcr_ray.rl.rollout.vllm_engine).
    def init_weight_sync(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        self.engine.init_weight_sync(master_address, master_port, rank_offset, world_size)

    def receive_weights(self, update_info: dict) -> float:
        start = time.perf_counter()
        self.engine.receive_weights(update_info)
        return time.perf_counter() - start

    # ppo.colocate all: free the shared GPU between generations (no-ops that say why where unsupported).
    def sleep(self) -> dict:
        return self.engine.sleep()

    def wake_up(self) -> dict:
        return self.engine.wake_up()

    def engine_state_dict(self) -> dict:
        """HF backend: the engine's weights as a CPU state dict (what a check that a sync landed exactly reads)."""
        model = getattr(self.engine, "model", None)
        if model is None:
            raise TypeError(f"{type(self.engine).__name__} exposes no state dict")
        return {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        return self.engine.score(prompt_ids, response_ids)
