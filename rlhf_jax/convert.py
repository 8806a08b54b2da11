"""Conversion between Hugging Face checkpoints and our own checkpoint layout.

Our layout (what every stage writes as its output and reads as its input)::

    our_dir/
        model_config.json   TransformerConfig.to_json()
        params/             orbax pytree (rlhf_jax.checkpoint.save_pytree)
        tokenizer files     (optional) tokenizer.json, tokenizer_config.json, ...

``hf_to_orbax`` and ``orbax_to_hf`` back the ``rlhf-jax convert`` CLI; ``load_our_checkpoint``
is how a stage loads the output of the previous one. ``merge_lora`` (and ``orbax_to_hf``'s
``lora_dir``) fold a LoRA run's adapters into its base model::

    lora_dir/               what PPO writes as <workdir>/lora with ppo.lora.rank > 0
        lora.json           {"rank", "alpha", "scale", "targets", "base", ...}
        adapters/           orbax pytree of A and B (rlhf_jax.models.lora.LoRA.adapters)
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
import jax.numpy as jnp
from jax.sharding import Mesh, SingleDeviceSharding

from rlhf_jax.checkpoint import load_pytree, save_pytree
from rlhf_jax.errors import UserError
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.hf import from_pretrained, load_tokenizer, save_pretrained
from rlhf_jax.models.lora import ALL_TARGETS, LoRA, apply_lora, init_lora
from rlhf_jax.models.params import (abstract_params, cast_floating, place_params, stack_layers,
                                    unstack_layers)
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sharding import DEFAULT_RULES, LogicalRules, as_auto_mesh

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def _local_dir(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _write_text(path: str, text: str) -> None:
    if "://" in path:
        from etils import epath  # orbax's path library, handles gs:// and friends
        epath.Path(path).write_text(text)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _read_text(path: str) -> str:
    if "://" in path:
        from etils import epath
        return epath.Path(path).read_text()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _exists(path: str) -> bool:
    if "://" in path:
        from etils import epath
        return epath.Path(path).exists()
    return os.path.exists(path)


EXTRA_FILE = "extra.json"


def save_our_checkpoint(our_dir: str, model: Transformer, params: Any, tokenizer: Any = None,
                        *, extra: dict | None = None, overwrite: bool = False) -> str:
    """Write ``model_config.json``, the orbax ``params``, the tokenizer and ``extra.json`` (stage
    facts such as the reward model's normalization) into ``our_dir``: a stage's output.

    A local directory is written whole into the sibling ``<our_dir>.saving`` and then swapped in
    (an atomic exchange where the filesystem has one), so a kill at any moment leaves either the
    previous complete model or the new one, never a directory without params. ``overwrite``
    replaces an existing model; without it an existing model is an error. On object stores
    (``gs://``), which have no directory rename, the files are written in place.

    Multi-host: call on every process (the orbax save is collective); process 0 writes the
    config and tokenizer and does the swap.
    """
    our_dir = _local_dir(our_dir)
    if "://" in our_dir:
        _write_model_files(our_dir, model, params, tokenizer, extra, overwrite)
        return our_dir
    main = jax.process_index() == 0
    staging = our_dir + _STAGING_SUFFIX
    if main:
        recover_model_dir(our_dir)
    if not overwrite and os.path.exists(os.path.join(our_dir, PARAMS_DIR)):
        raise UserError(f"{our_dir}: already holds a model ({PARAMS_DIR}/); choose another "
                        "directory or delete it")
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


def _write_model_files(our_dir: str, model: Transformer, params: Any, tokenizer: Any,
                       extra: dict | None, overwrite: bool) -> None:
    if "://" not in our_dir:
        os.makedirs(our_dir, exist_ok=True)
    save_pytree(os.path.join(our_dir, PARAMS_DIR), params, overwrite=overwrite)
    if jax.process_index() == 0:
        _write_text(os.path.join(our_dir, MODEL_CONFIG_FILE), model.config.to_json())
        _write_text(os.path.join(our_dir, EXTRA_FILE), json.dumps(extra or {}, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(our_dir)


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
    our_dir = _local_dir(our_dir)
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


def is_our_checkpoint(path: str) -> bool:
    """A directory written by ``save_our_checkpoint`` (as opposed to a transformers one)."""
    path = _local_dir(path)
    return _exists(os.path.join(path, MODEL_CONFIG_FILE)) and _exists(os.path.join(path, PARAMS_DIR))


def read_extra(our_dir: str) -> dict:
    """The stage facts stored with a model ({} when there are none)."""
    path = os.path.join(_local_dir(our_dir), EXTRA_FILE)
    return json.loads(_read_text(path)) if _exists(path) else {}


def read_model_config(our_dir: str) -> TransformerConfig:
    """The TransformerConfig stored in ``our_dir/model_config.json``."""
    config_path = os.path.join(_local_dir(our_dir), MODEL_CONFIG_FILE)
    if not _exists(config_path):
        raise FileNotFoundError(
            f"{config_path}: missing; an rlhf_jax checkpoint directory holds {MODEL_CONFIG_FILE} "
            f"and {PARAMS_DIR}/ (for a transformers checkpoint use rlhf_jax.models.from_pretrained "
            "or `rlhf-jax convert`)")
    try:
        return TransformerConfig.from_dict(json.loads(_read_text(config_path)))
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
    our_dir = _local_dir(our_dir)
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
    params = load_pytree(os.path.join(our_dir, PARAMS_DIR), _restore_target(saved_model, mesh))

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


def hf_to_orbax(hf_dir: str, out_dir: str, *, dtype: str = "float32", mesh: Mesh | None = None,
                overwrite: bool = False) -> str:
    """Convert a local transformers checkpoint (config.json + safetensors) to our layout.

    ``dtype`` ("float32" or "bfloat16") is the stored parameter dtype and the compute dtype
    recorded in ``model_config.json``. Returns the absolute ``out_dir``.
    """
    mesh = as_auto_mesh(mesh)
    model, params, _ = from_pretrained(hf_dir, mesh=mesh, dtype=jnp.dtype(dtype),
                                       with_tokenizer=False)
    tokenizer = load_tokenizer(_local_dir(hf_dir))
    return save_our_checkpoint(out_dir, model, params, tokenizer, overwrite=overwrite)


def orbax_to_hf(our_dir: str, hf_dir: str, *, lora_dir: str | None = None) -> str:
    """Export our layout to a transformers checkpoint directory.

    LM-head models become the causal LM; scalar-head (reward / value) models the
    ``*ForSequenceClassification`` whose logit is the score normalized with the ``reward_norm``
    in ``extra.json`` (see ``rlhf_jax.models.hf``). Weights are written as float32 safetensors
    beside config.json (and the tokenizer, if ``our_dir`` has one). Returns the absolute
    ``hf_dir``.

    ``lora_dir``: export ``our_dir`` (then the LoRA run's base, ours or a transformers
    directory) with those adapters merged in, as ``merge_lora`` would store it.
    """
    if lora_dir is not None:
        model, params, tokenizer, extra = merged_lora_model(our_dir, lora_dir)
    else:
        model, params, tokenizer = load_our_checkpoint(our_dir)
        extra = None
    reward_norm = None
    if model.config.head == "scalar":
        reward_norm = (read_extra(our_dir) if extra is None else extra).get("reward_norm") or None
        log.info("%s: exporting a scalar-head model; reward normalization %s", our_dir,
                 reward_norm or "none")
    return save_pretrained(hf_dir, model, params, tokenizer, reward_norm=reward_norm)


# --- LoRA merge --------------------------------------------------------------------------------

LORA_META_FILE = "lora.json"
LORA_ADAPTERS_DIR = "adapters"


def merge_lora(base_dir: str, lora_dir: str, out_dir: str, *, overwrite: bool = False) -> str:
    """Write ``base_dir``'s model with the adapters of ``lora_dir`` merged in (``apply_lora``
    with ``lora.json``'s scale) to ``out_dir`` in our layout; ``orbax_to_hf`` then exports it.

    ``base_dir`` is the model the LoRA run started from (its ``policy_from``, recorded as
    ``base`` in lora.json): our layout or a transformers directory. The tokenizer and
    ``extra.json`` facts of the base are kept; the LoRA facts are added. The result is the
    PPO run's own ``model/`` when the base is stored in the parameter dtype the run used (the
    merge rounds to the base's dtype, as training does). Returns the absolute ``out_dir``.
    """
    model, params, tokenizer, extra = merged_lora_model(base_dir, lora_dir)
    return save_our_checkpoint(out_dir, model, params, tokenizer, extra=extra,
                               overwrite=overwrite)


def merged_lora_model(base_dir: str, lora_dir: str) -> tuple[Transformer, Any, Any, dict]:
    """``model, params, tokenizer, extra`` of ``base_dir`` with ``lora_dir``'s adapters merged.

    The base is loaded in the adapters' layout (stacked ``layers`` under scan_layers or not),
    whatever layout it was saved in; merged kernels keep the base's dtype, as in training.
    """
    base_dir, lora_dir = _local_dir(base_dir), _local_dir(lora_dir)
    ours = is_our_checkpoint(base_dir)
    if not ours and not _exists(os.path.join(base_dir, "config.json")):
        raise UserError(f"{base_dir}: not a model directory; the LoRA base must be an rlhf_jax "
                        f"model ({MODEL_CONFIG_FILE} + {PARAMS_DIR}/) or a transformers "
                        "checkpoint (config.json + *.safetensors)")
    meta = read_lora_meta(lora_dir)
    adapters_dir = os.path.join(lora_dir, LORA_ADAPTERS_DIR)
    saved = _saved_adapter_shapes(adapters_dir)
    stacked = "layers" in saved
    if ours:
        model, params, tokenizer = load_our_checkpoint(base_dir, scan_layers=stacked)
        extra = read_extra(base_dir)
    else:
        model, params, tokenizer = from_pretrained(base_dir, scan_layers=stacked)
        extra = {}
    recorded = meta.get("base")
    if isinstance(recorded, str) and recorded and _local_dir(recorded) != base_dir:
        log.warning("%s: the adapters were trained on %s; merging them into %s",
                    os.path.join(lora_dir, LORA_META_FILE), recorded, base_dir)

    _check_adapter_shapes(saved, params, adapters_dir, base_dir)
    single = SingleDeviceSharding(jax.local_devices()[0])
    adapters = load_pytree(adapters_dir, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=single), saved))
    merged = apply_lora(params, LoRA(adapters, meta["scale"]))
    rank = jax.tree.leaves(saved)[0].shape[-1]
    extra = {**extra, "lora_rank": rank, "lora_alpha": meta.get("alpha"),
             "lora_scale": meta["scale"], "lora_targets": meta.get("targets"),
             "lora_merged": True, "lora_dir": lora_dir}
    return model, merged, tokenizer, extra


def read_lora_meta(lora_dir: str) -> dict:
    """``lora_dir/lora.json``, checked to hold a numeric ``scale`` and to sit beside
    ``adapters/``."""
    lora_dir = _local_dir(lora_dir)
    meta_path = os.path.join(lora_dir, LORA_META_FILE)
    layout = (f"a LoRA directory holds {LORA_META_FILE} and {LORA_ADAPTERS_DIR}/ (PPO writes it "
              "as <workdir>/lora when ppo.lora.rank > 0)")
    if not _exists(meta_path):
        raise UserError(f"{meta_path}: missing; {layout}")
    try:
        meta = json.loads(_read_text(meta_path))
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object with rank, alpha, scale, targets; "
                        f"got {type(meta).__name__}")
    scale = meta.get("scale")
    # bool is an int to Python but never a meaningful scale.
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise UserError(f"{meta_path}: 'scale' must be a number (alpha / rank); got {scale!r}")
    if not _exists(os.path.join(lora_dir, LORA_ADAPTERS_DIR)):
        raise UserError(f"{os.path.join(lora_dir, LORA_ADAPTERS_DIR)}: missing; {layout}")
    return dict(meta, scale=float(scale))


def _saved_adapter_shapes(adapters_dir: str) -> dict:
    """The saved adapter tree as ShapeDtypeStructs, read from orbax's metadata: no arrays, and
    no dependence on the device topology the adapters were saved from (a restore without a
    target would need the saving run's devices)."""
    import orbax.checkpoint as ocp
    expected = "expected the orbax pytree of A and B that a LoRA run saves"
    checkpointer = ocp.StandardCheckpointer()
    try:
        item = checkpointer.metadata(adapters_dir).item_metadata
    except (OSError, ValueError) as e:
        raise UserError(f"{adapters_dir}: unreadable ({' '.join(str(e).split())}); "
                        f"{expected}") from e
    finally:
        checkpointer.close()

    def plain(node: Any) -> Any:
        if hasattr(node, "items"):
            return {key: plain(child) for key, child in node.items()}
        if not hasattr(node, "shape") or not hasattr(node, "dtype"):
            raise UserError(f"{adapters_dir}: holds {type(node).__name__} where arrays belong; "
                            f"{expected}")
        return jax.ShapeDtypeStruct(tuple(node.shape), node.dtype)

    if item is None:   # orbax only warns about a directory that is no checkpoint
        raise UserError(f"{adapters_dir}: no orbax checkpoint metadata; {expected}")
    tree = plain(item)
    if not tree:
        raise UserError(f"{adapters_dir}: an empty tree; {expected}")
    return tree


def _adapter_paths(tree: dict, where: str, path: tuple[str, ...] = ()) -> dict:
    """``{module path: {"a": shape, "b": shape}}`` of an adapter tree (``where`` names it)."""
    out = {}
    for key, child in tree.items():
        child_path = path + (key,)
        if not isinstance(child, dict):
            raise UserError(f"{where}: unexpected array at {'/'.join(child_path)}; expected "
                            "{a, b} pairs under the projection modules (e.g. layer_0/attn/q/a)")
        if set(child) == {"a", "b"}:
            out[child_path] = {k: tuple(v.shape) for k, v in child.items()}
        else:
            out.update(_adapter_paths(child, where, child_path))
    return out


def _check_adapter_shapes(saved: dict, params: Any, adapters_dir: str, base_dir: str) -> None:
    """Each saved adapter must be one ``init_lora`` would make on this base at its rank:
    an adapter trained on another model is refused in one line naming the first mismatch."""
    got = _adapter_paths(saved, adapters_dir)
    names = {path[-1] for path in got}
    unknown = sorted(names - set(ALL_TARGETS))
    if unknown:
        raise UserError(f"{adapters_dir}: adapters on {unknown}, which are not LoRA targets; "
                        f"expected some of {list(ALL_TARGETS)}")
    ranks = {shapes["a"][-1] for shapes in got.values()}
    if len(ranks) != 1:
        raise UserError(f"{adapters_dir}: adapters of ranks {sorted(ranks)}; expected one rank")
    rank = ranks.pop()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    try:
        expected = jax.eval_shape(
            lambda key: init_lora(abstract, key, rank, 1.0, tuple(sorted(names))),
            jax.random.key(0)).adapters
    except ValueError as e:   # no kernel of these targets in the base
        raise UserError(f"{adapters_dir}: do not fit the base model {base_dir}: "
                        f"{' '.join(str(e).split())}") from e
    want = _adapter_paths(expected, "init_lora")
    for path, shapes in sorted(got.items()):
        name = "/".join(path)
        if path not in want:
            raise UserError(f"{adapters_dir}: adapter {name} has no kernel to adapt in the base "
                            f"model {base_dir}; expected adapters trained on this base")
        if shapes != want[path]:
            raise UserError(f"{adapters_dir}: adapter {name} has A {shapes['a']} and B "
                            f"{shapes['b']}, but the base model {base_dir} needs A "
                            f"{want[path]['a']} and B {want[path]['b']}; expected adapters "
                            "trained on this base")
