"""Models: the embedded base model and name resolution, tokenizer/policy loading, the head models."""
from tlcr_ray.models.embedded import (
                                      EMBEDDED_PREFIX,
                                      cache_dir,
                                      embedded_gguf_path,
                                      embedded_model_dir,
                                      embedded_tokenizer_dir,
                                      resolve_model,
)
from tlcr_ray.models.forward import micro_batched, resident, row_slices
from tlcr_ray.models.heads import (
                                      HEAD_KINDS,
                                      SequenceRewardModel,
                                      TokenDiscriminator,
                                      ValueModel,
                                      load_head_model,
                                      load_value_model,
                                      save_head_model,
)
from tlcr_ray.models.loading import (
                                      DTYPES,
                                      enable_gradient_checkpointing,
                                      has_active_dropout,
                                      load_policy,
                                      load_tokenizer,
                                      position_ids,
                                      torch_dtype,
                                      vocabulary_mismatch,
)

__all__ = ["EMBEDDED_PREFIX", "cache_dir", "embedded_gguf_path", "embedded_model_dir", "embedded_tokenizer_dir",
           "resolve_model", "HEAD_KINDS", "SequenceRewardModel", "TokenDiscriminator", "ValueModel",
           "load_head_model", "load_value_model", "save_head_model", "DTYPES", "enable_gradient_checkpointing",
           "has_active_dropout", "load_policy", "micro_batched", "resident", "row_slices", "load_tokenizer",
           "position_ids", "torch_dtype", "vocabulary_mismatch"]
