"""TFDS datasets built from JSONL into ArrayRecord -- no TensorFlow needed.

One ``GeneratorBasedBuilder`` per format. The JSONL splits to read are passed in
a :class:`JsonlBuilderConfig`, whose name becomes the dataset's config, so data
lands in ``<data_dir>/<builder name>/<config name>/<version>/`` and can be
reloaded later by ``"<builder name>/<config name>"`` (TFDS reads the prepared
files back even in a process that never imported this module).

ArrayRecord supports random access through ``builder.as_data_source(split)``,
which decodes examples with numpy only; TFRecord would need TensorFlow.

Fields that are not part of a format's features (e.g. a ``"meta"`` dict for a
synthetic labeler) are stored as one JSON string, ``extra_json``, and restored
on load. Extra keys inside individual chat messages are not kept.

Build on one process only (e.g. process 0) and let the others wait; TFDS writes
to a temporary directory and renames it, so readers never see partial data.

JSONL files and ``data_dir`` may be URLs (``gs://...``). TFDS and ArrayRecord read a
prepared dataset from an object store directly, but ArrayRecord writes only local files:
a dataset for a URL ``data_dir`` is prepared locally and uploaded.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import inspect
import json
import os
import re
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rlhf_jax import storage
from rlhf_jax.data.formats import (DEFAULT_ASSISTANT_MARKER, DEFAULT_MAX_K, check_format, map_fields,
                                   read_jsonl, validate_rows)

_EXTRA_FIELD = "extra_json"
_FINGERPRINT_KEY = "source_fingerprint"
_CONFIG_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]+$")
_SPLIT_NAME_PATTERN = re.compile(r"^\w+$")


@dataclasses.dataclass(eq=False)
class JsonlBuilderConfig(tfds.core.BuilderConfig):
    """Which JSONL file feeds which split.

    Attributes:
        jsonl_paths: split name -> JSONL path.
        max_k: largest K accepted for comparisons.
        fingerprint: hash of the format, max_k and file contents; stored with the
            prepared data so a rebuild from changed files is detected.
    """

    jsonl_paths: dict[str, str] = dataclasses.field(default_factory=dict)
    max_k: int = DEFAULT_MAX_K
    fingerprint: str = ""


def _text() -> tfds.features.Text:
    return tfds.features.Text()


def _messages_feature() -> tfds.features.Sequence:
    return tfds.features.Sequence({"role": _text(), "content": _text()})


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: read a validated JSONL per split, keep row order."""

    FORMAT: str = ""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial format."}

    @abc.abstractmethod
    def _features(self) -> dict[str, Any]:
        """Feature name -> TFDS feature of one example of ``FORMAT``."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This module's path. TFDS's default probes the optional ``importlib_resources``
        package for builders defined inside a package and fails where it is missing."""
        return epath.Path(inspect.getfile(cls))

    def _core_fields(self) -> tuple[str, ...]:
        return tuple(name for name in self._features() if name != _EXTRA_FIELD)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"rlhf_jax '{self.FORMAT}' rows built from JSONL.",
            features=tfds.features.FeaturesDict(self._features()),
            # Keep file order: shuffling is the BatchIterator's job, seeded and resumable.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict({_FINGERPRINT_KEY: config.fingerprint if config else ""}),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        config = self.builder_config
        if config is None or not config.jsonl_paths:
            raise ValueError(f"{self.name}: build it with build_tfds_from_jsonl (no JSONL paths were given)")
        return {split: self._generate_examples(path) for split, path in config.jsonl_paths.items()}

    def _generate_examples(self, path: str):
        for i, row in enumerate(read_jsonl(path, self.FORMAT, max_k=self.builder_config.max_k)):
            yield i, self._encode_row(row)

    def _encode_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        example = {}
        for field in self._core_fields():
            if field == "prompt_messages":
                messages = row.get(field) or []
                example[field] = {
                    "role": [m["role"] for m in messages],
                    "content": [m["content"] for m in messages],
                }
            else:
                example[field] = row[field]
        extras = {k: v for k, v in row.items() if k not in example}
        example[_EXTRA_FIELD] = json.dumps(extras, ensure_ascii=False)
        return example


class RlhfPretrainJsonl(_JsonlBuilder):
    """``{"text"}`` rows for the pretraining (ptx) mix."""

    FORMAT = "pretrain"
    VERSION = tfds.core.Version("1.0.0")

    def _features(self) -> dict[str, Any]:
        return {"text": _text(), _EXTRA_FIELD: _text()}


class RlhfDemonstrationsJsonl(_JsonlBuilder):
    """``{"prompt", "completion", "prompt_messages"}`` rows for SFT."""

    FORMAT = "demonstrations"
    VERSION = tfds.core.Version("1.0.0")

    def _features(self) -> dict[str, Any]:
        return {
            "prompt": _text(),
            "completion": _text(),
            "prompt_messages": _messages_feature(),
            _EXTRA_FIELD: _text(),
        }


class RlhfComparisonsJsonl(_JsonlBuilder):
    """``{"prompt", "completions": [K], "ranking": [K]}`` rows for the reward model."""

    FORMAT = "comparisons"
    VERSION = tfds.core.Version("1.0.0")

    def _features(self) -> dict[str, Any]:
        return {
            "prompt": _text(),
            "completions": tfds.features.Sequence(_text()),
            "ranking": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32)),
            _EXTRA_FIELD: _text(),
        }


class RlhfPromptsJsonl(_JsonlBuilder):
    """``{"prompt", "prompt_messages"}`` rows for PPO."""

    FORMAT = "prompts"
    VERSION = tfds.core.Version("1.0.0")

    def _features(self) -> dict[str, Any]:
        return {"prompt": _text(), "prompt_messages": _messages_feature(), _EXTRA_FIELD: _text()}


BUILDERS: dict[str, type[_JsonlBuilder]] = {
    "pretrain": RlhfPretrainJsonl,
    "demonstrations": RlhfDemonstrationsJsonl,
    "comparisons": RlhfComparisonsJsonl,
    "prompts": RlhfPromptsJsonl,
}
_FORMAT_BY_BUILDER_NAME = {cls.name: fmt for fmt, cls in BUILDERS.items()}


def _fingerprint(fmt: str, max_k: int, jsonl_paths: Mapping[str, str]) -> str:
    digest = hashlib.sha256(f"{fmt}|{max_k}".encode())
    for split in sorted(jsonl_paths):
        digest.update(f"|{split}|".encode())
        with storage.open(jsonl_paths[split], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _stored_fingerprint(builder: tfds.core.DatasetBuilder) -> str | None:
    path = storage.join(os.fspath(builder.data_dir), "metadata.json")
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path)).get(_FINGERPRINT_KEY)


def build_tfds_from_jsonl(
    fmt: str,
    jsonl_paths: Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    name: str | None = None,
    *,
    max_k: int = DEFAULT_MAX_K,
    overwrite: bool = False,
) -> tfds.core.DatasetBuilder:
    """Validate JSONL files and prepare them as an ArrayRecord TFDS dataset.

    Args:
        fmt: one of ``pretrain``, ``demonstrations``, ``comparisons``, ``prompts``.
        jsonl_paths: split name (e.g. ``"train"``) -> JSONL path.
        data_dir: TFDS data directory to write into (a URL: prepared locally, then uploaded).
        name: config name (letters, digits, ``_``); defaults to ``"default"``.
            The dataset then loads as ``"<builder name>/<name>"``.
        max_k: largest K accepted for comparisons.
        overwrite: rebuild when data prepared under this name came from
            different files; without it such a mismatch is an error.
    Returns:
        The prepared builder (pass it, or its ``"<builder.name>/<name>"``, to :func:`load_tfds`).
    """
    check_format(fmt)
    config_name = name or "default"
    if not _CONFIG_NAME_PATTERN.match(config_name):
        raise ValueError(f"dataset name {config_name!r} must use only letters, digits and '_'")
    if not jsonl_paths:
        raise ValueError("jsonl_paths is empty; expected {split: path}, e.g. {'train': 'train.jsonl'}")
    paths = {}
    for split, path in jsonl_paths.items():
        if not _SPLIT_NAME_PATTERN.match(split):
            raise ValueError(f"split name {split!r} must use only letters, digits and '_'")
        path = storage.absolute(path)
        if not storage.isfile(path):
            raise FileNotFoundError(f"JSONL file for split '{split}' does not exist: {path}")
        paths[split] = path
    config = JsonlBuilderConfig(
        name=config_name,
        description=f"{fmt} rows from {sorted(paths.items())}",
        jsonl_paths=paths,
        max_k=max_k,
        fingerprint=_fingerprint(fmt, max_k, paths),
    )
    make = lambda root: BUILDERS[fmt](data_dir=root, config=config, file_format="array_record")
    builder = make(os.fspath(data_dir))
    download_config = None
    if builder.is_prepared():
        stored = _stored_fingerprint(builder)
        if stored == config.fingerprint:
            return builder
        if not overwrite:
            raise ValueError(
                f"{builder.data_dir} already holds '{builder.name}/{config_name}' built from other files "
                f"(fingerprint {stored!r} != {config.fingerprint!r}); pass overwrite=True or choose another name"
            )
        download_config = tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD)
    # Validate every file before TFDS writes anything, so errors name the JSONL line.
    for path in paths.values():
        read_jsonl(path, fmt, max_k=max_k)
    with storage.writable_local(os.fspath(data_dir)) as local_dir:
        make(local_dir).download_and_prepare(download_config=download_config)
    # A builder made before the data existed has no splits to read.
    return make(os.fspath(data_dir))


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _to_python(value: Any) -> Any:
    """Decoded TFDS example -> plain Python: bytes -> str, numpy -> int/float/list."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()] if value.ndim else _to_python(value.item())
    if isinstance(value, np.generic):
        return _to_python(value.item())
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value


def _from_jsonl_builder_example(example: dict[str, Any]) -> dict[str, Any]:
    """Undo :meth:`_JsonlBuilder._encode_row`: restore extras and message lists."""
    row = dict(example)
    extras = json.loads(row.pop(_EXTRA_FIELD, "") or "{}")
    messages = row.pop("prompt_messages", None)
    if messages and messages["role"]:
        row["prompt_messages"] = [
            {"role": role, "content": content} for role, content in zip(messages["role"], messages["content"])
        ]
    return {**row, **extras}


def _resolve_builder(
    name_or_builder: str | tfds.core.DatasetBuilder, data_dir: str | None
) -> tfds.core.DatasetBuilder:
    """A builder object, a prepared version directory, or a (registered or prepared) dataset name."""
    if isinstance(name_or_builder, tfds.core.DatasetBuilder):
        return name_or_builder
    if storage.isdir(name_or_builder) and storage.exists(
        storage.join(name_or_builder, "dataset_info.json")
    ):
        return tfds.builder_from_directory(os.fspath(name_or_builder))
    return tfds.builder(name_or_builder, data_dir=None if data_dir is None else os.fspath(data_dir))


def load_tfds(
    name_or_builder: str | tfds.core.DatasetBuilder,
    split: str,
    data_dir: str | os.PathLike | None = None,
    field_map: Mapping[str, str] | None = None,
    *,
    fmt: str | None = None,
    max_k: int = DEFAULT_MAX_K,
    assistant_marker: str = DEFAULT_ASSISTANT_MARKER,
) -> list[dict[str, Any]]:
    """Read one split of a prepared ArrayRecord TFDS dataset as canonical rows.

    Args:
        name_or_builder: a builder (e.g. from :func:`build_tfds_from_jsonl`), a
            dataset name such as ``"rlhf_comparisons_jsonl/my_set"`` or any
            registered TFDS dataset name, or a prepared dataset's version directory.
        split: split name (TFDS slicing like ``"train[:10%]"`` is accepted).
        data_dir: TFDS data directory holding the prepared dataset.
        field_map: canonical field -> source field, e.g. ``{"prompt": "question"}``;
            nested features use dots (``"answers.text"``). Renamed top-level source
            fields are removed; every other field is kept as an extra.
        fmt: format to validate rows against. Inferred for datasets built by
            :func:`build_tfds_from_jsonl`; when neither given nor inferable the
            decoded (and mapped) rows are returned unvalidated.
        max_k: largest K accepted when validating comparisons.
        assistant_marker: where the reply of a Human/Assistant transcript starts
            (implicit-prompt comparisons; see ``rlhf_jax.data.formats``).
    Returns:
        One dict per example, text decoded to ``str``, numbers as Python ints/floats.
    Raises:
        ValueError: the dataset is not prepared locally (nothing is ever downloaded)
            or was not prepared with ``file_format='array_record'``.
        DataError: a row does not match ``fmt``, or lacks a field ``field_map`` names.
    """
    builder = _resolve_builder(name_or_builder, None if data_dir is None else os.fspath(data_dir))
    if not builder.is_prepared():
        raise ValueError(
            f"TFDS dataset '{builder.name}' is not prepared in {builder.data_dir}; nothing is downloaded at run "
            "time -- prepare it first (build_tfds_from_jsonl, or `tfds build --file_format=array_record`)"
        )
    try:
        source = builder.as_data_source(split)
    except (NotImplementedError, ValueError) as e:
        raise ValueError(
            f"cannot open split {split!r} of '{builder.name}' in {builder.data_dir} as a random-access data "
            f"source ({e}); it must exist and be prepared with file_format='array_record'"
        ) from e
    examples = [_to_python(ex) for ex in source.__getitems__(range(len(source)))]
    inferred_fmt = _FORMAT_BY_BUILDER_NAME.get(builder.name)
    if inferred_fmt is not None:
        examples = [_from_jsonl_builder_example(ex) for ex in examples]
    where = f"tfds:{builder.name}[{split}]"
    fmt = fmt or inferred_fmt
    if fmt is None:
        return map_fields(examples, field_map, source=where)
    return validate_rows(examples, fmt, source=where, unit="example", max_k=max_k,
                         assistant_marker=assistant_marker, field_map=field_map)
