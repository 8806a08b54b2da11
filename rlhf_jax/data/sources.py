"""Where a stage's rows come from, named in the config by one string (a *source spec*):

* a JSONL file (``data/sft.jsonl``, any other name but those below; local or a URL);
* a Parquet file (``data/train.parquet``): each row is read as a JSONL line would be;
* ``tfds:<name>[/<config>]:<split>``: a prepared ArrayRecord TFDS dataset in ``data_dir``;
* ``hf:<dataset>[/<config>]:<split>``: a Hugging Face dataset from the local ``datasets``
  cache, e.g. ``hf:Anthropic/hh-rlhf:train``, ``hf:org/name/config:test[:100]`` (a dataset id
  is ``name`` or ``org/name``; a third component is the config). Nothing is downloaded at run
  time (``HF_DATASETS_OFFLINE=1`` whatever the environment says): a dataset that is not cached
  is a one-line error saying how to fetch it on a machine with network.

Every source goes through ``field_map`` (canonical field -> the source's field) and the same
row validation (:mod:`rlhf_jax.data.formats`), with ``assistant_marker`` splitting
Human/Assistant transcripts. :func:`source_options` reads these from a stage's data section.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from rlhf_jax import storage
from rlhf_jax.data.formats import (DEFAULT_ASSISTANT_MARKER, DEFAULT_MAX_K, DataError, read_jsonl,
                                   validate_rows)
from rlhf_jax.data.tfds_builders import load_tfds
from rlhf_jax.errors import ConfigError

DATASET_SPECS = "tfds:<name>[/<config>]:<split> or hf:<dataset>[/<config>]:<split>"
ACCEPTED_SOURCES = f"a JSONL file, a .parquet file, {DATASET_SPECS} (e.g. hf:Anthropic/hh-rlhf:train)"
# Files people have that are not rows we read: refused by name instead of failing as bad JSON.
_OTHER_FILES = (".csv", ".tsv", ".arrow", ".feather", ".xls", ".xlsx", ".zip", ".gz", ".bz2",
                ".xz", ".zst", ".tar", ".pkl", ".pickle")
_SCHEME = re.compile(r"^([A-Za-z][\w+.-]+):")
_NAME_AND_SPLIT = re.compile(r"^(.+):([\w.+-]+(?:\[[^\]]*\])?)$")


def source_kind(spec: str) -> str:
    """``"jsonl"``, ``"parquet"``, ``"tfds"`` or ``"hf"``; anything else is a ConfigError
    listing the accepted forms."""
    if spec.startswith("tfds:"):
        return "tfds"
    if spec.startswith("hf:"):
        return "hf"
    scheme = _SCHEME.match(spec)
    if scheme and not storage.is_url(spec) and not storage.exists(spec):
        raise ConfigError(f"data source {spec!r}: unknown prefix '{scheme.group(1)}:'; "
                          f"expected {ACCEPTED_SOURCES}")
    suffix = os.path.splitext(spec.rstrip("/"))[1].lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in _OTHER_FILES:
        raise ConfigError(f"data source {spec!r}: {suffix} files are not read; expected "
                          f"{ACCEPTED_SOURCES} (convert it to JSONL or Parquet)")
    return "jsonl"


def source_options(data: Any, *, mapped: bool = True) -> dict[str, Any]:
    """:func:`read_source`'s keyword arguments from a stage's ``data`` section
    (``tfds_data_dir``, ``field_map`` unless not ``mapped``, ``assistant_marker``)."""
    return {"data_dir": data.get("tfds_data_dir"),
            "field_map": dict(data.get("field_map") or {}) if mapped else None,
            "assistant_marker": data.get("assistant_marker") or DEFAULT_ASSISTANT_MARKER}


def read_source(spec: str, fmt: str, *, data_dir: str | None = None,
                field_map: Mapping[str, str] | None = None, max_k: int = DEFAULT_MAX_K,
                assistant_marker: str = DEFAULT_ASSISTANT_MARKER) -> list[dict[str, Any]]:
    """Validated canonical rows of ``fmt`` from ``spec`` (see module docstring)."""
    kind = source_kind(spec)
    field_map = dict(field_map or {}) or None
    options = {"max_k": max_k, "assistant_marker": assistant_marker, "field_map": field_map}
    if kind == "jsonl":
        return read_jsonl(spec, fmt, **options)
    if kind == "parquet":
        return validate_rows(_parquet_rows(spec), fmt, source=spec, unit="row", **options)
    if kind == "tfds":
        name, split = _name_and_split(spec, "tfds")
        if not name:
            raise ConfigError(f"data source {spec!r}: expected tfds:<name>[/<config>]:<split> "
                              "(e.g. tfds:rlhf_prompts_jsonl/mine:train)")
        return load_tfds(name, split, data_dir=data_dir, fmt=fmt, **options)
    name, config, split = _hub_spec(spec)
    return validate_rows(_hub_rows(spec, name, config, split), fmt, source=f"hf:{name}[{split}]",
                         unit="example", **options)


def _hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``(dataset id, config or None, split)`` of an ``hf:`` spec. A dataset id may have a
    namespace (``org/name``), so only a third component is the config."""
    name, split = _name_and_split(spec, "hf")
    parts = name.split("/")
    if not all(parts) or len(parts) > 3:
        raise ConfigError(f"data source {spec!r}: expected hf:<dataset>[/<config>]:<split> "
                          "(e.g. hf:Anthropic/hh-rlhf:train or hf:org/name/config:test)")
    if len(parts) == 3:
        return "/".join(parts[:2]), parts[2], split
    return name, None, split


def _name_and_split(spec: str, kind: str) -> tuple[str, str]:
    """``spec`` = ``<kind>:<name>:<split>``; the split may be sliced (``train[:10%]``)."""
    match = _NAME_AND_SPLIT.match(spec[len(kind) + 1:])
    return (match.group(1), match.group(2)) if match else ("", "")


def _parquet_rows(path: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        with storage.open(path, "rb") as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(path, None, None, None,
                        f"a Parquet file ({' '.join(str(e).split())})", show_value=False) from e
    return table.to_pylist()


def _hub_rows(spec: str, name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """The rows of a dataset in the local ``datasets`` cache, read with the Hub unreachable."""
    import datasets
    with _offline(datasets):
        try:
            dataset = datasets.load_dataset(name, config, split=split,
                                            download_mode="reuse_cache_if_exists")
        except ConnectionError:
            shown = name if config is None else f"{name}', '{config}"
            raise ConfigError(
                f"data source {spec!r}: '{name}' is not in the local Hugging Face datasets cache "
                f"({datasets.config.HF_DATASETS_CACHE}) and nothing is downloaded at run time; on a "
                f"machine with network run python -c \"import datasets; datasets.load_dataset("
                f"'{shown}', split='{split}')\" with the same HF_HOME, or set HF_HOME to a cache "
                "that holds it") from None
        except (ValueError, FileNotFoundError, KeyError) as e:   # a config or split not cached
            raise ConfigError(f"data source {spec!r}: cannot read it from the local Hugging Face "
                              f"datasets cache ({datasets.config.HF_DATASETS_CACHE}): "
                              f"{' '.join(str(e).split())}") from None
    return dataset.to_list()


@contextlib.contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """``datasets`` as under ``HF_DATASETS_OFFLINE=1`` (read at its import, so set here), and
    without its 'using the cached version' warning, which is the point rather than news."""
    config = datasets.config
    saved = config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE
    verbosity = datasets.logging.get_verbosity()
    config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE = saved
        datasets.logging.set_verbosity(verbosity)
