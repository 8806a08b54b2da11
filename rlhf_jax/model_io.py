"""Model directories, read and written in one place: ours and transformers', placed on a mesh.

Below the stages and the commands that load or save a model (cli, pipeline, convert, profile,
evaluation_report, validate); above ``models/``, ``checkpoint`` and ``sharding``, whose pieces it
puts together. Our layout (what every stage writes as its output and reads as its input)::

    our_dir/
        model_config.json   TransformerConfig.to_json()
        params/             orbax pytree (rlhf_jax.checkpoint.save_pytree)
        extra.json          stage facts (e.g. the reward model's normalization)
        tokenizer files     (optional) tokenizer.json, tokenizer_config.json, ...

A transformers directory (config.json + safetensors) is read through ``rlhf_jax.models.hf``.
:func:`load_model` takes either; :func:`save_our_checkpoint` writes ours. Either may be a URL
(``gs://``): orbax reads and writes params there itself, the small files go through
:mod:`rlhf_jax.storage`, and tokenizers and transformers weights are read from local copies.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from rlhf_jax import storage
from rlhf_jax.checkpoint import load_pytree, save_pytree
from rlhf_jax.config import model_config_from
from rlhf_jax.errors import UserError
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.hf import config_from_hf, from_pretrained, load_tokenizer, read_hf_config
from rlhf_jax.models.params import (abstract_params, cast_floating, init_params, place_params,
                                    stack_layers, unstack_layers)
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sharding import DEFAULT_RULES, LogicalRules, as_auto_mesh, replicated_fraction

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
EXTRA_FILE = "extra.json"


# --- writing ours ---------------------------------------------------------------------------------

def save_our_checkpoint(our_dir: str, model: Transformer, params: Any, tokenizer: Any = None,
                        *, extra: dict | None = None, overwrite: bool = False) -> str:
    """Write ``model_config.json``, the orbax ``params``, the tokenizer and ``extra.json`` (stage
    facts such as the reward model's normalization) into ``our_dir``: a stage's output.

    A local directory is written whole into the sibling ``<our_dir>.saving`` and then swapped in
    (an atomic exchange where the filesystem has one), so a kill at any moment leaves either the
    previous complete model or the new one, never a directory without params. ``overwrite``
    replaces an existing model; without it an existing model is an error. On object stores
    (``gs://``), which have no directory rename, the files are written in place (see
    :func:`_write_in_place`).

    Multi-host: call on every process (the orbax save is collective); process 0 writes the
    config and tokenizer and does the swap.
    """
    our_dir = storage.absolute(our_dir)
    if storage.is_url(our_dir):
        _write_in_place(our_dir, model, params, tokenizer, extra, overwrite)
        return our_dir
    main = jax.process_index() == 0
    staging = our_dir + _STAGING_SUFFIX
    if main:
        recover_model_dir(our_dir)
    if not overwrite and os.path.exists(os.path.join(our_dir, PARAMS_DIR)):
        _refuse_existing(our_dir)
    if main:
        os.makedirs(os.path.dirname(our_dir), exist_ok=True)
    _sync_processes("rlhf_jax save_our_checkpoint: staging ready")
    _write_model_files(staging, model, params, tokenizer, extra, overwrite=False)
    _sync_processes("rlhf_jax save_our_checkpoint: staged")
    if main:
        _swap_in(staging, our_dir)
    _sync_processes("rlhf_jax save_our_checkpoint: swapped")
    return our_dir


_STAGING_SUFFIX = ".saving"      # the new model while it is written; the old one after an exchange
_REPLACED_SUFFIX = ".replaced"   # the previous model during a two-rename swap


def _refuse_existing(our_dir: str) -> None:
    raise UserError(f"{our_dir}: already holds a model ({PARAMS_DIR}/); choose another "
                    "directory or delete it")


def _write_model_files(our_dir: str, model: Transformer, params: Any, tokenizer: Any,
                       extra: dict | None, overwrite: bool) -> None:
    """Params first and ``model_config.json`` last: written in place (an object store), the
    directory only looks like a model once everything else is there."""
    storage.makedirs(our_dir)
    save_pytree(storage.join(our_dir, PARAMS_DIR), params, overwrite=overwrite)
    if jax.process_index() == 0:
        storage.write_text(storage.join(our_dir, EXTRA_FILE),
                           json.dumps(extra or {}, indent=2, sort_keys=True))
        if tokenizer is not None:
            with storage.writable_local(our_dir) as local:
                tokenizer.save_pretrained(local)
        storage.write_text(storage.join(our_dir, MODEL_CONFIG_FILE), model.config.to_json())


def _write_in_place(our_dir: str, model: Transformer, params: Any, tokenizer: Any,
                    extra: dict | None, overwrite: bool) -> None:
    """Save into a URL, where nothing can be renamed into place.

    ``model_config.json`` + ``params/`` make a directory a model, so a previous model (or a
    partial write that a kill left: params without the config) loses its config first and is
    then deleted, and the new config is written last: a kill leaves no model, which the rerun
    writes again, never params that do not match their config.
    """
    if not overwrite and is_our_checkpoint(our_dir):
        _refuse_existing(our_dir)
    if jax.process_index() == 0 and storage.exists(storage.join(our_dir, PARAMS_DIR)):
        storage.remove(storage.join(our_dir, MODEL_CONFIG_FILE))
        storage.rmtree(our_dir)
    _sync_processes("rlhf_jax save_our_checkpoint: previous model removed")
    # The directory is empty now; overwrite=True only keeps a host whose listing of the store is
    # stale from refusing to save.
    _write_model_files(our_dir, model, params, tokenizer, extra, overwrite=True)
    _sync_processes("rlhf_jax save_our_checkpoint: written")


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _swap_in(staging: str, our_dir: str) -> None:
    """Put the complete ``staging`` directory at ``our_dir``; the previous content is removed."""
    if not os.path.exists(our_dir):
        os.rename(staging, our_dir)
        return
    if not os.path.exists(os.path.join(our_dir, PARAMS_DIR)):
        # An existing directory that is not a model (e.g. `convert` into a folder holding other
        # files): add the model's entries to it, params last, since params + config is what
        # makes a directory a model.
        names = sorted(os.listdir(staging), key=lambda name: name == PARAMS_DIR)
        for name in names:
            target = os.path.join(our_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        os.rmdir(staging)
        return
    if _exchange(staging, our_dir):
        _remove_tree(staging)           # now the previous model
        return
    replaced = our_dir + _REPLACED_SUFFIX
    os.rename(our_dir, replaced)
    os.rename(staging, our_dir)         # a kill between these two is undone by recover_model_dir
    _remove_tree(replaced)


def recover_model_dir(our_dir: str) -> None:
    """Finish or undo a swap that a kill interrupted, and drop a half-written staging copy.

    ``save_our_checkpoint`` runs this first. The staged copy is complete exactly when the
    previous model has already been moved aside (``.replaced``), because that move only starts
    once the staged copy is written; otherwise a staging directory is a partial write.
    """
    our_dir = storage.absolute(our_dir)
    staging, replaced = our_dir + _STAGING_SUFFIX, our_dir + _REPLACED_SUFFIX
    if not os.path.exists(our_dir) and os.path.exists(replaced):
        source = staging if os.path.exists(staging) else replaced
        log.warning("%s: finishing a model save that was interrupted (using %s)", our_dir, source)
        os.rename(source, our_dir)
    for leftover in (replaced, staging):
        if os.path.exists(leftover):
            _remove_tree(leftover)


def _remove_tree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except OSError as error:
        # The new model is in place; a leftover copy only costs disk and is retried next save.
        log.warning("could not remove %s (%s); delete it by hand", path, error)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is
    not available (other systems, old kernels, filesystems without it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint)
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


# --- reading --------------------------------------------------------------------------------------

def is_our_checkpoint(path: str) -> bool:
    """A directory written by ``save_our_checkpoint`` (as opposed to a transformers one)."""
    path = storage.absolute(path)
    return (storage.exists(storage.join(path, MODEL_CONFIG_FILE))
            and storage.exists(storage.join(path, PARAMS_DIR)))


def read_extra(our_dir: str) -> dict:
    """The stage facts stored with a model ({} when there are none)."""
    path = storage.join(storage.absolute(our_dir), EXTRA_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def read_model_config(our_dir: str) -> TransformerConfig:
    """The TransformerConfig stored in ``our_dir/model_config.json``."""
    config_path = storage.join(storage.absolute(our_dir), MODEL_CONFIG_FILE)
    if not storage.exists(config_path):
        raise FileNotFoundError(
            f"{config_path}: missing; an rlhf_jax checkpoint directory holds {MODEL_CONFIG_FILE} "
            f"and {PARAMS_DIR}/ (for a transformers checkpoint use rlhf_jax.models.from_pretrained "
            "or `rlhf-jax convert`)")
    try:
        return TransformerConfig.from_dict(json.loads(storage.read_text(config_path)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}:{e.lineno}: invalid JSON ({e.msg})") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: not a valid TransformerConfig: {e}") from e


def _restore_target(model: Transformer, mesh: Mesh | None) -> Any:
    """ShapeDtypeStructs with shardings: the mesh's, or all on the first local device."""
    mesh = as_auto_mesh(mesh)
    if mesh is not None:
        return abstract_params(model, mesh)
    single = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single),
                        abstract_params(model))


def load_our_checkpoint(our_dir: str, mesh: Mesh | None = None, *,
                        rules: LogicalRules = DEFAULT_RULES, with_tokenizer: bool = True,
                        **config_overrides: Any) -> tuple[Transformer, Any, Any]:
    """``model, params, tokenizer`` from a directory written by ``save_our_checkpoint``.

    Params are restored straight into their shardings on ``mesh`` (no full host copy).
    ``config_overrides`` change the returned model's config, e.g. ``remat=True``, ``dropout=0.1``,
    ``scan_layers=True`` (params are restacked) or ``param_dtype="bfloat16"`` (params are cast).
    The parameter tree itself (``head``, sizes) cannot change here. ``mesh`` may have Explicit
    axes (``jax.make_mesh``'s default); it is used as its Auto twin.
    """
    mesh = as_auto_mesh(mesh)
    our_dir = storage.absolute(our_dir)
    saved_cfg = read_model_config(our_dir)
    cfg = saved_cfg.replace(**config_overrides)
    structural = [name for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                    "head_dim", "d_ff", "max_position", "arch", "position",
                                    "norm", "mlp", "tie_embeddings", "qkv_bias", "out_bias",
                                    "head")
                  if getattr(cfg, name) != getattr(saved_cfg, name)]
    if structural:
        raise ValueError(f"{our_dir}: overrides {structural} change the parameter tree of the "
                         "saved model; load it as saved and convert the params explicitly")

    saved_model = Transformer(saved_cfg, mesh=mesh, rules=rules)
    params = load_pytree(storage.join(our_dir, PARAMS_DIR), _restore_target(saved_model, mesh))

    model = Transformer(cfg, mesh=mesh, rules=rules)
    if cfg.scan_layers != saved_cfg.scan_layers:
        params = (stack_layers(params, cfg.n_layers) if cfg.scan_layers
                  else unstack_layers(params))
    if cfg.param_dtype != saved_cfg.param_dtype:
        params = cast_floating(params, cfg.params_dtype)
    if cfg.scan_layers != saved_cfg.scan_layers or cfg.param_dtype != saved_cfg.param_dtype:
        params = place_params(params, model, mesh)

    tokenizer = load_tokenizer(our_dir) if with_tokenizer else None
    return model, params, tokenizer


def load_model(source: str, mesh: Mesh | None, **overrides: Any):
    """``(model, params, tokenizer, extra)`` from a stage output dir or a transformers dir."""
    if is_our_checkpoint(source):
        model, params, tokenizer = load_our_checkpoint(source, mesh, **overrides)
        return model, params, tokenizer, read_extra(source)
    model, params, tokenizer = from_pretrained(source, mesh, **_hf_overrides(overrides))
    return model, params, tokenizer, {}


def _hf_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    dtype = overrides.pop("param_dtype", None) or "float32"
    out = dict(overrides)
    out.setdefault("dtype", dtype)
    return dict(out, param_dtype=dtype)


# --- a stage's networks ---------------------------------------------------------------------------

def runtime_overrides(cfg: Any) -> dict[str, Any]:
    """Model fields a stage may change at load time (not the architecture)."""
    run = cfg.get("model_runtime", {}) or {}
    return {k: v for k, v in dict(run).items() if v is not None}


def init_or_load_model(cfg: Any, mesh: Mesh, rng: jax.Array, **overrides: Any):
    """The stage's starting model: ``cfg.init_from`` if set, else random init of ``cfg.model``."""
    overrides = {**runtime_overrides(cfg), **overrides}
    if cfg.get("init_from"):
        model, params, tokenizer, extra = load_model(cfg.init_from, mesh, **overrides)
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.tokenizer)
        return model, params, tokenizer, extra
    if not cfg.get("tokenizer"):
        raise ValueError("config: set init_from (a model directory) or tokenizer + model")
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer is None:
        raise FileNotFoundError(f"config.tokenizer={cfg.tokenizer!r}: no tokenizer files there")
    model = Transformer(model_config_from(cfg.model, tokenizer, **overrides), mesh=mesh)
    params = init_params(model, rng, mesh)
    return model, params, tokenizer, {}


def model_config_for_build(model_cfg: Any, source: str = "", **overrides: Any) -> TransformerConfig:
    """A network's TransformerConfig without loading weights: the config stored in the
    ``source`` model directory (ours or transformers') when one is named, else the architecture
    section ``model_cfg`` (arch, sizes, vocab_size)."""
    if source:
        if is_our_checkpoint(source):
            return read_model_config(source).replace(**overrides)
        return config_from_hf(read_hf_config(source), source).replace(**overrides)
    fields = dict(model_cfg or {})
    if not fields:
        raise ValueError("no architecture: set the model section (arch, sizes, vocab_size) or a "
                         "model directory to read it from")
    if "vocab_size" not in fields:
        raise ValueError(f"model section {fields}: no vocab_size (set it, or --config.vocab_size "
                         "for a pipeline config)")
    return model_config_from(fields, None, **overrides)


def stage_model(model: Transformer | None, arch: Any, source: str, mesh: Mesh,
                overrides: dict[str, Any]) -> Transformer:
    """A stage's network definition: a loaded ``model`` (with ``overrides`` on top), or one built
    from an architecture section / a model directory's stored config."""
    if model is not None:
        changed = {k: v for k, v in overrides.items() if getattr(model.config, k) != v}
        return model.clone(config=model.config.replace(**changed)) if changed else model
    return Transformer(model_config_for_build(arch, source, **overrides), mesh=mesh)


def log_params(params: Any) -> None:
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log.info("%.3fM parameters, %.1f%% of parameter bytes replicated", n / 1e6,
             100 * replicated_fraction(params))
