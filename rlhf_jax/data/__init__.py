"""Data layer: validated JSONL formats, TFDS/ArrayRecord storage, static-shape
tokenization and a deterministic, resumable, multi-host batch iterator."""
from rlhf_jax.data.formats import (
    DEFAULT_MAX_K,
    FORMATS,
    DataError,
    read_jsonl,
    render_messages_plain,
    validate_row,
    validate_rows,
    write_jsonl,
)
from rlhf_jax.data.iterator import BatchIterator, make_global_batch
from rlhf_jax.data.tfds_builders import (
    BUILDERS,
    JsonlBuilderConfig,
    RlhfComparisonsJsonl,
    RlhfDemonstrationsJsonl,
    RlhfPretrainJsonl,
    RlhfPromptsJsonl,
    build_tfds_from_jsonl,
    load_tfds,
)
from rlhf_jax.data.tokenize import (
    TruncationStats,
    comparisons_to_pairs,
    positions_from_mask,
    render_prompt,
    tokenize_comparisons,
    tokenize_demonstrations,
    tokenize_pretrain,
    tokenize_prompts,
)

__all__ = [
    "BUILDERS",
    "DEFAULT_MAX_K",
    "FORMATS",
    "BatchIterator",
    "DataError",
    "JsonlBuilderConfig",
    "RlhfComparisonsJsonl",
    "RlhfDemonstrationsJsonl",
    "RlhfPretrainJsonl",
    "RlhfPromptsJsonl",
    "TruncationStats",
    "build_tfds_from_jsonl",
    "comparisons_to_pairs",
    "load_tfds",
    "make_global_batch",
    "positions_from_mask",
    "read_jsonl",
    "render_messages_plain",
    "render_prompt",
    "tokenize_comparisons",
    "tokenize_demonstrations",
    "tokenize_pretrain",
    "tokenize_prompts",
    "validate_row",
    "validate_rows",
    "write_jsonl",
]
