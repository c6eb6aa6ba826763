"""The vLLM worker extension that loads weight-handover buckets (`tlcr_ray.rl.handover`) in each worker.

    LLM(..., worker_extension_cls=WORKER_EXTENSION)
    llm.collective_rpc("tlcr_begin_reload")
    llm.collective_rpc("tlcr_load_handle", args=(handle,))    # per bucket: "shm" file or "cuda_ipc" handles
    llm.collective_rpc("tlcr_finish_reload")

vLLM mixes this class into its worker class (methods must not clash with the worker's own). The three calls
are vLLM's in-place `reload_weights` (`model_loader.reload.inplace`) cut at its bucket boundaries: the
layer-wise reload is armed once, `model.load_weights` takes HF names (q/k/v and gate/up packed by the model)
one bucket per RPC, and the post-load processing (the CPU backend's weight repacking) runs at the end. Only
the handle crosses the RPC, so this works for the multi-process engine too; each worker opens the bucket
itself: the /dev/shm file, or on CUDA the IPC handle of the learner rank on its own GPU (OpenRLHF and vLLM's
colocated RLHF example do the same with a flat buffer per bucket).
"""
from __future__ import annotations

WORKER_EXTENSION = "tlcr_ray.rl.rollout.vllm_worker.WeightHandoverExtension"


class WeightHandoverExtension:
    """Mixed into vLLM's worker (`self.model_runner`, `self.model_config`, `self.device` are the worker's)."""

    def tlcr_begin_reload(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())
        self.tlcr_loaded = set()

    def tlcr_load_handle(self, handle: dict) -> int:
        """One bucket; -> how many tensors it held."""
        import torch

        from tlcr_ray.rl.handover import open_handle

        tensors = open_handle(handle, self.device)
        if handle["kind"] == "cuda_ipc":
            # The layer-wise reload keeps the tensors of a layer that is not complete yet (q_proj in this
            # bucket, v_proj in the next) until it is, but the learner frees its IPC buffer on our ack: copy.
            # A shm bucket needs no copy: its file is unlinked, not reused, so the views stay valid.
            tensors = {name: t.clone() for name, t in tensors.items()}
        self.tlcr_loaded |= set(self.model_runner.get_model().load_weights(tensors.items()) or ())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # read before the producer frees the buffer
        return len(tensors)

    def tlcr_finish_reload(self) -> int:
        """Post-load processing and the caches `reload_weights` resets; -> parameters loaded."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner
        finalize_layerwise_reload(runner.get_model(), self.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        return len(self.tlcr_loaded)
