"""MT-Bench / AlpacaEval answer generation from one policy, wherever a runner puts it (`eval.runner`).

    model = AnswerModel(model_dir, "bfloat16", cfg.eval, EvalPlace("cuda", "vllm"), engine_kwargs)
    model.generate(["<prompt text>", ...])   # -> [(answer, "stop" | "length"), ...]

Prompts are the conversation rendered by `chat_prompt`: the tokenizer's chat template, or, for a base
model without one (Llama-2-7b-hf), the HH-RLHF dialogue format the policy was trained on
(`data.pairs.hh_dialogue`; the answer then ends at the next "\n\nHuman:"). HF `generate` serves the
`hf` backend (the driver's CPU as before, or a worker's GPU); `vllm` goes through the rollout engine
(`tlcr_ray.rl.rollout`), which cuts at the same stop string.
"""
from __future__ import annotations

from tlcr_ray.data.pairs import HUMAN, hh_dialogue
from tlcr_ray.eval.runner import DRIVER, EvalPlace


def eval_engine_kwargs(cfg, max_model_len: int | None) -> dict:
    """The rollout engine's keywords in evaluation: one GPU per engine, eval.vllm_memory_utilization of it,
    `max_model_len` tokens of context (None: the model's own), model.dtype (not ppo.rollout_dtype: every
    method's policy is judged in the dtype it trained in)."""
    from tlcr_ray.rl.rollout import engine_kwargs_of

    return {**engine_kwargs_of(cfg), "dtype": cfg.model.dtype, "tensor_parallel_size": 1, "max_model_len": max_model_len,
            "gpu_memory_utilization": cfg.eval.vllm_memory_utilization}


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The generation prompt of a conversation: the tokenizer's chat template, else the HH format."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return hh_dialogue(messages)


class AnswerModel:
    """One policy loaded on `place` for answers: greedy at eval.temperature 0, else sampled with eval.seed."""

    def __init__(self, model_dir: str, dtype: str, settings, place: EvalPlace = DRIVER,
                 engine_kwargs: dict | None = None):
        import torch

        from tlcr_ray.models import load_policy, load_tokenizer
        from tlcr_ray.rl.rollout import make_engine, resolve_backend

        self.settings = settings
        self.tokenizer = load_tokenizer(model_dir)
        self.tokenizer.padding_side = "left"  # decoder-only batched generation continues from the right edge
        self.backend = resolve_backend(place.backend)
        self.model = self.engine = None
        if self.backend == "vllm":
            self.engine = make_engine("vllm", model_dir, **{**(engine_kwargs or {}), "dtype": dtype,
                                                            "seed": settings.seed})
        else:
            self.device = torch.device(place.device)
            self.model = load_policy(model_dir, dtype=dtype).to(self.device).eval()
            torch.manual_seed(settings.seed)

    def generate(self, prompts: list[str]) -> list[tuple[str, str]]:
        """-> (answer text, "stop" | "length") per prompt."""
        return self._vllm(prompts) if self.engine is not None else self._hf(prompts)

    def _hf(self, prompts: list[str]) -> list[tuple[str, str]]:
        import torch

        s, tokenizer = self.settings, self.tokenizer
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": 1.0} \
            if s.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=s.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                      **sampling)
        new_tokens = out[:, enc["input_ids"].shape[1]:]  # [batch, <= max_new_tokens]
        results = []
        for row in new_tokens.tolist():
            finish = "stop" if tokenizer.eos_token_id in row or len(row) < s.max_new_tokens else "length"
            text = tokenizer.decode(row, skip_special_tokens=True)
            if not tokenizer.chat_template and HUMAN in text:  # HH format: the model's invented next turn
                text, finish = text.split(HUMAN, 1)[0], "stop"
            results.append((text.strip(), finish))
        return results

    def _vllm(self, prompts: list[str]) -> list[tuple[str, str]]:
        s, tokenizer = self.settings, self.tokenizer
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        batch = self.engine.generate(ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=1.0,
                                     seed=s.seed, stop=None if tokenizer.chat_template else [HUMAN])
        return [(tokenizer.decode(r, skip_special_tokens=True).strip(), finish)
                for r, finish in zip(batch.response_ids, batch.finish_reasons)]
