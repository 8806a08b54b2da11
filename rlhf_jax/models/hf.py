"""Hugging Face interop: ``config.json`` + safetensors <-> our parameter trees.

Nothing is downloaded from the Hub, and nothing is unpickled (no ``torch.load``). A checkpoint
directory may be local or a URL (``gs://``, read from a local copy; see
:func:`rlhf_jax.storage.local_copy`). Supported
architectures: GPT-2 (``GPT2LMHeadModel``), Llama (``LlamaForCausalLM``), Qwen2
(``Qwen2ForCausalLM``), with plain RoPE or Llama 3.1 / 3.2's ``"llama3"`` RoPE scaling (read
from ``rope_parameters`` or the older ``rope_scaling``, written back as ``rope_parameters``).
Every tensor is checked against the shape ``config.json`` implies, and a mismatch names the file,
the tensor, the shape found and the shape expected. These checks read the safetensors headers
alone (:func:`check_pretrained`, run by validation), and they also refuse a truncated file and
the files of two saves in one directory: an index whose ``weight_map`` and files disagree, or
un-indexed files that hold the same tensor.

Reward and value models (``head="scalar"``) travel as ``GPT2ForSequenceClassification`` /
``LlamaForSequenceClassification`` / ``Qwen2ForSequenceClassification`` with ``num_labels=1``.
Loading one gives a scalar-head model: ``score.weight [1, D]`` is the score kernel and the bias
is 0 (transformers' ``score`` Linear has none) plus ``rlhf_jax_score_offset`` from config.json
when present. Exporting one writes the *normalized* score ``((w.h + b) - mean) / std`` (the
``reward_norm`` stored with our reward models), so transformers ranks and scores exactly like
PPO and evaluation do here:

* 1/std is folded into ``score.weight``.
* The constant ``c = (b - mean) / std`` has no home in a bias-free ``score``. GPT-2's final
  LayerNorm has a bias that only the score reads in a sequence-classification model, so ``c`` is
  folded into it exactly (``ln_f.bias += c w / |w|^2``). Llama / Qwen2's RMSNorm has no bias:
  there ``c`` is written to config.json as ``rlhf_jax_score_offset``. Our loader adds it back
  (the round trip is exact), but transformers ignores it: its raw logits are ours minus ``c``,
  a constant shift that leaves rankings and pairwise preferences unchanged.
* ``pad_token_id`` is set (the model's pad id, else its eos id), since transformers pools each
  row at its rightmost token that is not the pad id and refuses batches without one. When pad
  and eos share an id, a sequence that *ends* in eos is therefore scored by transformers one
  token earlier than here (we read the last attended token).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import storage
from rlhf_jax.errors import UserError
from rlhf_jax.models.config import TransformerConfig, gpt2_config, llama_config, qwen2_config
from rlhf_jax.models.params import (param_shardings, stack_layers, unstack_layers)
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sharding import DEFAULT_RULES, LogicalRules, as_auto_mesh

log = logging.getLogger(__name__)

SUPPORTED = {"GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2", "LlamaForCausalLM": "llama",
             "Qwen2ForCausalLM": "qwen2"}
# Sequence-classification variants hold reward / value models (head="scalar").
SEQ_CLS = {"GPT2ForSequenceClassification": "gpt2", "LlamaForSequenceClassification": "llama",
           "Qwen2ForSequenceClassification": "qwen2"}
SCORE_OFFSET_KEY = "rlhf_jax_score_offset"


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint directory that does not match what its config.json describes."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model named by a Hub id (``gpt2``, ``org/name``) that the local cache does not hold."""


# What the Hub accepts as a model id: ``name`` or ``org/name``. Anything else is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve_model_path(path: str) -> str:
    """``path`` itself when it exists (or is a URL, or cannot be a Hub id); else a Hub model id
    (``gpt2``, ``Qwen/Qwen2.5-0.5B``) resolved to its snapshot directory in the local Hugging
    Face cache (``HF_HOME`` / ``HF_HUB_CACHE``). Nothing is downloaded: an id the cache does
    not hold is a :class:`ModelNotFoundError` saying how to download it. Every loader of a
    model or tokenizer directory runs its argument through here."""
    text = os.fspath(path)
    if (not text or storage.is_url(text) or os.path.exists(os.path.expanduser(text))
            or not _HUB_ID.match(text)):
        return text
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        return snapshot_download(text, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError) as e:
        # Its subclass (an incomplete snapshot) says what the cached copy lacks.
        incomplete = "" if type(e) in (LocalEntryNotFoundError, HFValidationError) else (
            f" ({' '.join(str(e).split())})")
        raise ModelNotFoundError(
            f"{text}: not a directory and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}){incomplete}; nothing is downloaded at run time: run "
            f"`hf download {text}` (or `huggingface-cli download {text}`) on a machine with "
            "network and the same HF_HOME, or give a model directory") from None


# --- config ----------------------------------------------------------------------------------

def _architecture(hf: dict[str, Any], path: str) -> str:
    names = hf.get("architectures") or []
    for name in names:
        if name in SUPPORTED:
            return SUPPORTED[name]
        if name in SEQ_CLS:
            return SEQ_CLS[name]
    model_type = hf.get("model_type")
    if not names and model_type in ("gpt2", "llama", "qwen2"):
        return model_type
    raise CheckpointFormatError(f"{path}: unsupported architecture {names or model_type!r}; "
                                f"supported: {sorted(SUPPORTED) + sorted(SEQ_CLS)}")


def is_sequence_classifier(hf: dict[str, Any]) -> bool:
    """Whether a transformers config describes a ``*ForSequenceClassification`` checkpoint."""
    return any(name in SEQ_CLS for name in hf.get("architectures") or [])


def _check_num_labels(hf: dict[str, Any], path: str) -> None:
    if hf.get("num_labels") is not None:
        n = hf["num_labels"]
    elif hf.get("id2label"):
        n = len(hf["id2label"])
    else:
        n = 2   # what transformers assumes when config.json names no labels
    if n != 1:
        raise CheckpointFormatError(f"{path}: num_labels={n}; expected num_labels == 1 "
                                    "(a scalar reward head)")


_LLAMA3_ROPE_KEYS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                     "high_freq_factor": "rope_high_freq_factor",
                     "original_max_position_embeddings": "rope_original_max_position"}


def _rope_fields(hf: dict[str, Any], path: str) -> dict[str, Any]:
    """rope_theta and the RoPE scaling fields of TransformerConfig from a transformers config.

    Reads transformers 5's ``rope_parameters`` (theta inside) and the older ``rope_scaling``
    (+ top-level ``rope_theta``). Supported rope types: 'default' and 'llama3' (Llama 3.1 / 3.2).
    """
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3", None):
        raise CheckpointFormatError(
            f"{path}: rope_type {rope_type!r} is not supported (supported: 'default', 'llama3')")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CheckpointFormatError(
            f"{path}: partial_rotary_factor={partial!r} is not supported (RoPE on the full head only)")
    fields: dict[str, Any] = {
        "rope_theta": float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)}
    if rope_type == "llama3":
        missing = [key for key in _LLAMA3_ROPE_KEYS if rope.get(key) is None]
        if missing:
            raise CheckpointFormatError(
                f"{path}: rope_type 'llama3' needs {', '.join(missing)} in rope_parameters")
        fields["rope_scaling"] = "llama3"
        for theirs, ours in _LLAMA3_ROPE_KEYS.items():
            value = rope[theirs]
            fields[ours] = int(value) if ours == "rope_original_max_position" else float(value)
    return fields


def _rope_parameters(cfg: TransformerConfig) -> dict[str, Any]:
    """transformers' ``rope_parameters`` for our config (inverse of ``_rope_fields``)."""
    params: dict[str, Any] = {"rope_type": cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        params.update({theirs: getattr(cfg, ours) for theirs, ours in _LLAMA3_ROPE_KEYS.items()})
    return params


def config_from_hf(hf: dict[str, Any], path: str = "config.json", **overrides: Any) -> TransformerConfig:
    """Our TransformerConfig from a transformers config dict (head="scalar" for a
    ``*ForSequenceClassification`` config, unless ``overrides`` say otherwise)."""
    arch = _architecture(hf, path)
    if is_sequence_classifier(hf):
        _check_num_labels(hf, path)
        overrides = {"head": "scalar", **overrides}
    ids = dict(pad_token_id=hf.get("pad_token_id"), bos_token_id=hf.get("bos_token_id"),
               eos_token_id=_first(hf.get("eos_token_id")))
    if arch == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointFormatError(
                f"{path}: activation_function {act!r} unsupported; expected 'gelu_new'")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise CheckpointFormatError(f"{path}: scale_attn_by_inverse_layer_idx / "
                                        "reorder_and_upcast_attn are not supported")
        d = _size(hf, "n_embd", path)
        cfg = dict(vocab_size=_size(hf, "vocab_size", path), d_model=d,
                   n_layers=_size(hf, "n_layer", path), n_heads=_size(hf, "n_head", path),
                   d_ff=_size(hf, "n_inner", path, 4 * d),
                   max_position=_size(hf, "n_positions", path, 1024),
                   norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                   tie_embeddings=hf.get("tie_word_embeddings", True), **ids)
        cfg.update(overrides)
        return _made(gpt2_config, cfg, path)
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointFormatError(f"{path}: hidden_act {hf.get('hidden_act')!r} unsupported; expected 'silu'")
    if hf.get("use_sliding_window"):
        raise CheckpointFormatError(f"{path}: sliding-window attention is not supported")
    cfg = dict(vocab_size=_size(hf, "vocab_size", path), d_model=_size(hf, "hidden_size", path),
               n_layers=_size(hf, "num_hidden_layers", path),
               n_heads=_size(hf, "num_attention_heads", path),
               n_kv_heads=_size(hf, "num_key_value_heads", path, None),
               head_dim=_size(hf, "head_dim", path, None),
               d_ff=_size(hf, "intermediate_size", path),
               max_position=_size(hf, "max_position_embeddings", path, 2048),
               norm_eps=hf.get("rms_norm_eps", 1e-6),
               tie_embeddings=hf.get("tie_word_embeddings", False), **_rope_fields(hf, path), **ids)
    if arch == "llama":
        attn_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
        if attn_bias != mlp_bias:
            raise CheckpointFormatError(
                f"{path}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                "(both must match)")
        cfg.update(qkv_bias=attn_bias, out_bias=attn_bias)
        cfg.update(overrides)
        return _made(llama_config, cfg, path)
    cfg.update(overrides)
    return _made(qwen2_config, cfg, path)


_REQUIRED = object()


def _size(hf: dict[str, Any], key: str, path: str, default: Any = _REQUIRED) -> Any:
    """A size field of a transformers config: a positive integer, or ``default`` when the
    field is absent (null counts as absent)."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise CheckpointFormatError(f"{path}: missing {key!r}; expected a positive integer "
                                        "(the file is incomplete or not a model's config.json)")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointFormatError(f"{path}: {key}={value!r}: expected a positive integer")
    return value


def _made(maker: Any, fields: dict[str, Any], path: str) -> TransformerConfig:
    try:
        return maker(**fields)
    except ValueError as e:     # sizes that do not fit together, e.g. heads not dividing width
        raise CheckpointFormatError(f"{path}: {' '.join(str(e).split())}") from e


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) and x else x


def config_to_hf(cfg: TransformerConfig):
    """A transformers config object for our config: the causal LM for head="lm", the
    ``*ForSequenceClassification`` (num_labels=1) for head="scalar"."""
    import transformers
    scalar = cfg.head == "scalar"
    pad_token_id = cfg.pad_token_id
    if scalar and pad_token_id is None:
        pad_token_id = cfg.eos_token_id
        if pad_token_id is None:
            log.warning("exporting a scalar-head model with neither pad_token_id nor eos_token_id: "
                        "transformers will only score batches of one sequence")
    ids = dict(pad_token_id=pad_token_id, bos_token_id=cfg.bos_token_id,
               eos_token_id=cfg.eos_token_id)
    if scalar:
        ids["num_labels"] = 1
    name = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2"}[cfg.arch]
    architecture = f"{name}ForSequenceClassification" if scalar else None
    if cfg.arch == "gpt2":
        if not cfg.tie_embeddings and not scalar:
            raise ValueError("GPT-2 export needs tie_embeddings=True (transformers ties GPT-2's head)")
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_position, n_embd=cfg.d_model,
            n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
            activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings,
            architectures=[architecture or "GPT2LMHeadModel"], **ids)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.kv_heads, head_dim=cfg.dims_per_head,
                  max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps,
                  rope_parameters=_rope_parameters(cfg),
                  tie_word_embeddings=cfg.tie_embeddings, **ids)
    if cfg.arch == "qwen2":
        return transformers.Qwen2Config(architectures=[architecture or "Qwen2ForCausalLM"],
                                        **common)
    return transformers.LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=cfg.out_bias,
                                    architectures=[architecture or "LlamaForCausalLM"], **common)


# --- tensor name maps --------------------------------------------------------------------------
# Each entry: (our path, HF name, to_ours(hf_array) -> array, to_hf(our_array) -> array, hf_shape).

def _score_entry(cfg: TransformerConfig) -> tuple:
    # Top-level in every *ForSequenceClassification (no transformer. / model. prefix).
    return ("score_head/kernel", "score.weight", _t, _t, (1, cfg.d_model))


def _gpt2_entries(cfg: TransformerConfig) -> Iterator[tuple]:
    d, h, dh, f = cfg.d_model, cfg.n_heads, cfg.dims_per_head, cfg.d_ff
    yield ("embed/embedding", "wte.weight", _same, _same, (cfg.vocab_size, d))
    yield ("pos_embed/embedding", "wpe.weight", _same, _same, (cfg.max_position, d))
    for i in range(cfg.n_layers):
        p, hp = f"layer_{i}", f"h.{i}"
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            yield (f"{p}/{ours}/scale", f"{hp}.{theirs}.weight", _same, _same, (d,))
            yield (f"{p}/{ours}/bias", f"{hp}.{theirs}.bias", _same, _same, (d,))
        # c_attn is a Conv1D: weight [in, out] with out = [q | k | v].
        for j, name in enumerate("qkv"):
            yield (f"{p}/attn/{name}/kernel", f"{hp}.attn.c_attn.weight",
                   _slice_cols(j, d, (d, h, dh)), None, (d, 3 * d))
            yield (f"{p}/attn/{name}/bias", f"{hp}.attn.c_attn.bias",
                   _slice_cols(j, d, (h, dh)), None, (3 * d,))
        yield (f"{p}/attn/o/kernel", f"{hp}.attn.c_proj.weight", _reshape((h, dh, d)),
               _reshape((h * dh, d)), (d, d))
        yield (f"{p}/attn/o/bias", f"{hp}.attn.c_proj.bias", _same, _same, (d,))
        yield (f"{p}/mlp/fc_in/kernel", f"{hp}.mlp.c_fc.weight", _same, _same, (d, f))
        yield (f"{p}/mlp/fc_in/bias", f"{hp}.mlp.c_fc.bias", _same, _same, (f,))
        yield (f"{p}/mlp/fc_out/kernel", f"{hp}.mlp.c_proj.weight", _same, _same, (f, d))
        yield (f"{p}/mlp/fc_out/bias", f"{hp}.mlp.c_proj.bias", _same, _same, (d,))
    yield ("final_norm/scale", "ln_f.weight", _same, _same, (d,))
    yield ("final_norm/bias", "ln_f.bias", _same, _same, (d,))


def _llama_entries(cfg: TransformerConfig) -> Iterator[tuple]:
    d, h, kv, dh, f = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dims_per_head, cfg.d_ff
    yield ("embed/embedding", "model.embed_tokens.weight", _same, _same, (cfg.vocab_size, d))
    for i in range(cfg.n_layers):
        p, hp = f"layer_{i}", f"model.layers.{i}"
        yield (f"{p}/attn_norm/scale", f"{hp}.input_layernorm.weight", _same, _same, (d,))
        yield (f"{p}/mlp_norm/scale", f"{hp}.post_attention_layernorm.weight", _same, _same, (d,))
        for name, n in (("q", h), ("k", kv), ("v", kv)):
            # nn.Linear stores [out, in]; ours is [in, heads, head_dim].
            yield (f"{p}/attn/{name}/kernel", f"{hp}.self_attn.{name}_proj.weight",
                   _linear_in(( n, dh), d), _linear_out(d, n * dh), (n * dh, d))
            if cfg.qkv_bias:
                yield (f"{p}/attn/{name}/bias", f"{hp}.self_attn.{name}_proj.bias",
                       _reshape((n, dh)), _reshape((n * dh,)), (n * dh,))
        yield (f"{p}/attn/o/kernel", f"{hp}.self_attn.o_proj.weight",
               lambda w: w.T.reshape(h, dh, d), lambda w: w.reshape(h * dh, d).T, (d, h * dh))
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            yield (f"{p}/mlp/{name}/kernel", f"{hp}.mlp.{name}_proj.weight", _t, _t, shape)
        if cfg.out_bias:
            yield (f"{p}/attn/o/bias", f"{hp}.self_attn.o_proj.bias", _same, _same, (d,))
            for name, n in (("gate", f), ("up", f), ("down", d)):
                yield (f"{p}/mlp/{name}/bias", f"{hp}.mlp.{name}_proj.bias", _same, _same, (n,))
    yield ("final_norm/scale", "model.norm.weight", _same, _same, (d,))


def _same(x):
    return x


def _t(x):
    return x.T


def _reshape(shape):
    return lambda x: x.reshape(shape)


def _slice_cols(j, width, shape):
    return lambda x: x[..., j * width:(j + 1) * width].reshape(shape)


def _linear_in(shape, d):
    return lambda w: w.T.reshape(d, *shape)


def _linear_out(d, out):
    return lambda w: w.reshape(d, out).T


def _entries(cfg: TransformerConfig, score: bool = False) -> Iterator[tuple]:
    """The trunk, then the score head (``score``) or else Llama / Qwen2's untied LM head."""
    yield from _gpt2_entries(cfg) if cfg.arch == "gpt2" else _llama_entries(cfg)
    if score:
        yield _score_entry(cfg)
    elif cfg.arch != "gpt2" and not cfg.tie_embeddings:
        yield ("lm_head/kernel", "lm_head.weight", _t, _t, (cfg.vocab_size, cfg.d_model))


# --- safetensors reading -----------------------------------------------------------------------

INDEX_FILE = "model.safetensors.index.json"


def _read_header(path: str, name: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the header of safetensors file ``name`` in directory ``path``
    (local or a URL; only the header is read), checked against the file's size, which a
    truncated download or copy gives away."""
    file = storage.join(path, name)

    def damaged(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{file}: {what}; copy or download it again")

    with storage.open(file, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        prefix = f.read(8)
        if len(prefix) < 8:
            raise damaged(f"{size} bytes, too short for a safetensors file (truncated)")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise damaged(f"its header claims {length} bytes but the file has {size} "
                          "(truncated, or not a safetensors file)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise damaged("its header is not JSON (not a safetensors file)") from e
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object (not a safetensors file)")
    shapes, end = {}, 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            shapes[key] = tuple(int(d) for d in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise damaged(f"tensor {key!r} has no valid shape / data_offsets in the header") from e
    if 8 + length + end != size:
        state = "truncated" if 8 + length + end > size else "has bytes past its last tensor"
        raise damaged(f"{state}: its header describes {8 + length + end} bytes, the file has "
                      f"{size}")
    return shapes


def _weight_index(path: str) -> tuple[dict[str, str], dict[str, tuple[int, ...]], list[str]]:
    """``(tensor -> file, tensor -> shape, files)`` of the safetensors in directory ``path``,
    from their headers alone.

    Files from two saves in one directory (an export over an earlier one) must not be mixed:
    with ``model.safetensors.index.json`` its ``weight_map`` and the files must agree exactly,
    and without one no tensor may be in two files.
    """
    names = storage.listdir(path)
    files = [name for name in names if name.endswith(".safetensors")]
    if not files:
        bins = [name for name in names if name.endswith((".bin", ".pt"))]
        hint = (f" (found {', '.join(bins)}: pickled PyTorch files are never loaded; re-save "
                "with safe_serialization=True)") if bins else ""
        raise FileNotFoundError(f"{path}: no *.safetensors files{hint}")
    shapes_by_file = {name: _read_header(path, name) for name in files}
    where: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    mixed = ("; the directory mixes files of different saves: delete it and export or "
             "download the model again")
    if INDEX_FILE in names:
        index_path = storage.join(path, INDEX_FILE)
        try:
            weight_map = json.loads(storage.read_text(index_path)).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointFormatError(f"{index_path}: not a JSON object with a weight_map "
                                        f"({' '.join(str(e).split())})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f"{index_path}: no weight_map object (tensor -> file)")
        listed = set(weight_map.values())
        if listed - set(files) or set(files) - listed:
            raise CheckpointFormatError(
                f"{path}: {INDEX_FILE} and the *.safetensors files disagree: it names "
                f"{sorted(listed)}, the directory holds {sorted(files)}{mixed}")
        for name, tensors in shapes_by_file.items():
            indexed = {key for key, file in weight_map.items() if file == name}
            if indexed != set(tensors):
                key = sorted(indexed ^ set(tensors))[0]
                where_key = "in" if key in tensors else "not in"
                raise CheckpointFormatError(
                    f"{path}: {INDEX_FILE} and {name} disagree: tensor {key!r} is {where_key} "
                    f"{name} but the index says {weight_map.get(key, 'nothing')!r}{mixed}")
    for name, tensors in shapes_by_file.items():
        for key, shape in tensors.items():
            if key in where:
                raise CheckpointFormatError(
                    f"{path}: tensor {key!r} is in both {where[key]} and {name} (several "
                    f"*.safetensors without {INDEX_FILE} must not overlap){mixed}")
            where[key], shapes[key] = name, shape
    return where, shapes, files


def _read_plan(path: str, cfg: TransformerConfig, score_head: bool) -> list[tuple]:
    """``(our path, file, tensor name, to_ours)`` for every parameter ``cfg`` needs, each found
    in directory ``path``'s safetensors with the shape config.json implies (headers only)."""
    where, shapes, files = _weight_index(path)
    prefixes = ("", "transformer.") if cfg.arch == "gpt2" else ("",)
    plan = []
    for ours, theirs, to_ours, _, hf_shape in _entries(cfg, score=score_head):
        key = next((prefix + theirs for prefix in prefixes if prefix + theirs in where), None)
        if key is None:
            raise CheckpointFormatError(
                f"{path}: tensor {theirs!r} (for {ours}) is missing from {', '.join(files)}")
        if shapes[key] != tuple(hf_shape):
            raise CheckpointFormatError(
                f"{where[key]}: tensor {key!r} has shape {shapes[key]}, but config.json implies "
                f"{tuple(hf_shape)}")
        plan.append((ours, where[key], key, to_ours))
    return plan


def _set_path(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get_path(tree: dict, path: str) -> Any:
    for p in path.split("/"):
        tree = tree[p]
    return tree


def load_params(path: str, cfg: TransformerConfig, shardings: Any = None,
                dtype: Any = jnp.float32, *, score_head: bool = False,
                score_offset: float = 0.0) -> dict:
    """Read the safetensors of local directory ``path`` into our (unstacked) tree, one tensor at
    a time, checking shapes.

    With ``shardings`` (a tree of NamedSharding for the unstacked layout) each tensor goes straight
    to its sharding, so the full model is never gathered on one device. ``score_head``: read a
    sequence classifier's ``score.weight`` (instead of any LM head) as the scalar head, with bias
    ``score_offset``.
    """
    from safetensors import SafetensorError, safe_open
    params: dict = {}
    if score_head:
        bias = jnp.full((1,), score_offset, dtype)
        if shardings is not None:
            bias = jax.device_put(bias, _get_path(shardings, "score_head/bias"))
        _set_path(params, "score_head/bias", bias)
    handles = {}
    for ours, file, key, to_ours in _read_plan(path, cfg, score_head):
        try:
            if file not in handles:
                handles[file] = safe_open(os.path.join(path, file), framework="flax")
            value = to_ours(handles[file].get_tensor(key)).astype(dtype)
        except SafetensorError as e:
            raise CheckpointFormatError(f"{os.path.join(path, file)}: unreadable ({e}); copy or "
                                        "download it again") from e
        if shardings is not None:
            value = jax.device_put(value, _get_path(shardings, ours))
        _set_path(params, ours, value)
    return params


def read_hf_config(path: str) -> dict[str, Any]:
    config_path = storage.join(path, "config.json")
    if not storage.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a checkpoint directory "
                                "with config.json and *.safetensors)")
    if not storage.exists(config_path):
        raise FileNotFoundError(f"{config_path}: missing; a checkpoint directory needs config.json "
                                "(transformers format) beside its *.safetensors files")
    try:
        hf = json.loads(storage.read_text(config_path))
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{config_path}:{e.lineno}: invalid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(f"{config_path}: not UTF-8 text ({e.reason} at byte "
                                    f"{e.start})") from e
    if not isinstance(hf, dict):
        raise CheckpointFormatError(f"{config_path}: expected a JSON object (a transformers "
                                    f"config), got {type(hf).__name__}")
    return hf


def check_pretrained(path: str) -> TransformerConfig:
    """The config of the transformers checkpoint directory ``path`` (local or a URL), after
    checking that its safetensors hold every tensor the config implies, with that shape, and
    no file of another save: headers only, no weights read (validation runs it before any
    model loads)."""
    source = storage.absolute(resolve_model_path(path))
    hf = read_hf_config(source)
    cfg = config_from_hf(hf, storage.join(source, "config.json"))
    _read_plan(source, cfg, is_sequence_classifier(hf) and cfg.head == "scalar")
    return cfg


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# What a model directory holds besides its tokenizer: weights (ours are the orbax ``params/``),
# never fetched to read a tokenizer from a URL.
_WEIGHTS = ("params", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack",
            "*.gguf", "*.onnx")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def has_tokenizer(path: str) -> bool:
    """Whether directory ``path`` (local, a URL or a cached Hub id) holds a saved tokenizer."""
    path = resolve_model_path(path)
    return any(storage.exists(storage.join(path, name)) for name in TOKENIZER_FILES)


def load_tokenizer(path: str):
    """The tokenizer saved beside a checkpoint, or None (with a warning) when there is none.

    A tokenizer saved as the generic fast class is loaded as exactly that class:
    ``AutoTokenizer`` in transformers 5 swaps in the model family's class for some model types
    (``Qwen2Tokenizer`` whenever config.json says qwen2), which rebuilds a custom tokenizer.json
    (say a WordLevel vocabulary) as byte-level BPE and silently changes every id.
    """
    # transformers.AutoTokenizer imports every model family's config (seconds): only when needed.
    from transformers import PreTrainedTokenizerFast
    path = resolve_model_path(path)
    if not has_tokenizer(path):
        log.warning("%s: no tokenizer files; returning tokenizer=None", path)
        return None
    path = storage.local_copy(path, skip=_WEIGHTS)
    config_path = os.path.join(path, "tokenizer_config.json")
    declared = None
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as f:
            declared = json.load(f).get("tokenizer_class")
    if declared in _GENERIC_TOKENIZER_CLASSES and os.path.exists(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def from_pretrained(path: str, mesh: Mesh | None = None, dtype: Any = jnp.float32, *,
                    rules: LogicalRules = DEFAULT_RULES, with_tokenizer: bool = True,
                    **config_overrides: Any) -> tuple[Transformer, dict, Any]:
    """``model, params, tokenizer`` from a transformers checkpoint directory (local, a URL
    read from a local copy of the whole directory, or a Hub id in the local cache).

    ``dtype`` is the parameter and compute dtype (override ``dtype=``/``param_dtype=`` names
    through ``config_overrides``, e.g. ``scan_layers=True, remat=True, dropout=0.1``).
    A ``*ForSequenceClassification`` directory gives a head="scalar" model (see the module doc).
    ``mesh`` may have Explicit axes (``jax.make_mesh``'s default); it is used as its Auto twin.
    """
    mesh = as_auto_mesh(mesh)
    source = storage.absolute(resolve_model_path(path))
    hf = read_hf_config(source)
    path = storage.local_copy(source)
    dtype_name = jnp.dtype(dtype).name
    overrides = dict(dtype=dtype_name, param_dtype=dtype_name)
    overrides.update(config_overrides)
    cfg = config_from_hf(hf, storage.join(source, "config.json"), **overrides)
    model = Transformer(cfg, mesh=mesh, rules=rules)
    shardings = None
    if mesh is not None:
        unstacked_model = Transformer(cfg.replace(scan_layers=False), mesh=mesh, rules=rules)
        shardings = param_shardings(unstacked_model, mesh)
    # A causal LM asked for with head="scalar" keeps its old behaviour: the trunk (and any LM
    # head) only, the score head being the caller's to add.
    score_head = is_sequence_classifier(hf) and cfg.head == "scalar"
    params = load_params(path, cfg, shardings, dtype=cfg.params_dtype, score_head=score_head,
                         score_offset=float(hf.get(SCORE_OFFSET_KEY) or 0.0))
    if cfg.scan_layers:
        stack = lambda p: stack_layers(p, cfg.n_layers)
        if mesh is not None:
            stack = jax.jit(stack, out_shardings=param_shardings(model, mesh))
        params = stack(params)
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    return model, params, tokenizer


EXPORT_DTYPES = ("float32", "bfloat16")
GENERATION_CONFIG_FILE = "generation_config.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes in ``value``: an int, or a string such as ``"2GB"`` (10^9), ``"500MiB"`` (2^20)."""
    match = _SIZE.match(str(value))
    size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()]) if match else 0
    if size < 1:
        raise UserError(f"max_shard_size={value!r}: expected a positive size such as 2GB, 500MB, "
                        "1GiB or a number of bytes")
    return size


def check_export_dtype(dtype: str) -> np.dtype:
    """The numpy dtype safetensors are written in (``bfloat16`` is ml_dtypes')."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"dtype={dtype!r}: expected one of {', '.join(EXPORT_DTYPES)} for the "
                        "exported weights")
    return np.dtype(jnp.dtype(dtype))


def _fetch(x: jax.Array, main: bool) -> np.ndarray | None:
    """One leaf's global value on process 0 (None elsewhere). A leaf no single process can read
    (sharded across hosts) is all-gathered: a collective, so every process calls this for
    every leaf in the same order; each host then holds one leaf at a time, never the model."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        value = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return value if main else None
    return np.asarray(jax.device_get(x)) if main else None


def _export_groups(cfg: TransformerConfig, scalar: bool) -> dict[str, list[tuple]]:
    """HF tensor name -> the entries (our leaves) it is made of, in export order: one leaf each,
    but GPT-2's fused c_attn (q, k and v side by side)."""
    prefix = "transformer." if cfg.arch == "gpt2" else ""
    groups: dict[str, list[tuple]] = {}
    for entry in _entries(cfg, score=scalar):
        theirs = entry[1]
        groups.setdefault(theirs if theirs.startswith("score.") else prefix + theirs, []).append(entry)
    return groups


def _export_tensor(params: dict, group: list[tuple], main: bool) -> np.ndarray | None:
    """One HF tensor in float32 from its leaves (fetched on process 0; see :func:`_fetch`)."""
    values = [_fetch(_get_path(params, ours), main) for ours, *_ in group]
    if not main:
        return None
    values = [v.astype(np.float32) for v in values]
    to_hf = group[0][3]
    if to_hf is not None:
        return to_hf(values[0])
    # GPT-2's c_attn: [in, q | k | v] (biases [q | k | v]).
    return np.concatenate([v.reshape(v.shape[0], -1) if v.ndim == 3 else v.reshape(-1)
                           for v in values], axis=-1)


def _shard_plan(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Tensors in order, a new shard whenever the next one would take this one past ``limit``
    (a tensor larger than ``limit`` gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def save_pretrained(path: str, model: Transformer, params: dict, tokenizer: Any = None, *,
                    reward_norm: dict | None = None, dtype: str = "float32",
                    max_shard_size: int | str = "2GB", readme: str | None = None) -> str:
    """Write ``config.json`` + safetensors (+ tokenizer, ``generation_config.json`` for an LM,
    ``readme`` as README.md) that transformers loads.

    head="lm" gives the causal LM; head="scalar" the ``*ForSequenceClassification`` whose logit
    is the normalized score ``(raw - mean) / std`` for ``reward_norm`` ``{"mean", "std"}``
    (identity when None; see the module doc for where the constant goes).
    Weights are written in ``dtype`` (float32 or bfloat16), as one ``model.safetensors`` or,
    past ``max_shard_size`` (bytes, or ``"2GB"``-style), as ``model-0000i-of-0000n.safetensors``
    with ``model.safetensors.index.json``. Every process must call it on a multi-host run;
    process 0 alone fetches and writes, one shard at a time (a leaf split across hosts is
    all-gathered leaf by leaf, see :func:`_fetch`).
    """
    from safetensors.numpy import save_file
    out_dtype = check_export_dtype(dtype)
    limit = parse_size(max_shard_size)
    cfg = model.config
    scalar = cfg.head == "scalar"
    if reward_norm and not scalar:
        raise ValueError("reward_norm applies to scalar-head (reward) models; got head='lm'")
    hf_config = config_to_hf(cfg)
    main = jax.process_index() == 0
    params = unstack_layers(params)
    groups = _export_groups(cfg, scalar)
    folded: dict[str, np.ndarray | None] = {}
    if scalar:
        folded, offset = _fold_normalization(cfg, params, groups, reward_norm, out_dtype, main)
        if offset is not None:
            setattr(hf_config, SCORE_OFFSET_KEY, offset)
    sizes = {name: int(np.prod(group[0][4])) * out_dtype.itemsize for name, group in groups.items()}
    shards = _shard_plan(sizes, limit)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    path = storage.absolute(path)
    with (storage.writable_local(path) if main else contextlib.nullcontext()) as local:
        for file, names in zip(files, shards):
            tensors = {name: folded[name] if name in folded else
                       _export_tensor(params, groups[name], main) for name in names}
            if main:
                save_file({name: np.ascontiguousarray(value.astype(out_dtype))
                           for name, value in tensors.items()},
                          os.path.join(local, file), metadata={"format": "pt"})
        if main:
            _write_companions(local, cfg, tokenizer, readme, files, shards, sizes)
    if main:
        # config.json is what makes a directory a checkpoint: last, so that a write in place (an
        # object store) that is cut short leaves none. What PretrainedConfig.save_pretrained
        # writes, without its Hub upload.
        if hasattr(hf_config, "validate"):
            hf_config.validate()
        storage.write_text(storage.join(path, "config.json"),
                           hf_config.to_json_string(use_diff=True))
    return path


def _write_companions(local: str, cfg: TransformerConfig, tokenizer: Any, readme: str | None,
                      files: list[str], shards: list[list[str]], sizes: dict[str, int]) -> None:
    """The index of a sharded export, the tokenizer, an LM's generation defaults, the card."""
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
        with open(os.path.join(local, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(local)
    if cfg.head == "lm":
        from transformers import GenerationConfig
        ids = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(cfg, k) is not None}
        GenerationConfig(max_length=cfg.max_position, **ids).to_json_file(
            os.path.join(local, GENERATION_CONFIG_FILE), use_diff=True)
    if readme is not None:
        with open(os.path.join(local, "README.md"), "w", encoding="utf-8") as f:
            f.write(readme)


def _fold_normalization(cfg: TransformerConfig, params: dict, groups: dict[str, list[tuple]],
                        reward_norm: dict | None, out_dtype: np.dtype,
                        main: bool) -> tuple[dict[str, np.ndarray | None], float | None]:
    """The exported score tensors, rewritten so that the score is ``((w.h + bias) - mean) /
    std``: ``{HF name: tensor}`` (None on processes other than 0) and the constant left for
    config.json (Llama / Qwen2), or None when it was folded into the weights (GPT-2).
    """
    norm = reward_norm or {}
    mean, std = float(norm.get("mean", 0.0)), float(norm.get("std", 1.0))
    if not std > 0:
        raise ValueError(f"reward_norm std={std}: must be positive")
    weight = _export_tensor(params, groups["score.weight"], main)
    bias = _fetch(params["score_head"]["bias"], main)
    # Every process returns the same names: the others then skip the same collectives.
    folded = {"score.weight": weight}
    ln_f = "transformer.ln_f.bias"
    if cfg.arch == "gpt2":
        folded[ln_f] = _export_tensor(params, groups[ln_f], main)
    if not main:
        return folded, None
    # The weight actually written (in out_dtype) is the one the shift must be measured against.
    weight = folded["score.weight"] = (weight.astype(np.float64) / std).astype(out_dtype)
    c = (float(bias.astype(np.float64).reshape(-1)[0]) - mean) / std
    if not c:
        return folded, None
    if cfg.arch != "gpt2":
        log.warning("transformers' logits for this %s reward model are ours minus %.6g "
                    "(config.json %s; RMSNorm has no bias to fold it into); rankings and "
                    "pairwise preferences are unaffected", cfg.arch, c, SCORE_OFFSET_KEY)
        return folded, c
    # The score is the only reader of ln_f's output in GPT2ForSequenceClassification, so shifting
    # ln_f.bias along w adds exactly c to the logit and changes nothing else.
    w = weight[0].astype(np.float64)
    norm2 = float(w @ w)
    if norm2 == 0.0:
        raise ValueError("score head weight is all zeros: its constant score cannot be exported")
    folded[ln_f] = (folded[ln_f].astype(np.float64) + c * w / norm2).astype(out_dtype)
    return folded, None
