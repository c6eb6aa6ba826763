"""The HF `generate` rollout backend (CPU, or one GPU without vLLM)."""
from __future__ import annotations

import torch

from tlcr_ray.models import load_policy
from tlcr_ray.rl.batch import RolloutBatch, pack, response_logits_of, token_logprobs


class HFRollout:
    """RolloutEngine on HF `generate` (CPU, or one GPU without vLLM)."""

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu"):
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
