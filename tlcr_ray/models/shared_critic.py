"""ppo.critic shared: the policy's causal LM with a value head on its own last hidden state (as TRL's old
`AutoModelForCausalLMWithValueHead`), so one forward gives the logits and the values.

    model = PolicyWithValueHead(load_policy("runs/demo/sft/model"))
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=positions, use_cache=False)
    out.logits      # [B, K, vocab]: exactly the causal LM's own logits at the K kept positions
    out.value       # [B, K] float32: Linear(hidden, 1) on the same positions' last hidden state
    model.policy    # the HF causal LM itself: its state dict (HF names) is what syncs and exports stream

The forward takes the causal LM's keyword arguments, so the helpers that score a causal LM
(`rl.batch.response_logits_of`, `policy_logprobs`) take it (or its DeepSpeed engine) unchanged. The head
is `value_head.*` beside `policy.*`: it lives in the learner's DeepSpeed checkpoints only, never in
a rollout engine or the exported HF policy folder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput


@dataclass
class LogitsAndValue(ModelOutput):
    """A ModelOutput (a dict to DeepSpeed's ZeRO-3 hooks, which walk outputs for tensors); the field is
    `value`, not `values`, which would shadow the dict method."""

    logits: torch.Tensor | None = None
    """[B, K, vocab] at the kept positions."""
    value: torch.Tensor | None = None
    """[B, K] float32: V of the state at each kept position."""


class PolicyWithValueHead(nn.Module):
    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1).to(next(policy.parameters()).dtype)
        # Zero-init: V starts at 0, and d(value loss)/d(hidden) = dL/dV x W is 0 at the first step, so the
        # first update's value loss moves only the head, never the policy through an untrained head's
        # random errors; the head's own gradient (dL/dV x hidden) is not zero, so it learns at once.
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.policy.config

    def param_groups(self, policy_lr: float, head_lr: float) -> list[dict]:
        """Optimizer groups in this order: the policy at `policy_lr` (ppo.actor_lr), the head at
        `head_lr` (ppo.critic_lr); an lr schedule (LambdaLR) scales both alike."""
        return [{"params": list(self.policy.parameters()), "lr": policy_lr},
                {"params": list(self.value_head.parameters()), "lr": head_lr}]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, use_cache: bool = False) -> LogitsAndValue:
        """As the causal LM's forward (same arguments) -> `LogitsAndValue` at the positions the LM head runs on.

        The value head reads the LM head's own input (captured by a forward pre-hook for this call): the
        final-norm hidden state at exactly the `logits_to_keep` positions, whatever the architecture does
        around it, so the logits stay the causal LM's own and no other position is computed."""
        captured: list[torch.Tensor] = []
        lm_head = self.policy.get_output_embeddings()
        hook = lm_head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 logits_to_keep=logits_to_keep, use_cache=use_cache).logits
        finally:
            hook.remove()
        if len(captured) != 1:
            raise RuntimeError(f"{type(self.policy).__name__}: expected one LM-head call per forward, saw "
                               f"{len(captured)}; the shared value head cannot find the last hidden state")
        return LogitsAndValue(logits=logits, value=self.value_head(captured[0]).squeeze(-1).float())
