"""The transformer, its config, parameter helpers, and Hugging Face checkpoint interop."""
from rlhf_jax.models.config import (TransformerConfig, gpt2_config, llama_config, qwen2_config,
                                    tiny_config)
from rlhf_jax.models.hf import CheckpointFormatError, from_pretrained, save_pretrained
from rlhf_jax.models.params import (abstract_params, init_params, param_shardings, place_params,
                                    stack_layers, unstack_layers)
from rlhf_jax.models.transformer import (Transformer, cache_shapes, default_position_ids,
                                         init_cache)

__all__ = [
    "CheckpointFormatError", "Transformer", "TransformerConfig", "abstract_params",
    "cache_shapes", "default_position_ids", "from_pretrained", "gpt2_config", "init_cache",
    "init_params", "llama_config", "param_shardings", "place_params", "qwen2_config", "save_pretrained",
    "stack_layers", "tiny_config", "unstack_layers",
]
