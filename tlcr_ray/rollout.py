"""The rollout interface both generation backends implement, the HF backend, and batch packing.

    engine = HFRollout("runs/demo/sft/model")
    batch = engine.generate([[1, 2, 3]], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=0)
    packed = pack(batch.prompt_ids, batch.response_ids, pad_id=0)

Packing layout (shared by the reward, reference and learner forwards): prompts LEFT-padded to P,
responses RIGHT-padded to R, so response token j of every row sits at column P + j. The log-prob
of that token is read from the logits at column P + j - 1; the discriminator's p for it at P + j.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    """Sampling log-prob of each response token under the engine's weights (logits / temperature)."""
    finish_reasons: list[str]
    """"stop" (EOS sampled, EOS kept as the last response token) or "length"."""


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int) -> RolloutBatch: ...

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the policy weights (HF parameter names)."""

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Log-probs (temperature 1) of the given responses, for weight-sync checks."""


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    """[batch, P + R]: left-padded prompts then right-padded responses."""
    attention_mask: torch.Tensor
    """[batch, P + R]: 1 on real tokens."""
    response_ids: torch.Tensor
    """[batch, R]: response tokens (pad id after the end)."""
    response_mask: torch.Tensor
    """[batch, R]: 1.0 on response tokens (the actions), 0.0 on padding."""
    prompt_len: int
    """P: response token j is at column P + j."""


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> PackedBatch:
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"pack: {len(prompt_ids)} prompts but {len(response_ids)} responses")
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(r) for r in response_ids))
    B = len(prompt_ids)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R))
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(prompt):P] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, P:P + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, P - len(prompt):P + len(response)] = 1
        response_mask[i, :len(response)] = 1.0
    return PackedBatch(input_ids, attention_mask, input_ids[:, P:].clone(), response_mask, P)


def select_rows(packed: PackedBatch, rows) -> PackedBatch:
    """The given rows (None: all) of a packed batch; P and R stay those of the whole batch."""
    if rows is None:
        return packed
    rows = list(rows)
    return PackedBatch(packed.input_ids[rows], packed.attention_mask[rows], packed.response_ids[rows],
                       packed.response_mask[rows], packed.prompt_len)


def response_logits(logits: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """[batch, P + R, vocab] causal-LM logits -> [batch, R, vocab] predicting each response token."""
    P, R = packed.prompt_len, packed.response_ids.shape[1]
    return logits[:, P - 1:P + R - 1]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[..., vocab] logits, [...] ids -> [...] log-probs of the ids (float32), e.g. [batch, R, vocab] -> [batch, R]."""
    logp = F.log_softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def response_logits_of(model, packed: PackedBatch, device: torch.device) -> torch.Tensor:
    """[rows, R, vocab] causal-LM logits predicting each response token (the columns P - 1 .. P + R - 2
    of `response_logits`). The LM head runs on those positions only: over a 49k
    vocabulary it costs more than the rest of a small model's forward."""
    P, R = packed.prompt_len, packed.response_ids.shape[1]
    # Exact positions rather than the last R + 1 then a slice, whose backward would fill a zero tensor.
    positions = torch.arange(P - 1, P + R - 1, device=device)
    return model(input_ids=packed.input_ids.to(device), attention_mask=packed.attention_mask.to(device),
                 logits_to_keep=positions).logits


@torch.no_grad()
def policy_logprobs(model, packed: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """[batch, R] log-probs of the packed responses under a causal LM, zero on padding."""
    device = next(model.parameters()).device
    logits = model(input_ids=packed.input_ids.to(device),
                   attention_mask=packed.attention_mask.to(device)).logits
    logp = token_logprobs(response_logits(logits, packed), packed.response_ids.to(device), temperature)
    return logp.cpu() * packed.response_mask


class HFRollout:
    """RolloutEngine on HF `generate` (CPU, or one GPU without vLLM)."""

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu"):
        from tlcr_ray.models import load_policy

        self.device = torch.device(device)
        self.model = load_policy(model_dir, dtype=dtype).to(self.device).eval()
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.model.config.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)

    @torch.no_grad()
    def generate(self, prompt_ids, *, max_new_tokens, temperature, top_p, seed) -> RolloutBatch:
        packed = pack(prompt_ids, [[] for _ in prompt_ids], self.pad_id)
        P = packed.prompt_len
        torch.manual_seed(seed)
        sample = temperature > 0
        out = self.model.generate(
            input_ids=packed.input_ids[:, :P].to(self.device),
            attention_mask=packed.attention_mask[:, :P].to(self.device),
            do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
            top_k=0 if sample else None, max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, P:]
        # One step's [batch, vocab] logits at a time (before any warping), on the model's device: the
        # stacked [batch, new, vocab] tensor was ~0.8 GB at batch 32 and its copy to the CPU cost up to
        # a third of generate() on a GPU (bench/gpu_check.py).
        logp = torch.stack([token_logprobs(step_logits, new[:, t], temperature if sample else 1.0)
                            for t, step_logits in enumerate(out.logits)], dim=1).cpu()
        new = new.cpu()
        batch = RolloutBatch([list(p) for p in prompt_ids], [], [], [])
        for row, row_logp in zip(new.tolist(), logp.tolist()):
            end = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), None)
            batch.response_ids.append(row[:end] if end else row)
            batch.logprobs.append(row_logp[:end] if end else row_logp)
            batch.finish_reasons.append("stop" if end else "length")
        return batch

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        # Tied embeddings: lm_head.weight may be absent from the sender's dict and that is fine.
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise KeyError(f"HFRollout.load_state_dict: missing {missing[:5]}, unexpected {unexpected[:5]}")

    @torch.no_grad()
    def score(self, prompt_ids, response_ids) -> list[list[float]]:
        packed = pack(prompt_ids, response_ids, self.pad_id)
        logp = token_logprobs(response_logits_of(self.model, packed, self.device),
                              packed.response_ids.to(self.device)).cpu() * packed.response_mask
        return [row[:len(r)] for row, r in zip(logp.tolist(), response_ids)]


def resolve_backend(backend: str) -> str:
    """`auto` -> vllm when importable, else hf; anything else must be hf or vllm."""
    if backend == "auto":
        import importlib.util

        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if backend not in ("hf", "vllm"):
        raise ValueError(f"ppo.rollout_backend {backend!r}: expected hf, vllm or auto")
    return backend


def weight_sync_method(backend: str, learner_on_cuda: bool) -> str:
    """How learner weights reach the rollout engines: "nccl" (learner rank 0 broadcasts into the
    vLLM workers, GPU to GPU) when vLLM serves a CUDA learner, else "object_store" (a CPU state dict
    put once and loaded by every engine)."""
    return "nccl" if learner_on_cuda and resolve_backend(backend) == "vllm" else "object_store"


def make_engine(backend: str, model_dir: str, *, dtype: str = "float32", device: str = "cpu",
                gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1, seed: int = 0,
                kv_cache_gib: float | None = None, max_model_len: int | None = None) -> RolloutEngine:
    """The configured backend; the vLLM-only arguments are ignored by the HF one."""
    if resolve_backend(backend) == "vllm":
        from tlcr_ray.vllm_rollout import VLLMRollout

        return VLLMRollout(model_dir, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                           tensor_parallel_size=tensor_parallel_size, seed=seed, kv_cache_gib=kv_cache_gib,
                           max_model_len=max_model_len)
    return HFRollout(model_dir, dtype=dtype, device=device)


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int | None) -> list[list[int]]:
    """Prompt token ids exactly as `tokens.encode_prompt_response` splits them (left-truncated)."""
    from tlcr_ray.tokens import encode_prompt_response

    return [encode_prompt_response(tokenizer, p, "", max_prompt_len=max_prompt_len).prompt_ids for p in prompts]
