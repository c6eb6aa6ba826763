"""One data-parallel PPO learner rank: actor (policy) + critic (value head), DeepSpeed engines (ReMax: no critic;
ppo.critic shared: one engine, the policy with a value head on its last hidden state).

    learner = PPOLearner("runs/demo/sft/model", ppo_cfg, rank=0, world_size=1,
                         init_method="file:///tmp/tlcr-rdzv", critic_dir="runs/demo/disc/model")
    old = learner.evaluate(batch, pad_id)           # {"logprobs", "values", "entropy"}: [batch, R]
                                                    # (+ "kl" [batch, R], exact, for kl_estimator full)
    stats = learner.train(batch, pad_id, advantages, returns, old["logprobs"], old["values"])
    out = learner.train_in_one_pass(batch, pad_id, rewards, ref_logprobs)   # learner.fused: no evaluate;
                                                    # out["stats"], out["old_logprobs"], out["advantages"], ...

Every rank packs the WHOLE batch (so P and R agree across ranks). `evaluate` scores the rank's
contiguous block of rows, ppo.forward_micro_batch_size rows per forward, and returns only those (the
caller concatenates in rank order). `train` takes each mini-batch's rank share in micro-steps of
ppo.micro_batch_size rows and accumulates gradients to one optimizer step per mini-batch
(`rl.minibatches`); DeepSpeed averages them over the torch.distributed group (gloo on CPU, nccl on GPU).
With ppo.gradient_checkpointing both engines recompute their layers in backward.

The critic starts from `critic_dir` (ppo.critic_init: the run's discriminator or RM, head weights
included; or the policy with a fresh head). ppo.critic shared: no critic engine; the actor's module is a
`models.shared_critic.PolicyWithValueHead`, one forward gives log-probs and values and one backward of
policy_loss + ppo.vf_coef x value_loss trains both (`policy_module` is the HF policy inside, the one
that syncs and exports address: `rl.learner_weights`). The engines follow ppo.lr_schedule over the run's
optimizer steps (`optimizer_steps_per_update` x ppo.steps); DeepSpeed keeps the schedulers' state in
the checkpoints, so a resumed run continues the schedule.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from tlcr_ray.models import enable_gradient_checkpointing, has_active_dropout, micro_batched, resident, row_slices
from tlcr_ray.models.shared_critic import PolicyWithValueHead
from tlcr_ray.rl.batch import (
    PackedBatch,
    RolloutBatch,
    pack,
    policy_logprobs,
    response_logits_of,
    response_outputs_of,
    select_rows,
    shard_rows,
)
from tlcr_ray.rl.learner_weights import PolicyWeights
from tlcr_ray.rl.minibatches import (  # noqa: F401  (optimizer_steps_per_update: the count the schedule runs over)
    micro_rows,
    fuses_evaluation,
    micro_steps_per_minibatch,
    minibatches_per_epoch,
    optimizer_steps_per_update,
    rank_schedule,
)
from tlcr_ray.rl.ppo_math import (advantages_from_rollout, full_kl, policy_loss, remax_advantages, token_sum_over,
                                  value_loss)
from tlcr_ray.training.optim import PRECISION_OF_DTYPE, deepspeed_config, lr_scheduler


class PPOLearner(PolicyWeights):
    def __init__(self, policy_dir: str, ppo_cfg, *, rank: int, world_size: int, init_method: str,
                 dtype: str = "float32", critic_dir: str | None = None):
        import deepspeed

        from tlcr_ray.models import load_policy, load_value_model

        self.cfg, self.rank, self.world_size, self.dtype = ppo_cfg, rank, world_size, dtype
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
        if ppo_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        self.micro = micro_rows(ppo_cfg, world_size)
        self.accum = micro_steps_per_minibatch(ppo_cfg.mini_batch_size, self.micro, world_size)
        # ReMax has no critic, shared or not (a pipeline's ReMax run may inherit ppo.critic shared).
        self.shared = ppo_cfg.critic == "shared" and ppo_cfg.algorithm != "remax"
        self.actor = self._engine(PolicyWithValueHead(policy) if self.shared else policy, ppo_cfg.actor_lr, dtype)
        self.critic = None  # ReMax (ppo.algorithm remax) has no critic: its baseline is the greedy reward
        if ppo_cfg.algorithm != "remax" and not self.shared:
            # A head-model folder gives backbone + head weights; the policy folder a fresh head.
            critic = load_value_model(critic_dir or policy_dir, dtype=dtype, seed=ppo_cfg.seed)
            if ppo_cfg.gradient_checkpointing:
                enable_gradient_checkpointing(critic)
            self.critic = self._engine(critic, ppo_cfg.critic_lr, dtype)
        # kl_estimator full: the frozen initial policy beside the actor, so that the exact KL is computed
        # where both distributions are (docs/algorithm.md §6); one more model per rank (ZeRO-3: sharded).
        # ppo.fuse_evaluation: an update of one micro-step needs no evaluation forward of its own weights
        # (`train_in_one_pass`), unless dropout makes the train-mode forward differ from eval's.
        self.fused = fuses_evaluation(ppo_cfg, world_size) and not any(
            has_active_dropout(engine.module) for engine in self.engines.values())
        self.reference = self._reference(load_policy(policy_dir, dtype=dtype)) if ppo_cfg.kl_estimator == "full" \
            else None
        self._export_tokenizer()  # loaded now, not inside an export's memory peak

    @property
    def engines(self) -> dict:
        """{"actor": engine, "critic": engine} (no critic under ReMax or ppo.critic shared, whose head is
        inside the actor's engine), in checkpoint order."""
        return {"actor": self.actor} if self.critic is None else {"actor": self.actor, "critic": self.critic}

    @property
    def policy_module(self):
        """The HF causal LM being trained (ppo.critic shared: the one inside the actor's module)."""
        return self.actor.module.policy if self.shared else self.actor.module

    def _engine(self, model, lr: float, dtype: str):
        import deepspeed

        cfg = self.cfg
        config = deepspeed_config(micro_batch_size=self.micro, grad_accum=self.accum, world_size=self.world_size,
                                  zero_stage=cfg.zero_stage, precision=PRECISION_OF_DTYPE[dtype],
                                  max_grad_norm=cfg.max_grad_norm, offload_optimizer=cfg.offload_optimizer,
                                  offload_params=cfg.offload_params)
        # A plain torch optimizer: DeepSpeed's CPU/fused Adam would JIT-compile for a minute first.
        # ppo.critic shared: the value head in a group of its own at ppo.critic_lr.
        params = model.param_groups(lr, cfg.critic_lr) if isinstance(model, PolicyWithValueHead) else model.parameters()
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        total = cfg.steps * optimizer_steps_per_update(cfg, self.world_size)
        schedule = lr_scheduler(optimizer, total=total, warmup=cfg.warmup_steps, schedule=cfg.lr_schedule)
        # Passed to DeepSpeed: engine.step() steps it (at each accumulation boundary), and
        # save/load_checkpoint keep its state.
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
        return engine

    def _reference(self, model):
        """The learner's frozen reference: under ZeRO-3 a DeepSpeed engine without optimizer (sharded like
        the actor; ppo.offload_reference: its parameters in host RAM), else the module itself (offloaded
        between evaluations with ppo.offload_reference)."""
        model.eval().requires_grad_(False)
        if self.cfg.zero_stage != 3:
            return model if self.cfg.offload_reference else model.to(self.device)
        import deepspeed

        config = deepspeed_config(micro_batch_size=self.cfg.forward_micro_batch_size, grad_accum=1, zero_stage=3,
                                  precision=PRECISION_OF_DTYPE[self.dtype], max_grad_norm=self.cfg.max_grad_norm,
                                  world_size=self.world_size, offload_params=self.cfg.offload_reference)
        return deepspeed.initialize(model=model, config=config)[0]

    # ------------------------------------------------------------------ forwards
    def _forward(self, packed: PackedBatch, with_values: bool = True):
        """-> (logits [rows, R, vocab] before temperature, logprobs, entropy, values [rows, R] each) on self.device.

        One log-softmax serves the log-probs and the entropy; the entropy carries gradients only when
        it is in the loss (ppo.entropy_coef > 0): its backward over the vocabulary is not free.
        ppo.critic shared: the values come from this same forward (`with_values` makes no difference).
        """
        out = response_outputs_of(self.actor, packed, self.device)
        logits = out.logits
        scaled = logits.float()
        if self.cfg.temperature != 1.0:  # a division over [rows, R, vocab] (and its backward) otherwise
            scaled = scaled / max(self.cfg.temperature, 1e-6)
        logp = F.log_softmax(scaled, dim=-1)
        logprobs = logp.gather(-1, packed.response_ids.to(self.device).unsqueeze(-1)).squeeze(-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.entropy_coef > 0):
            entropy = -(logp.exp() * logp).sum(-1)
        values = out.value if self.shared else self._values(packed) if with_values else None
        return logits, logprobs, entropy, values

    def _values(self, packed: PackedBatch) -> torch.Tensor:
        """[rows, R]: the value of the state BEFORE action t sits one column left of the token, like its logits.
        ReMax: no value function; zeros keep the batch layout."""
        P, R = packed.prompt_len, packed.response_ids.shape[1]
        if self.critic is None:
            return torch.zeros(packed.input_ids.shape[0], R, device=self.device)
        return self.critic(packed.input_ids.to(self.device), packed.attention_mask.to(self.device))[:, P - 1:P + R - 1]

    @torch.no_grad()
    def evaluate(self, batch: RolloutBatch, pad_id: int, policy: bool = True) -> dict:
        """Old log-probs, values and entropy of this rank's rows: each [rows, R], 0 on padding; with
        ppo.kl_estimator full also "kl" [rows, R], the exact KL(pi || pi_ref) at each response position
        (from this rank's reference copy). ppo.forward_micro_batch_size rows per forward. `policy` False
        (ppo.old_logprobs rollout): the critic's values alone, no policy forward (ppo.critic shared: the
        one forward still runs, its values are the head's)."""
        start = time.perf_counter()
        packed = pack(batch.prompt_ids, batch.response_ids, pad_id)
        part = select_rows(packed, shard_rows(len(batch.prompt_ids), self.rank, self.world_size))
        for engine in self.engines.values():
            engine.eval()

        def forward(micro: PackedBatch) -> dict:
            if not policy and not self.shared:  # shared: the values come from the policy's own forward
                return {"values": self._values(micro).float().cpu()}
            logits, logprobs, entropy, values = self._forward(micro)
            out = {"logprobs": logprobs.float().cpu(), "values": values.float().cpu(), "entropy": entropy.float().cpu()}
            if self.reference is not None:
                ref_logits = response_logits_of(self.reference, micro, self.device)
                out["kl"] = full_kl(logits, ref_logits, self.cfg.temperature).cpu()
            return out

        offload = self.reference is not None and self.cfg.offload_reference and self.cfg.zero_stage != 3
        n, size = part.input_ids.shape[0], self.cfg.forward_micro_batch_size
        with resident(self.reference, self.device, offload) if offload else nullcontext():
            out = micro_batched(lambda rows: forward(select_rows(part, range(n)[rows])), n, size)
            if self.cfg.zero_stage == 3:  # each forward gathers parameters collectively: every rank runs as
                most = len(row_slices(-(-len(batch.prompt_ids) // self.world_size), size))  # many as the
                for _ in range(most - len(row_slices(n, size))):  # busiest, a spare one-row forward if short
                    forward(select_rows(packed, [0]))
        out = {k: v * part.response_mask for k, v in out.items()}
        out["seconds"] = time.perf_counter() - start
        return out

    def train(self, batch: RolloutBatch, pad_id: int, advantages: torch.Tensor, returns: torch.Tensor,
              old_logprobs: torch.Tensor, old_values: torch.Tensor) -> dict:
        """One PPO update on this rank's share of each mini-batch (`rl.minibatches.rank_schedule`), in
        micro-steps of ppo.micro_batch_size rows with gradients accumulated to one optimizer step per
        mini-batch. Tensors are the whole batch's, [batch, R]."""
        start = time.perf_counter()
        packed = pack(batch.prompt_ids, batch.response_ids, pad_id)
        mask = packed.response_mask
        schedule = rank_schedule(len(batch.prompt_ids), self.cfg.mini_batch_size, self.micro, self.world_size,
                                 self.rank, self.cfg.ppo_epochs, self.cfg.seed)
        lrs = self._lrs()
        for engine in self.engines.values():
            engine.train()
        sums: dict[str, float] = {}
        for minibatch in schedule:
            tokens = float(mask[minibatch[0].minibatch].sum())  # the whole mini-batch's, over all ranks
            for step in minibatch:
                stats = self._step(select_rows(packed, step.rows), advantages[step.rows], returns[step.rows],
                                   old_logprobs[step.rows], old_values[step.rows], step.weight, tokens)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
        n = max(sums.pop("tokens", 0.0), 1.0)
        result = {key: value / n for key, value in sums.items()}  # token means over this rank's real rows
        result.update(lrs)
        result["seconds"] = time.perf_counter() - start
        return result

    def _lrs(self) -> dict[str, float]:
        """This update's learning rates: {"actor_lr", "critic_lr"} (ReMax: no critic)."""
        lrs = {f"{name}_lr": engine.get_lr()[0] for name, engine in self.engines.items()}
        if self.shared:
            lrs["critic_lr"] = self.actor.get_lr()[1]  # the value head's group (`PolicyWithValueHead.param_groups`)
        return lrs

    def _step(self, part: PackedBatch, advantages, returns, old_logprobs, old_values, weight: float,
              minibatch_tokens: float) -> dict[str, float]:
        """One micro-step of both engines. The loss is the micro-batch's token sum over the mini-batch's
        token count x world size (DeepSpeed averages gradients over ranks; accumulation adds them, so
        scale_wrt_gas=False), x `weight` (0 for a placeholder): any cut of the mini-batch into ranks and
        micro-batches gives the gradient of its token mean. ppo.critic shared: one engine, one backward of
        policy loss + ppo.vf_coef x value loss (scaled alike). -> token sums of the diagnostics."""
        _, logprobs, entropy, values = self._forward(part, with_values=False)
        stats = self._actor_update(part, logprobs, entropy, values, advantages, returns, old_logprobs, old_values,
                                   weight, minibatch_tokens)
        if self.critic is not None:  # separate: the critic's own forward, backward and step
            stats.update(self._critic_update(part, self._values(part).float(), returns, old_values, weight,
                                             minibatch_tokens))
        return stats

    def _actor_update(self, part: PackedBatch, logprobs, entropy, values, advantages, returns, old_logprobs,
                      old_values, weight: float, norm: float) -> dict[str, float]:
        """Backward and step of the actor's engine from its forward's outputs (`_step`'s scaling); ppo.critic
        shared: with the head's value loss in the same backward."""
        mask, scale = part.response_mask.to(self.device), weight * self.world_size
        pg_loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs.to(self.device),
                                                   advantages.to(self.device), mask, self.cfg.clip_eps, norm)
        entropy_sum = token_sum_over(entropy, mask, norm)
        loss = pg_loss - self.cfg.entropy_coef * entropy_sum if self.cfg.entropy_coef else pg_loss
        if self.shared:
            vf_loss, vf_clipfrac = value_loss(values, old_values.to(self.device), returns.to(self.device), mask,
                                              self.cfg.value_clip, norm)
            loss = loss + self.cfg.vf_coef * vf_loss
        self.actor.backward(loss * scale, scale_wrt_gas=False)
        self.actor.step()  # an optimizer step at the accumulation boundary only
        tokens = float(mask.sum()) * weight
        stats = {"policy_loss": pg_loss.item() * norm * weight, "entropy": entropy_sum.item() * norm * weight,
                 "clip_frac": clipfrac.item() * tokens, "approx_kl": approx_kl.item() * tokens, "tokens": tokens}
        if self.shared:
            stats.update(value_loss=vf_loss.item() * norm * weight, value_clip_frac=vf_clipfrac.item() * tokens)
        return stats

    def _critic_update(self, part: PackedBatch, values, returns, old_values, weight: float,
                       norm: float) -> dict[str, float]:
        """Backward and step of the separate critic's engine from its forward's `values` [rows, R]."""
        mask = part.response_mask.to(self.device)
        vf_loss, vf_clipfrac = value_loss(values, old_values.to(self.device), returns.to(self.device), mask,
                                          self.cfg.value_clip, norm)
        self.critic.backward(vf_loss * weight * self.world_size, scale_wrt_gas=False)
        self.critic.step()
        return {"value_loss": vf_loss.item() * norm * weight,
                "value_clip_frac": vf_clipfrac.item() * float(mask.sum()) * weight}

    def train_in_one_pass(self, batch: RolloutBatch, pad_id: int, rewards: torch.Tensor, ref_logprobs: torch.Tensor,
                          old_logprobs: torch.Tensor | None = None, baseline: torch.Tensor | None = None) -> dict:
        """`train` with the evaluation folded in (ppo.fuse_evaluation; `self.fused`): the update is ONE
        micro-step of this one rank over the whole batch, so its forwards run on the weights an evaluation
        would. The old log-probs (None: the actor's forward's, detached) and the old values (the shared
        head's, or the separate critic's forward's, detached; ReMax: zeros) come from those forwards, and so
        do the advantages: `advantages_from_rollout`, or ReMax's with the greedy responses' total rewards
        `baseline` [batch]. A separate critic's forward runs before the actor's backward, so both graphs
        are held at once. Tensors [batch, R] (rewards penalised already). -> {"stats": `train`'s dict,
        "old_logprobs", "values", and the advantage dict's tensors}."""
        if not self.fused:
            raise RuntimeError("train_in_one_pass: this learner's update is not one pass (rl.minibatches."
                               "fuses_evaluation, or the policy has dropout): evaluate, then train")
        start, cfg = time.perf_counter(), self.cfg
        packed = pack(batch.prompt_ids, batch.response_ids, pad_id)
        mask, lrs = packed.response_mask, self._lrs()
        tokens = float(mask.sum())
        for engine in self.engines.values():
            engine.train()
        _, logprobs, entropy, head_values = self._forward(packed, with_values=False)
        if old_logprobs is None:
            old_logprobs = logprobs.detach().float().cpu() * mask
        critic_values = self._values(packed).float() if self.critic is not None else None  # [batch, R]
        values = critic_values if critic_values is not None else head_values if self.shared else None
        values = values.detach().float().cpu() * mask if values is not None else torch.zeros_like(mask)
        common = dict(kl_coef=cfg.kl_coef, gamma=cfg.gamma, kl_estimator=cfg.kl_estimator, temperature=cfg.temperature)
        adv = remax_advantages(rewards, baseline, old_logprobs, ref_logprobs, mask, **common) if baseline is not None \
            else advantages_from_rollout(rewards, old_logprobs, ref_logprobs, values, mask, lam=cfg.lam,
                                         whiten=cfg.whiten_advantages, **common)
        stats = self._actor_update(packed, logprobs, entropy, head_values, adv["advantages"], adv["returns"],
                                   old_logprobs, values, 1.0, tokens)
        if critic_values is not None:
            stats.update(self._critic_update(packed, critic_values, adv["returns"], values, 1.0, tokens))
        n = max(stats.pop("tokens"), 1.0)
        result = {**{key: value / n for key, value in stats.items()}, **lrs,
                  "seconds": time.perf_counter() - start}
        return {"stats": result, "old_logprobs": old_logprobs, "values": values, **adv}

    # ------------------------------------------------------------------ sync checks and checkpoints
    # (the weight streams and the HF export: `rl.learner_weights.PolicyWeights`)
    @torch.no_grad()
    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> list[list[float]]:
        """Log-probs (temperature 1) of given responses under the current policy, for sync checks."""
        packed = pack(prompt_ids, response_ids, pad_id)
        self.actor.eval()
        logp = policy_logprobs(self.actor, packed, 1.0, self.cfg.forward_micro_batch_size, self.device)
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
        written = "separate" if (folder / "critic").is_dir() else "shared"  # (or ReMax's: no critic either way)
        if (folder / "actor").is_dir() and (self.critic is not None) != (written == "separate"):  # states differ
            raise ValueError(f"{folder}: written with ppo.critic={written}, but this run has ppo.critic="
                             f"{self.cfg.critic}; resume with the value it was written with, or set ppo.resume=never")
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
