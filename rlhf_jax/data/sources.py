"""Where a stage's rows come from: a local JSONL file, or a TFDS dataset, named in the config.

A source spec is either a path (``data/sft.jsonl``) or ``tfds:<name>[/<config>]:<split>``; TFDS
sources take ``data_dir`` and a ``field_map`` (canonical field -> dataset field) from the config.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlhf_jax.data.formats import DEFAULT_MAX_K, read_jsonl
from rlhf_jax.data.tfds_builders import load_tfds


def read_source(spec: str, fmt: str, *, data_dir: str | None = None,
                field_map: Mapping[str, str] | None = None,
                max_k: int = DEFAULT_MAX_K) -> list[dict[str, Any]]:
    """Validated canonical rows of ``fmt`` from ``spec`` (see module docstring)."""
    if spec.startswith("tfds:"):
        body = spec[len("tfds:"):]
        name, sep, split = body.rpartition(":")
        if not sep or not name:
            raise ValueError(f"TFDS source {spec!r}: expected 'tfds:<name>:<split>'")
        return load_tfds(name, split, data_dir=data_dir, field_map=dict(field_map or {}) or None,
                         fmt=fmt, max_k=max_k)
    return read_jsonl(spec, fmt, max_k=max_k)
