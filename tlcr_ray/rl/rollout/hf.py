"""The HF `generate` rollout backend (CPU, or one GPU without vLLM)."""
from __future__ import annotations

from typing import Iterable

import torch

from tlcr_ray.models import load_policy, load_tokenizer
from tlcr_ray.rl.batch import RolloutBatch, pack, response_logits_of, token_logprobs
from tlcr_ray.rl.handover import ShmMappings, open_handle
from tlcr_ray.rl.rollout.stops import contains_stop, cut_at_stop, window_tokens


def _stop_criteria(tokenizer, stops: list[str], prompt_len: int):
    """A `generate` stopping criterion: a row is done once its response's last tokens hold a stop
    string (the same text test as `cut_at_stop`, which then cuts the row). Saves the tokens after it."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = window_tokens(stops)

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
            tails = input_ids[:, prompt_len:][:, -window:].tolist()
            return torch.tensor([contains_stop(tokenizer, tail, stops) for tail in tails],
                                dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])


class HFRollout:
    """RolloutEngine on HF `generate` (CPU, or one GPU without vLLM)."""

    copies_on_load = True  # `load_state_dict` copies each tensor into the parameters

    def __init__(self, model_dir: str, dtype: str = "float32", device: str = "cpu"):
        self.model_dir = model_dir
        self._tokenizer = None
        self.device = torch.device(device)
        self.model = load_policy(model_dir, dtype=dtype).to(self.device).eval()
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.model.config.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self._shm_mappings = ShmMappings()  # a reused bucket file stays mapped from one sync to the next

    @property
    def tokenizer(self):
        """The model folder's tokenizer (loaded on first use: only stop strings need it)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    @torch.no_grad()
    def generate(self, prompt_ids, *, max_new_tokens, temperature, top_p, seed,
                 stop: list[str] | None = None) -> RolloutBatch:
        """`stop`: stop strings (ppo.stop); a response holding one ends before it, EOS appended (`cut_at_stop`)."""
        packed = pack(prompt_ids, [[] for _ in prompt_ids], self.pad_id)
        P = packed.prompt_len
        torch.manual_seed(seed)
        sample = temperature > 0
        stop = list(stop or [])
        criteria = _stop_criteria(self.tokenizer, stop, P) if stop else None
        out = self.model.generate(
            input_ids=packed.input_ids[:, :P].to(self.device),
            attention_mask=packed.attention_mask[:, :P].to(self.device),
            do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
            top_k=0 if sample else None, max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None, output_logits=True, return_dict_in_generate=True,
            stopping_criteria=criteria)
        new = out.sequences[:, P:]
        # One step's [batch, vocab] logits at a time (before any warping), on the model's device: the
        # stacked [batch, new, vocab] tensor was ~0.8 GB at batch 32 and its copy to the CPU cost up to
        # a third of generate() on a GPU (bench/gpu_check.py).
        logp = torch.stack([token_logprobs(step_logits, new[:, t], temperature if sample else 1.0)
                            for t, step_logits in enumerate(out.logits)], dim=1).cpu()
        new = new.cpu()
        batch = RolloutBatch([list(p) for p in prompt_ids], [], [], [])
        cut_rows = []
        for index, (row, row_logp) in enumerate(zip(new.tolist(), logp.tolist())):
            end = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), None)
            response, response_logp = (row[:end], row_logp[:end]) if end else (row, row_logp)
            if stop:  # a row the criterion stopped is padded after the marker; the cut drops that too
                response, stopped = cut_at_stop(response, self.tokenizer, stop, self.stop_eos_id)
                if stopped:
                    response_logp = response_logp[:len(response) - 1] + [float("nan")]
                    cut_rows.append(index)
                    end = len(response)
            batch.response_ids.append(response)
            batch.logprobs.append(response_logp)
            batch.finish_reasons.append("stop" if end else "length")
        if cut_rows:  # the appended EOS's log-prob under the engine's weights, as sampling would give it
            eos_logp = self._last_logprobs([prompt_ids[i] for i in cut_rows],
                                           [batch.response_ids[i] for i in cut_rows], temperature if sample else 1.0)
            for i, value in zip(cut_rows, eos_logp):
                batch.logprobs[i][-1] = value
        return batch

    @property
    def stop_eos_id(self) -> int:
        """The EOS appended at a stop string: the tokenizer's, the one label sequences end with (as in
        `VLLMRollout`); the model's lowest EOS id when the tokenizer has none."""
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else min(self.eos_ids)

    def _last_logprobs(self, prompt_ids, response_ids, temperature: float) -> list[float]:
        """Log-prob of each response's last token (logits / temperature), one teacher-forced forward."""
        packed = pack(prompt_ids, response_ids, self.pad_id)
        logp = token_logprobs(response_logits_of(self.model, packed, self.device),
                              packed.response_ids.to(self.device), temperature).cpu()
        return [float(logp[row, len(r) - 1]) for row, r in enumerate(response_ids)]

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.load_weight_stream([state_dict])

    def load_weight_stream(self, buckets: Iterable[dict[str, torch.Tensor]]) -> None:
        """Replace the weights bucket by bucket (each copied in, then dropped); every weight must arrive."""
        self.begin_weight_load()
        for bucket in buckets:
            self._load_bucket(bucket)
            bucket = None  # released before the next bucket is gathered
        self.finish_weight_load()

    # The handed-over form of the same (ppo.weight_sync shm | cuda_ipc, `tlcr_ray.rl.handover`): one call per bucket.
    def begin_weight_load(self) -> None:
        self._loaded: set[str] = set()

    def load_weight_handle(self, handle: dict) -> None:
        """One bucket's handle: its tensors are views of the shared file / the learner's GPU buffer,
        copied into the weights here and released on return. A reused file stays mapped for the next one."""
        self._load_bucket(open_handle(handle, self.device, self._shm_mappings))

    def finish_weight_load(self) -> None:
        # Tied embeddings: lm_head.weight may be absent from the sender's buckets and that is fine.
        missing = sorted(set(self.model.state_dict()) - self._loaded - {"lm_head.weight"})
        if missing:
            raise KeyError(f"HFRollout weight load: missing {missing[:5]}")

    @torch.no_grad()
    def _load_bucket(self, bucket: dict[str, torch.Tensor]) -> None:
        _, unexpected = self.model.load_state_dict(bucket, strict=False)
        if unexpected:
            raise KeyError(f"HFRollout weight load: unexpected {unexpected[:5]}")
        self._loaded.update(bucket)

    # ---- colocated phases (ppo.colocate all): free the shared GPU while the learner trains
    def sleep(self) -> dict:
        """Weights to host memory (CUDA only); `wake_up` brings them back. -> {"applied", "reason"}."""
        if self.device.type != "cuda":
            return {"applied": False, "reason": "HF rollout on cpu: the weights already live in host memory"}
        self.model.to("cpu")
        torch.cuda.empty_cache()
        return {"applied": True, "reason": "weights moved to host"}

    def wake_up(self) -> dict:
        if self.device.type != "cuda":
            return {"applied": False, "reason": "HF rollout on cpu: nothing was moved"}
        self.model.to(self.device)
        return {"applied": True, "reason": "weights back on the GPU"}

    @torch.no_grad()
    def score(self, prompt_ids, response_ids) -> list[list[float]]:
        packed = pack(prompt_ids, response_ids, self.pad_id)
        logp = token_logprobs(response_logits_of(self.model, packed, self.device),
                              packed.response_ids.to(self.device)).cpu() * packed.response_mask
        return [row[:len(r)] for row, r in zip(logp.tolist(), response_ids)]
