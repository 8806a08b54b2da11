"""Experiment configs: ml_collections ConfigDicts from ``experiments/*.py`` plus dotted overrides.

An experiment file defines ``get_config(arg: str | None = None) -> ConfigDict``; the CLI takes
``--config experiments/file.py[:arg]`` and any number of ``--config.a.b=value`` overrides, the
convention of JAX research codebases (big_vision, Flax examples).
"""
from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from rlhf_jax.models.config import TransformerConfig, gpt2_config, llama_config, qwen2_config


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load ``path.py`` or ``path.py:arg`` and call its ``get_config``."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(
        f"rlhf_jax_experiment_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path!r} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _parse_value(text: str, current: Any, key: str) -> Any:
    """Interpret ``text`` with the type of the value it replaces (as ml_collections does)."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(f"--config.{key}={text!r}: expected a boolean (true/false)")
        return lowered in ("true", "1")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"--config.{key}={text!r}: expected a {type(current).__name__} "
                         f"(current value {current!r})") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if current is not None and not isinstance(value, type(current)) and not (
            isinstance(current, (tuple, list)) and isinstance(value, (tuple, list))):
        raise ValueError(f"--config.{key}={text!r}: expected a {type(current).__name__} "
                         f"(current value {current!r})")
    if isinstance(current, tuple):
        value = tuple(value)
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``a.b=value`` strings (without the ``--config.`` prefix) in order."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected --config.key=value")
        *parents, leaf = key.split(".")
        node = cfg
        for i, name in enumerate(parents):
            if name not in node:
                raise KeyError(f"--config.{key}: no field {'.'.join(parents[:i + 1])!r} in the config")
            node = node[name]
        if leaf not in node:
            raise KeyError(f"--config.{key}: no field {key!r} in the config "
                           f"(fields here: {sorted(node.keys())})")
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[leaf] = _parse_value(text, node[leaf], key)
    return cfg


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def model_config_from(model_cfg: ml_collections.ConfigDict | dict, tokenizer: Any = None,
                      **overrides: Any) -> TransformerConfig:
    """A TransformerConfig from a config section (``arch`` plus sizes), filling token ids and
    the vocabulary size from the tokenizer when given."""
    fields = dict(model_cfg)
    arch = fields.pop("arch", "gpt2")
    if tokenizer is not None:
        fields.setdefault("vocab_size", len(tokenizer))
        fields.setdefault("pad_token_id", tokenizer.pad_token_id)
        fields.setdefault("eos_token_id", tokenizer.eos_token_id)
        fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    fields.update(overrides)
    maker = {"gpt2": gpt2_config, "llama": llama_config, "qwen2": qwen2_config}.get(arch)
    if maker is None:
        raise ValueError(f"model.arch={arch!r}; expected gpt2, llama or qwen2")
    return maker(**fields)


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """A JSON-able dict (stored beside checkpoints so a run can be audited or resumed)."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
