"""One data-parallel PPO learner rank: actor (policy) + critic (value head), DeepSpeed engines (ReMax: no critic).

    learner = PPOLearner("runs/demo/sft/model", ppo_cfg, rank=0, world_size=1,
                         init_method="file:///tmp/tlcr-rdzv", critic_dir="runs/demo/disc/model")
    old = learner.evaluate(batch, pad_id)           # {"logprobs", "values", "entropy"}: [batch, R]
                                                    # (+ "logits" [batch, R, vocab] for kl_estimator full)
    stats = learner.train(batch, pad_id, advantages, returns, old["logprobs"], old["values"])

Every rank packs the WHOLE batch (so P and R agree across ranks) and works on its own contiguous
block of rows; gradients are averaged by DeepSpeed over the torch.distributed group (gloo on CPU,
nccl on GPU). `evaluate` returns only this rank's rows; the caller concatenates in rank order.

The critic starts from `critic_dir` (ppo.critic_init: the run's discriminator or RM, head weights
included; or the policy with a fresh head). Both engines follow ppo.lr_schedule over the run's
optimizer steps (`optimizer_steps_per_update` x ppo.steps); DeepSpeed keeps the schedulers' state in
the checkpoints, so a resumed run continues the schedule.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tlcr_ray.rl.batch import (
    PackedBatch,
    RolloutBatch,
    pack,
    response_logits_of,
    select_rows,
    shard_rows,
    token_logprobs,
)
from tlcr_ray.rl.ppo_math import masked_mean, policy_loss, value_loss
from tlcr_ray.training.optim import PRECISION_OF_DTYPE, deepspeed_config, lr_scheduler


def minibatches_per_epoch(batch_size: int, mini_batch_size: int, world_size: int) -> int:
    """Optimizer steps of one pass over a PPO batch: each rank takes ceil(batch / world) rows in
    micro-batches of mini_batch_size // world rows; every rank runs the same count (each step all-reduces)."""
    micro = max(1, mini_batch_size // world_size)
    per_rank = -(-batch_size // world_size)
    return -(-per_rank // micro)


def optimizer_steps_per_update(ppo_cfg, world_size: int) -> int:
    """Optimizer steps of one PPO step (`PPOLearner.train` on a batch of ppo.prompts_per_step rows)."""
    return ppo_cfg.ppo_epochs * minibatches_per_epoch(ppo_cfg.prompts_per_step, ppo_cfg.mini_batch_size, world_size)


class PPOLearner:
    def __init__(self, policy_dir: str, ppo_cfg, *, rank: int, world_size: int, init_method: str,
                 dtype: str = "float32", critic_dir: str | None = None):
        import deepspeed

        from tlcr_ray.models import load_policy, load_value_model

        self.cfg, self.rank, self.world_size = ppo_cfg, rank, world_size
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        if init_method.startswith("file://") and self.device.type == "cpu":
            # One node: gloo would otherwise bind the hostname's address (unreachable in a loopback-only
            # network, and against the 127.0.0.1-only rule).
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   init_method=init_method, rank=rank, world_size=world_size,
                                   auto_mpi_discovery=False, verbose=False)
        self.policy_dir = policy_dir
        policy = load_policy(policy_dir, dtype=dtype)
        self.actor = self._engine(policy, ppo_cfg.actor_lr, dtype)
        self.critic = None  # ReMax (ppo.algorithm remax) has no critic: its baseline is the greedy reward
        if ppo_cfg.algorithm != "remax":
            # A head-model folder gives backbone + head weights; the policy folder a fresh head.
            critic = load_value_model(critic_dir or policy_dir, dtype=dtype, seed=ppo_cfg.seed)
            self.critic = self._engine(critic, ppo_cfg.critic_lr, dtype)

    @property
    def engines(self) -> dict:
        """{"actor": engine, "critic": engine} (no critic under ReMax), in checkpoint order."""
        return {"actor": self.actor} if self.critic is None else {"actor": self.actor, "critic": self.critic}

    def _engine(self, model, lr: float, dtype: str):
        import deepspeed

        micro = max(1, self.cfg.mini_batch_size // self.world_size)
        config = deepspeed_config(micro_batch_size=micro, grad_accum=1, world_size=self.world_size,
                                  zero_stage=self.cfg.zero_stage, precision=PRECISION_OF_DTYPE[dtype],
                                  max_grad_norm=self.cfg.max_grad_norm)
        # A plain torch optimizer: DeepSpeed's CPU/fused Adam would JIT-compile for a minute first.
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        total = self.cfg.steps * optimizer_steps_per_update(self.cfg, self.world_size)
        schedule = lr_scheduler(optimizer, total=total, warmup=self.cfg.warmup_steps, schedule=self.cfg.lr_schedule)
        # Passed to DeepSpeed: engine.step() steps it, and save/load_checkpoint keep its state.
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
        return engine

    # ------------------------------------------------------------------ forwards
    def _forward(self, packed: PackedBatch, with_values: bool = True):
        """-> (logits [rows, R, vocab] before temperature, logprobs, entropy, values [rows, R] each) on self.device.

        One log-softmax serves the log-probs and the entropy; the entropy carries gradients only when
        it is in the loss (ppo.entropy_coef > 0): its backward over the vocabulary is not free.
        """
        logits = response_logits_of(self.actor, packed, self.device)
        scaled = logits.float()
        if self.cfg.temperature != 1.0:  # a division over [rows, R, vocab] (and its backward) otherwise
            scaled = scaled / max(self.cfg.temperature, 1e-6)
        logp = F.log_softmax(scaled, dim=-1)
        logprobs = logp.gather(-1, packed.response_ids.to(self.device).unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.entropy_coef > 0):
            entropy = -(logp.exp() * logp).sum(-1)
        values = None
        if with_values and self.critic is None:  # ReMax: no value function; zeros keep the batch layout
            values = torch.zeros_like(logprobs)
        elif with_values:
            P, R = packed.prompt_len, packed.response_ids.shape[1]
            # Value of the state BEFORE action t sits one column left of the token, like its logits.
            values = self.critic(packed.input_ids.to(self.device),
                                 packed.attention_mask.to(self.device))[:, P - 1:P + R - 1]
        return logits, logprobs, entropy, values

    @torch.no_grad()
    def evaluate(self, batch: RolloutBatch, pad_id: int) -> dict:
        """Old log-probs, values and entropy of this rank's rows: each [rows, R], 0 on padding; with
        ppo.kl_estimator full also "logits" [rows, R, vocab] (response positions only)."""
        start = time.perf_counter()
        packed = pack(batch.prompt_ids, batch.response_ids, pad_id)
        rows = list(shard_rows(len(batch.prompt_ids), self.rank, self.world_size))
        part = select_rows(packed, rows)
        for engine in self.engines.values():
            engine.eval()
        logits, logprobs, entropy, values = self._forward(part)
        mask = part.response_mask
        out = {"logprobs": logprobs.float().cpu() * mask, "values": values.float().cpu() * mask,
               "entropy": entropy.float().cpu() * mask}
        if self.cfg.kl_estimator == "full":
            out["logits"] = logits.float().cpu()
        out["seconds"] = time.perf_counter() - start
        return out

    def train(self, batch: RolloutBatch, pad_id: int, advantages: torch.Tensor, returns: torch.Tensor,
              old_logprobs: torch.Tensor, old_values: torch.Tensor) -> dict:
        """One PPO update on this rank's rows. Tensors are the whole batch's, [batch, R]."""
        start = time.perf_counter()
        packed = pack(batch.prompt_ids, batch.response_ids, pad_id)
        rows = list(shard_rows(len(batch.prompt_ids), self.rank, self.world_size))
        micro = max(1, self.cfg.mini_batch_size // self.world_size)
        # Every rank must run the same number of optimizer steps (each step all-reduces).
        n_minibatches = minibatches_per_epoch(len(batch.prompt_ids), self.cfg.mini_batch_size, self.world_size)
        lrs = {f"{name}_lr": engine.get_lr()[0] for name, engine in self.engines.items()}  # this update's
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + len(rows))
        for engine in self.engines.values():
            engine.train()
        totals: dict[str, float] = {}
        count = 0
        for _ in range(self.cfg.ppo_epochs):
            order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            for k in range(n_minibatches):
                chosen = order[k * micro:(k + 1) * micro] or order[:1]
                stats = self._step(select_rows(packed, chosen), advantages[chosen], returns[chosen],
                                   old_logprobs[chosen], old_values[chosen])
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
        result = {key: value / max(count, 1) for key, value in totals.items()}
        result.update(lrs)
        result["seconds"] = time.perf_counter() - start
        return result

    def _step(self, part: PackedBatch, advantages, returns, old_logprobs, old_values) -> dict[str, float]:
        mask = part.response_mask.to(self.device)
        _, logprobs, entropy, _ = self._forward(part, with_values=False)
        pg_loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs.to(self.device),
                                                   advantages.to(self.device), mask, self.cfg.clip_eps)
        entropy_mean = masked_mean(entropy, mask)
        self.actor.backward(pg_loss - self.cfg.entropy_coef * entropy_mean if self.cfg.entropy_coef else pg_loss)
        self.actor.step()
        stats = {"policy_loss": pg_loss.item(), "clip_frac": clipfrac.item(), "approx_kl": approx_kl.item(),
                 "entropy": entropy_mean.item()}
        if self.critic is None:
            return stats
        P, R = part.prompt_len, part.response_ids.shape[1]
        values = self.critic(part.input_ids.to(self.device), part.attention_mask.to(self.device))[:, P - 1:P + R - 1]
        vf_loss, vf_clipfrac = value_loss(values.float(), old_values.to(self.device), returns.to(self.device),
                                          mask, self.cfg.value_clip)
        self.critic.backward(vf_loss)
        self.critic.step()
        return {**stats, "value_loss": vf_loss.item(), "value_clip_frac": vf_clipfrac.item()}

    # ------------------------------------------------------------------ weights and checkpoints
    def state_buckets(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      skip: tuple[str, ...] | set[str] = ()):
        """The policy's HF-named weights, one bucket of <= ppo.bucket_mib at a time: {name: tensor} on
        rank 0, None elsewhere (`tlcr_ray.training.gather.state_buckets`). Every rank must drain it
        (collective under ZeRO-3); nothing holds the whole model at once."""
        from tlcr_ray.training.gather import state_buckets

        return state_buckets(self.actor.module, zero3=self.cfg.zero_stage == 3, rank=self.rank,
                             bucket_bytes=int(self.cfg.bucket_mib * 2**20), device=device, dtype=dtype, skip=skip)

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
        return bool(getattr(self.actor.module.config, "tie_word_embeddings", False))

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
                for name, t in self.actor.module.state_dict(keep_vars=True).items()]

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
            self.sender.send(item for bucket in stream for item in bucket.items())
        else:
            for _ in stream:
                pass
        return time.perf_counter() - start

    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> list[list[float]]:
        """Log-probs (temperature 1) of given responses under the current policy, for sync checks."""
        packed = pack(prompt_ids, response_ids, pad_id)
        self.actor.eval()
        logits = response_logits_of(self.actor, packed, self.device)
        logp = token_logprobs(logits, packed.response_ids.to(self.device)).cpu()
        return [row[:len(r)] for row, r in zip(logp.tolist(), response_ids)]

    def save_checkpoint(self, folder: str, step: int | None = None) -> None:
        """DeepSpeed state of the engines (collective) + the policy as an HF folder (rank 0), in the
        training dtype: the rollout engines of a resumed run start from it."""
        folder = Path(folder)
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(folder / name), tag="ds")
        self.export_hf(str(folder / "hf"), dtype="auto", step=step)

    def load_checkpoint(self, folder: str) -> None:
        folder = Path(folder)
        for name, engine in self.engines.items():
            try:
                path, _ = engine.load_checkpoint(str(folder / name), tag="ds")
            except AttributeError as exc:
                # Written before ppo.lr_schedule existed: no scheduler state (None) in the checkpoint.
                if "NoneType" not in str(exc):
                    raise
                print(f"ppo: {folder / name} holds no lr-scheduler state (an older checkpoint); the lr "
                      "schedule restarts from its first step", flush=True)
                path, _ = engine.load_checkpoint(str(folder / name), tag="ds", load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"{folder / name}: no DeepSpeed checkpoint 'ds'")

    def export_hf(self, path: str, dtype: str | None = None, step: int | None = None, final: bool = False) -> None:
        """Policy as a loadable HF folder with its tokenizer, streamed bucket by bucket (rank 0 writes;
        collective under ZeRO-3). `dtype`: the stored dtype (None: ppo.export_dtype; "auto": as trained)."""
        from tlcr_ray.training.gather import export_dtype, tied_names, write_hf_folder

        module = self.actor.module
        held = next(module.parameters()).dtype
        stored = export_dtype(self.cfg.export_dtype if dtype is None else dtype, held)
        tokenizer = None
        if self.rank == 0:
            from tlcr_ray.models import load_tokenizer

            tokenizer = load_tokenizer(self.policy_dir)
        write_hf_folder(self.state_buckets(dtype=stored, skip=tied_names(module)), path, module=module,
                        rank=self.rank, tokenizer=tokenizer, dtype=stored,
                        extra={"step": step, "final": final})
