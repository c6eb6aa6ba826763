"""How updated learner weights reach the rollout engines.

* `weight_sync_method` picks one of the four below from ppo.weight_sync and where the actors landed.
* cuda_ipc (CUDA, colocated) and shm (same node): bucket by bucket, by reference, each acked before the
  next (`tlcr_ray.rl.handover`; learner `PPOLearner.push_weights`, engine `load_weight_handle`).
* object_store (engines on other nodes, no NCCL): rank 0 puts the weights in the object store one bucket
  at a time as they are gathered (`tlcr_ray.training.gather`); every engine loads them bucket by bucket.
* nccl (CUDA learner + vLLM): learner rank 0 broadcasts the buckets into every vLLM worker over a
  stateless NCCL group, through vLLM's documented weight-transfer API; `NCCLWeightSender` is the learner's side,
  `VLLMRollout.init_weight_sync` / `receive_weights` the engines' side. Both sides must be issued
  concurrently (they meet inside the collectives).
"""
from __future__ import annotations

from typing import Iterable

import torch

from tlcr_ray.rl.rollout import resolve_backend

# Default wire parameters of vLLM's packed NCCL transfer; both sides must agree on them.
PACKED_BUFFER_SIZE_BYTES = 1024 * 1024 * 1024
PACKED_NUM_BUFFERS = 2


def weight_sync_method(backend: str, learner_on_cuda: bool, colocated: bool = False, *, requested: str = "auto",
                       same_node: bool = False, shares_gpu: bool = False) -> str:
    """How learner weights reach the rollout engines (ppo.weight_sync; "auto" picks the first that applies):

    * cuda_ipc: CUDA learner, colocated (ppo.colocate all), and every engine's GPUs hold a learner rank
      (`shares_gpu`): each rank hands its gathered bucket over by CUDA IPC handle, nothing is copied.
      NCCL cannot put two ranks of one group on one GPU, so colocated engines never take nccl.
    * nccl: vLLM serving a CUDA learner on other GPUs: learner rank 0 broadcasts, GPU to GPU.
    * shm: every engine on learner rank 0's node (`same_node`): each bucket written once into a
      /dev/shm file that the engines map (`tlcr_ray.rl.handover`), acked before the next.
    * object_store: anything else (engines on other nodes without NCCL): buckets put in Ray's store.

    An explicit `requested` method that cannot work here raises ValueError saying why.
    """
    vllm = resolve_backend(backend) == "vllm"
    why_not = {
        "cuda_ipc": None if learner_on_cuda and colocated and shares_gpu else
        "needs a CUDA learner (ppo.learner.num_gpus > 0), ppo.colocate all and every rollout engine on a GPU "
        "that holds a learner rank",
        "nccl": None if learner_on_cuda and vllm and not colocated else
        "needs a CUDA learner, the vLLM backend and ppo.colocate none (NCCL cannot put two ranks on one GPU)",
        "shm": None if same_node else "needs every rollout engine on learner rank 0's node",
        "object_store": None,
    }
    if requested != "auto":
        if requested not in why_not:
            raise ValueError(f"ppo.weight_sync {requested!r}: expected one of auto, {', '.join(why_not)}")
        if why_not[requested]:
            raise ValueError(f"ppo.weight_sync {requested}: {why_not[requested]}")
        return requested
    return next(method for method, reason in why_not.items() if reason is None)


def shares_learner_gpu(learner_gpus: list[tuple[str, list[str]]], rollout_gpus: list[tuple[str, list[str]]]) -> bool:
    """True when every rollout actor's GPUs each hold a learner rank. Each item: (node id, the GPU ids Ray
    assigned the actor); a vLLM TP engine's actor asks no GPU itself and reports its workers' GPUs."""
    held = {(node, gpu) for node, gpus in learner_gpus for gpu in gpus}
    return bool(rollout_gpus) and all(gpus and all((node, gpu) in held for gpu in gpus) for node, gpus in rollout_gpus)


def weight_update_info(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """The per-round metadata vLLM's NCCL receiver needs to size its buffers, in send order.

    Returns {"names": [...], "dtype_names": ["float32", ...], "shapes": [[...], ...]}.
    """
    names, dtype_names, shapes = [], [], []
    for name, tensor in named_tensors:
        names.append(name)
        dtype_names.append(str(tensor.dtype).removeprefix("torch."))
        shapes.append(list(tensor.shape))
    return {"names": names, "dtype_names": dtype_names, "shapes": shapes}


def nccl_init_info(master_address: str, master_port: int, rank_offset: int, world_size: int) -> dict:
    """The worker-side init payload of vLLM's "nccl" weight-transfer backend (packed broadcast)."""
    return {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "packed": True, "packed_buffer_size_bytes": PACKED_BUFFER_SIZE_BYTES,
            "packed_num_buffers": PACKED_NUM_BUFFERS}


def with_tied_lm_head(state_dict: dict[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """Add `lm_head.weight` (a copy of the input embedding) for tied-embedding models.

    vLLM's CPU backend packs the output layer into its own matrix at load time; without an
    explicit `lm_head.weight` a reload keeps the old packed head. A copy, also replacing an
    `lm_head.weight` that shares the embedding's storage, because safetensors refuses shared tensors.
    """
    if not tie_word_embeddings:
        return state_dict
    if "model.embed_tokens.weight" not in state_dict:
        if "lm_head.weight" in state_dict:
            return state_dict
        raise KeyError("tied-embedding state dict has neither lm_head.weight nor model.embed_tokens.weight")
    return {**state_dict, "lm_head.weight": state_dict["model.embed_tokens.weight"].clone()}


class NCCLWeightSender:
    """Learner rank 0's side of the CUDA weight sync: owns rank 0 of the stateless NCCL group.

    Usage (Ray actors, concurrently): rollout actors call `VLLMRollout.init_weight_sync(...)` while
    the learner builds `NCCLWeightSender(addr, port, world_size)`; then, per sync, rollout actors
    call `receive_weights(info)` while the learner calls `send(named_tensors)` with `info =
    weight_update_info(named_tensors)` (same names, order, dtypes and shapes).
    """

    def __init__(self, master_address: str, master_port: int, world_size: int):
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.group = trainer_init({"master_address": master_address, "master_port": master_port,
                                   "world_size": world_size})

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        packed_nccl_broadcast_producer(iterator=iter(named_tensors), group=self.group, src=0,
                                       post_iter_func=lambda item: item[1],
                                       buffer_size_bytes=PACKED_BUFFER_SIZE_BYTES,
                                       num_buffers=PACKED_NUM_BUFFERS)
        torch.cuda.current_stream().synchronize()

    def close(self) -> None:
        self.group.destroy()
