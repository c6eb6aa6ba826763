"""The PPO learner's policy weights going out: weight-sync buckets, the NCCL sender, the same-node
handover and the HF export (`PolicyWeights`, a base of `tlcr_ray.rl.learner.PPOLearner`).

Everything here addresses `self.policy_module`, the HF causal LM being trained (with ppo.critic shared
the policy inside the engine's `PolicyWithValueHead`): the rollout engines and the exported folder get
exactly the policy's HF names and weights, never a value head. The methods need the learner's `cfg`,
`rank`, `world_size`, `device`, `policy_dir` and `policy_module`.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import torch


class PolicyWeights:
    """Weight streams and exports of the trained policy (mixed into `PPOLearner`)."""

    _shm_file = None  # rank 0's reused bucket file (`push_weights`, HF engines), made on the first such sync

    def state_buckets(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      skip: tuple[str, ...] | set[str] = (), every_rank: bool = False, compact_views: bool = True):
        """The policy's HF-named weights, one bucket of <= ppo.bucket_mib at a time: {name: tensor} on
        rank 0 (`every_rank`: on every rank), None elsewhere (`tlcr_ray.training.gather.state_buckets`).
        Every rank must drain it (collective under ZeRO-3); nothing holds the whole model at once."""
        from tlcr_ray.training.gather import state_buckets

        return state_buckets(self.policy_module, zero3=self.cfg.zero_stage == 3,
                             rank=0 if every_rank else self.rank, bucket_bytes=int(self.cfg.bucket_mib * 2**20),
                             device=device, dtype=dtype, skip=skip, compact_views=compact_views)

    def full_state_dict(self, device: str = "cpu") -> dict[str, torch.Tensor] | None:
        """The whole policy state dict on rank 0 (None elsewhere), assembled from `state_buckets`: a
        whole-model copy, for tests and small models; syncs and exports stream the buckets instead."""
        state: dict[str, torch.Tensor] = {}
        for bucket in self.state_buckets(device):
            if bucket is not None:
                state.update({name: t.clone() for name, t in bucket.items()})
        return state if self.rank == 0 else None

    # CUDA + vLLM weight sync: rank 0 broadcasts into the vLLM workers over a stateless NCCL group.
    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.policy_module.config, "tie_word_embeddings", False))

    def weight_update_info(self) -> dict | None:
        """Names, dtypes and shapes of what `send_weights` broadcasts, in send order (rank 0; None
        elsewhere). Read from the parameters' metadata (ZeRO-3 keeps the full shape in `ds_shape`):
        nothing is gathered. Fixed for a run, so the receivers get it once."""
        from tlcr_ray.rl.weight_sync import weight_update_info

        if self.rank != 0:
            return None
        return weight_update_info(self._policy_entries())

    def _policy_entries(self) -> list[tuple[str, SimpleNamespace]]:
        """(name, dtype + full shape) of every state-dict entry, tied lm_head included, in stream order."""
        return [(name, SimpleNamespace(dtype=t.dtype, shape=tuple(getattr(t, "ds_shape", t.shape))))
                for name, t in self.policy_module.state_dict(keep_vars=True).items()]

    def init_weight_sender(self, master_address: str, master_port: int, world_size: int) -> None:
        """Rank 0 takes rank 0 of the NCCL group; blocks until every vLLM worker has joined."""
        if self.rank == 0:
            from tlcr_ray.rl.weight_sync import NCCLWeightSender

            self.sender = NCCLWeightSender(master_address, master_port, world_size)

    def send_weights(self) -> float:
        """One broadcast round, bucket by bucket (all ranks call it: gathering is collective under ZeRO-3)."""
        start = time.perf_counter()
        stream = self.state_buckets(device=self.device)
        if self.rank == 0:
            from tlcr_ray.training.gather import items_of

            self.sender.send(items_of(stream))
        else:
            for _ in stream:
                pass
        return time.perf_counter() - start

    def push_weights(self, kind: str, deliver, reuse_file: bool = False) -> float:
        """ppo.weight_sync shm | cuda_ipc: the policy handed over bucket by bucket, by reference
        (`tlcr_ray.rl.handover.push_buckets`); `deliver(handle)` (called on rank 0) returns once every
        engine has loaded the bucket, which is then freed. Every rank calls it (collective under ZeRO-3).
        cuda_ipc: each rank shares its own gathered copy, so an engine reads the one on its GPU.
        shm with `reuse_file` (every engine copies on load): rank 0 keeps one bucket file for the run."""
        from tlcr_ray.rl.handover import ReusedShm, push_buckets

        reused = None
        if kind == "shm" and reuse_file and self.rank == 0:
            if self._shm_file is None:
                self._shm_file = ReusedShm()
            reused = self._shm_file

        start = time.perf_counter()
        ipc = kind == "cuda_ipc"
        several = ipc and self.world_size > 1
        # The tensors as held, on the learner's device (ZeRO-1/2's views uncopied): packing is the one copy.
        stream = self.state_buckets(device=self.device, every_rank=ipc, compact_views=False)
        push_buckets(stream, kind, deliver, rank=self.rank, device=self.device,
                     gather=self._all_gather_object if several else None,
                     barrier=torch.distributed.barrier if several else None, reused=reused)
        return time.perf_counter() - start

    def release_shm_file(self) -> None:
        """Unlink the reused bucket file (`push_weights`), e.g. before this rank's actor is killed."""
        if self._shm_file is not None:
            self._shm_file.close()
            self._shm_file = None

    @staticmethod
    def _all_gather_object(obj) -> list:
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out

    def _export_tokenizer(self):
        """Rank 0: the policy's tokenizer, loaded once (loading one costs a few hundred MB of transient
        RSS: every export paying it again would add that to the export's peak). None elsewhere."""
        if self.rank != 0:
            return None
        if getattr(self, "_tokenizer", None) is None:
            from tlcr_ray.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.policy_dir)
        return self._tokenizer

    def export_hf(self, path: str, dtype: str | None = None, step: int | None = None, final: bool = False) -> None:
        """Policy as a loadable HF folder with its tokenizer, streamed bucket by bucket (rank 0 writes;
        collective under ZeRO-3). `dtype`: the stored dtype (None: ppo.export_dtype; "auto": as trained)."""
        from tlcr_ray.training.gather import export_cast, tied_names, write_hf_folder

        module = self.policy_module
        stored, gathered, rounding = export_cast(self.cfg.export_dtype if dtype is None else dtype,
                                                 self.cfg.export_rounding, next(module.parameters()).dtype)
        buckets = self.state_buckets(dtype=gathered, skip=tied_names(module))
        write_hf_folder(buckets, path, module=module, rank=self.rank, tokenizer=self._export_tokenizer(),
                        dtype=stored, extra={"step": step, "final": final}, rounding=rounding, seed=self.cfg.seed)
