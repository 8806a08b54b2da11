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
:func:`load_model` takes either; :func:`save_our_checkpoint` writes ours and
:func:`save_hf_checkpoint` transformers', each whole (:func:`write_directory`: no file of an
earlier save survives beside the new ones); :func:`check_model_dir` checks either against its
weights' shapes without reading them, so damage is reported before anything loads. A model
named by a Hub id (``gpt2``, ``org/name``) is read from the local Hugging Face cache
(:func:`resolve_model_path`). Either may be a URL (``gs://``): orbax reads and writes params
there itself, the small files go through :mod:`rlhf_jax.storage`, and tokenizers and
transformers weights are read from local copies.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import fnmatch
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from rlhf_jax import distributed, storage
from rlhf_jax.checkpoint import load_pytree, save_pytree, saved_structure
from rlhf_jax.config import model_config_from
from rlhf_jax.errors import UserError
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.hf import (TOKENIZER_FILES, CheckpointFormatError, check_pretrained,
                                from_pretrained, has_tokenizer, load_tokenizer,
                                resolve_model_path, save_pretrained)
from rlhf_jax.models.params import (abstract_params, cast_floating, init_params, place_params,
                                    stack_layers, unstack_layers)
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sharding import DEFAULT_RULES, LogicalRules, as_auto_mesh, replicated_fraction

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
EXTRA_FILE = "extra.json"


# --- writing ours ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """What kind of directory :func:`write_directory` writes.

    ``marker``: the file that makes the directory what it is, written last; ``first``: the
    entry written first, or a pattern of the entries written first (a directory on an object
    store holding one without ``marker`` is what an interrupted write leaves); ``what``: its
    name in messages."""
    marker: str
    first: str
    what: str


OUR_LAYOUT = Layout(MODEL_CONFIG_FILE, PARAMS_DIR, f"a model ({MODEL_CONFIG_FILE} + {PARAMS_DIR}/)")
HF_LAYOUT = Layout("config.json", "*.safetensors",
                   "a transformers checkpoint (config.json + *.safetensors)")
LORA_LAYOUT = Layout("lora.json", "adapters", "LoRA adapters (lora.json + adapters/)")


def save_our_checkpoint(our_dir: str, model: Transformer, params: Any, tokenizer: Any = None,
                        *, extra: dict | None = None, overwrite: bool = False) -> str:
    """Write ``model_config.json``, the orbax ``params``, the tokenizer and ``extra.json`` (stage
    facts such as the reward model's normalization) into ``our_dir``: a stage's output.

    Written whole by :func:`write_directory`: a kill at any moment leaves the previous model or
    the new one, never a mix. ``overwrite`` replaces whatever ``our_dir`` holds; without it a
    directory that is not empty is an error.

    Multi-host: call on every process (the orbax save is collective); process 0 writes the
    config and tokenizer and does the swap.
    """
    return write_directory(
        our_dir, lambda target: _write_model_files(target, model, params, tokenizer, extra),
        OUR_LAYOUT, overwrite=overwrite)


def save_hf_checkpoint(hf_dir: str, model: Transformer, params: Any, tokenizer: Any = None, *,
                       reward_norm: dict | None = None, overwrite: bool = False,
                       **export: Any) -> str:
    """:func:`rlhf_jax.models.hf.save_pretrained` into ``hf_dir`` (``export``: its ``dtype``,
    ``max_shard_size`` and ``readme``), written whole as :func:`save_our_checkpoint` writes
    ours: no safetensors of an earlier export stay beside the new ones (readers would mix
    them). Multi-host: call on every process."""
    return write_directory(
        hf_dir, lambda target: save_pretrained(target, model, params, tokenizer,
                                               reward_norm=reward_norm, **export),
        HF_LAYOUT, overwrite=overwrite)


def write_directory(target: str, write: Callable[[str], Any], layout: Layout, *,
                    overwrite: bool) -> str:
    """Have ``write(directory)`` fill a directory that then replaces ``target`` whole.

    Locally ``write`` fills the sibling ``<target>.saving``, which is then swapped in (an
    atomic exchange where the filesystem has one): a kill at any moment leaves either the
    previous content or the new, and nothing of the previous content survives beside the new.
    On object stores (``gs://``), which have no directory rename, the previous content loses
    its ``layout.marker`` first, is then deleted, and ``write`` fills ``target`` itself,
    writing the marker last: a kill leaves no marker, so no reader takes a partial directory
    for a complete one, and the rerun writes it again.

    ``overwrite`` replaces whatever ``target`` holds; without it see :func:`check_output_dir`.
    Returns the absolute ``target``. Multi-host: call on every process (``write`` is called on
    each); process 0 clears, swaps and recovers.
    """
    target = storage.absolute(target)
    main = jax.process_index() == 0
    if storage.is_url(target):
        check_output_dir(target, layout, overwrite=overwrite)
        if main and storage.exists(target):
            storage.remove(storage.join(target, layout.marker))
            storage.rmtree(target)
        distributed.barrier(f"rlhf_jax write_directory {target}: cleared")
        write(target)
        distributed.barrier(f"rlhf_jax write_directory {target}: written")
        return target
    staging = target + _STAGING_SUFFIX
    if main:
        recover_model_dir(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
    distributed.barrier(f"rlhf_jax write_directory {target}: staging ready")
    check_output_dir(target, layout, overwrite=overwrite)
    try:
        write(staging)
    except BaseException:
        if main and os.path.exists(staging):   # a full disk above all: free what it took
            _remove_tree(staging)
        raise
    distributed.barrier(f"rlhf_jax write_directory {target}: staged")
    if main:
        _swap_in(staging, target)
    distributed.barrier(f"rlhf_jax write_directory {target}: swapped")
    return target


_STAGING_SUFFIX = ".saving"      # the new content while it is written; the old after an exchange
_REPLACED_SUFFIX = ".replaced"   # the previous content during a two-rename swap


def check_output_dir(target: str, layout: Layout, *, overwrite: bool) -> None:
    """Raise unless :func:`write_directory` may write ``target``: a new or empty directory, or
    any with ``overwrite`` (replaced whole). Without ``overwrite`` a directory that holds
    anything is refused, so that an earlier model (or unrelated files) is never deleted by
    surprise; except, on an object store, what an interrupted write left there (``first``
    without the marker), which the rerun replaces. Callers that load a model first check here
    before loading."""
    target = storage.absolute(target)
    if storage.isfile(target):
        raise UserError(f"{target}: a file; expected a directory to write {layout.what} into")
    if overwrite or not storage.isdir(target):
        return
    names = storage.listdir(target)
    if not names or (storage.is_url(target) and fnmatch.filter(names, layout.first)
                     and layout.marker not in names):
        return
    if layout.marker in names:
        raise UserError(f"{target}: already holds {layout.what}; choose another directory, "
                        "delete it, or pass --overwrite")
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise UserError(f"{target}: not empty (holds {shown}); {layout.what} is written into a new "
                    "or empty directory so that no earlier file mixes into it: choose another "
                    "directory, delete it, or pass --overwrite")


def _write_model_files(our_dir: str, model: Transformer, params: Any, tokenizer: Any,
                       extra: dict | None) -> None:
    """Params first and ``model_config.json`` last: written in place (an object store), the
    directory only looks like a model once everything else is there."""
    storage.makedirs(our_dir)
    # The directory is new or cleared; overwrite=True only keeps a host whose listing of an
    # object store is stale from refusing to save.
    save_pytree(storage.join(our_dir, PARAMS_DIR), params, overwrite=True)
    if jax.process_index() == 0:
        storage.write_text(storage.join(our_dir, EXTRA_FILE),
                           json.dumps(extra or {}, indent=2, sort_keys=True))
        if tokenizer is not None:
            with storage.writable_local(our_dir) as local:
                tokenizer.save_pretrained(local)
        storage.write_text(storage.join(our_dir, MODEL_CONFIG_FILE), model.config.to_json())


def _swap_in(staging: str, target: str) -> None:
    """Put the complete ``staging`` directory at ``target``; the previous content is removed."""
    if not os.path.exists(target):
        os.rename(staging, target)
        return
    if _exchange(staging, target):
        _remove_tree(staging)           # now the previous content
        return
    replaced = target + _REPLACED_SUFFIX
    os.rename(target, replaced)
    os.rename(staging, target)          # a kill between these two is undone by recover_model_dir
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
        # A leftover copy only costs disk, and the next save removes it.
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


def read_json_object(path: str, expected: str) -> dict:
    """The JSON object in file ``path``; anything else is a one-line error naming the file and
    ``expected`` (what the object holds)."""
    try:
        data = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object with {expected}; got "
                                    f"{type(data).__name__}")
    return data


def read_extra(our_dir: str) -> dict:
    """The stage facts stored with a model ({} when there are none)."""
    path = storage.join(storage.absolute(our_dir), EXTRA_FILE)
    return read_json_object(path, "stage facts") if storage.exists(path) else {}


def read_model_config(our_dir: str) -> TransformerConfig:
    """The TransformerConfig stored in ``our_dir/model_config.json``."""
    config_path = storage.join(storage.absolute(our_dir), MODEL_CONFIG_FILE)
    if not storage.exists(config_path):
        raise FileNotFoundError(
            f"{config_path}: missing; an rlhf_jax checkpoint directory holds {MODEL_CONFIG_FILE} "
            f"and {PARAMS_DIR}/ (for a transformers checkpoint use rlhf_jax.models.from_pretrained "
            "or `rlhf-jax convert`)")
    fields = read_json_object(config_path, "TransformerConfig fields")
    try:
        return TransformerConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{config_path}: not a valid TransformerConfig: "
                                    f"{' '.join(str(e).split())}") from e


def check_params(our_dir: str, cfg: TransformerConfig) -> None:
    """Raise unless ``our_dir/params`` holds exactly the arrays ``cfg`` describes, with their
    shapes: read from orbax's metadata, no array is read. A ``model_config.json`` beside
    another model's params would otherwise fail deep inside the restore."""
    our_dir = storage.absolute(our_dir)
    params_dir = storage.join(our_dir, PARAMS_DIR)
    config_path = storage.join(our_dir, MODEL_CONFIG_FILE)
    saved = _shapes(saved_structure(params_dir, f"the orbax params {config_path} describes"))
    expected = _shapes(abstract_params(Transformer(cfg)))
    differ = "the config and the params are of different models"
    for name in sorted(expected.keys() | saved.keys()):
        if name not in saved:
            raise CheckpointFormatError(f"{params_dir}: no {name}, which {config_path} implies "
                                        f"with shape {expected[name]}; {differ}")
        if name not in expected:
            raise CheckpointFormatError(f"{params_dir}: holds {name} {saved[name]}, which "
                                        f"{config_path} does not describe; {differ}")
        if saved[name] != expected[name]:
            raise CheckpointFormatError(f"{params_dir}: {name} has shape {saved[name]}, but "
                                        f"{config_path} implies {expected[name]}; {differ}")


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(key, "key", key)) for key in path): tuple(leaf.shape)
            for path, leaf in leaves}


def check_model_dir(source: str) -> TransformerConfig:
    """The config of a model directory, ours or transformers', checked against the shapes of
    its weights (orbax metadata, safetensors headers: no weights read). Validation runs it
    before any model loads, so a damaged or mixed-up directory is one line, not a traceback
    after minutes of loading."""
    source = resolve_model_path(source)
    if is_our_checkpoint(source):
        cfg = read_model_config(source)
        check_params(source, cfg)
        return cfg
    return check_pretrained(source)


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
    our_dir = storage.absolute(resolve_model_path(our_dir))
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

    check_params(our_dir, saved_cfg)
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
    """``(model, params, tokenizer, extra)`` from a stage output dir or a transformers dir
    (either may be a Hub id in the local cache)."""
    source = resolve_model_path(source)
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
        if not cfg.get("tokenizer") and not has_tokenizer(cfg.init_from):
            raise UserError(f"init_from={cfg.init_from!r}: no tokenizer files ("
                            f"{', '.join(TOKENIZER_FILES)}) beside the model, and no tokenizer "
                            "is set; set --config.tokenizer=<directory with the tokenizer>")
        model, params, tokenizer, extra = load_model(cfg.init_from, mesh, **overrides)
        if tokenizer is None:
            tokenizer = _config_tokenizer(cfg)
        return model, params, tokenizer, extra
    if not cfg.get("tokenizer"):
        raise ValueError("config: set init_from (a model directory) or tokenizer + model")
    tokenizer = _config_tokenizer(cfg)
    model = Transformer(model_config_from(cfg.model, tokenizer, **overrides), mesh=mesh)
    params = init_params(model, rng, mesh)
    return model, params, tokenizer, {}


def _config_tokenizer(cfg: Any) -> Any:
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer is None:
        raise FileNotFoundError(f"config.tokenizer={cfg.tokenizer!r}: no tokenizer files there")
    return tokenizer


def model_config_for_build(model_cfg: Any, source: str = "", **overrides: Any) -> TransformerConfig:
    """A network's TransformerConfig without loading weights: the config stored in the
    ``source`` model directory (ours or transformers', checked by :func:`check_model_dir`)
    when one is named, else the architecture section ``model_cfg`` (arch, sizes, vocab_size)."""
    if source:
        return check_model_dir(source).replace(**overrides)
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
