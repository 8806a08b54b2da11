"""The ``rlhf-jax convert`` command: transformers <-> our layout, and LoRA merges, on ``model_io``.

Every input and output directory may be local or a URL (``gs://``), as in ``model_io``.

``hf_to_orbax`` and ``orbax_to_hf`` back ``convert hf-to-jax`` / ``jax-to-hf``; reading and
writing the model directories themselves is :mod:`rlhf_jax.model_io`'s. ``merge_lora`` (and
``orbax_to_hf``'s ``lora_dir``) fold a LoRA run's adapters into its base model::

    lora_dir/               what PPO writes as <workdir>/lora with ppo.lora.rank > 0
        lora.json           {"rank", "alpha", "scale", "targets", "base", ...}
        adapters/           orbax pytree of A and B (rlhf_jax.models.lora.LoRA.adapters)
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, SingleDeviceSharding

from rlhf_jax import storage
from rlhf_jax.checkpoint import load_pytree, saved_structure
from rlhf_jax.errors import UserError
from rlhf_jax.model_io import (HF_LAYOUT, LORA_LAYOUT, MODEL_CONFIG_FILE, OUR_LAYOUT, PARAMS_DIR,
                               check_output_dir, is_our_checkpoint, load_model,
                               load_our_checkpoint, read_extra, read_json_object,
                               save_hf_checkpoint, save_our_checkpoint)
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.hf import (check_export_dtype, from_pretrained, parse_size,
                                resolve_model_path)
from rlhf_jax.models.lora import ALL_TARGETS, LoRA, apply_lora, init_lora
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sharding import as_auto_mesh, make_mesh

log = logging.getLogger(__name__)


def hf_to_orbax(hf_dir: str, out_dir: str, *, dtype: str = "float32", mesh: Mesh | None = None,
                overwrite: bool = False) -> str:
    """Convert a transformers checkpoint (config.json + safetensors) to our layout.

    ``dtype`` ("float32" or "bfloat16") is the stored parameter dtype and the compute dtype
    recorded in ``model_config.json``. ``out_dir`` must be new or empty unless ``overwrite``
    (then it is replaced whole). Returns the absolute ``out_dir``.
    """
    check_output_dir(out_dir, OUR_LAYOUT, overwrite=overwrite)
    mesh = as_auto_mesh(mesh)
    model, params, tokenizer = from_pretrained(hf_dir, mesh=mesh, dtype=jnp.dtype(dtype))
    return save_our_checkpoint(out_dir, model, params, tokenizer, overwrite=overwrite)


def orbax_to_hf(our_dir: str, hf_dir: str, *, lora_dir: str | None = None,
                overwrite: bool = False, dtype: str = "float32",
                max_shard_size: int | str = "2GB") -> str:
    """Export our layout to a transformers checkpoint directory.

    LM-head models become the causal LM; scalar-head (reward / value) models the
    ``*ForSequenceClassification`` whose logit is the score normalized with the ``reward_norm``
    in ``extra.json`` (see ``rlhf_jax.models.hf``). Weights are written in ``dtype`` (float32
    or bfloat16) as safetensors, sharded with ``model.safetensors.index.json`` past
    ``max_shard_size`` ("2GB"-style or bytes), beside config.json, ``generation_config.json``
    (an LM's bos / eos / pad ids and max_length), a README.md model card and the tokenizer, if
    ``our_dir`` has one. ``hf_dir`` must be new or empty unless ``overwrite`` (then it is
    replaced whole: safetensors of an earlier export left beside the new files would be read
    as part of the model). Returns the absolute ``hf_dir``.

    ``lora_dir``: export ``our_dir`` (then the LoRA run's base, ours or a transformers
    directory) with those adapters merged in, as ``merge_lora`` would store it.

    Process 0 alone fetches and writes, shard by shard. On several processes the model is
    restored sharded over all devices (fsdp), so no host holds more than its share plus the
    leaf being written (see ``save_pretrained``); with ``lora_dir`` the base is loaded whole on
    each process, as ``merge_lora`` does.
    """
    check_export_dtype(dtype)
    parse_size(max_shard_size)
    check_output_dir(hf_dir, HF_LAYOUT, overwrite=overwrite)
    our_dir = resolve_model_path(our_dir)
    if lora_dir is not None:
        model, params, tokenizer, extra = merged_lora_model(our_dir, lora_dir)
    else:
        mesh = make_mesh((1, -1, 1)) if jax.process_count() > 1 else None
        model, params, tokenizer = load_our_checkpoint(our_dir, mesh)
        extra = read_extra(our_dir)
    reward_norm = None
    if model.config.head == "scalar":
        reward_norm = extra.get("reward_norm") or None
        log.info("%s: exporting a scalar-head model; reward normalization %s", our_dir,
                 reward_norm or "none")
    card = model_card(our_dir, hf_dir, model.config, extra, dtype, lora_dir)
    return save_hf_checkpoint(hf_dir, model, params, tokenizer, reward_norm=reward_norm,
                              overwrite=overwrite, dtype=dtype, max_shard_size=max_shard_size,
                              readme=card)


def model_card(our_dir: str, hf_dir: str, cfg: TransformerConfig, extra: dict, dtype: str,
               lora_dir: str | None) -> str:
    """A short README.md for an export: what trained it, from what, and how to load it."""
    stage = extra.get("stage") or "unknown"
    scalar = cfg.head == "scalar"
    kind = "reward / value model (one score per sequence)" if scalar else "causal LM"
    if lora_dir:
        origin = f"rlhf_jax's LoRA adapters `{lora_dir}` merged into `{our_dir}`"
        base = our_dir
    else:
        origin = f"rlhf_jax's `{stage}` stage (`{our_dir}`)"
        base = _stage_base(our_dir)
    auto = "AutoModelForSequenceClassification" if scalar else "AutoModelForCausalLM"
    lines = ["---", "library_name: transformers", "tags:", "- rlhf_jax", f"- {stage}", "---", "",
             f"# {os.path.basename(hf_dir.rstrip('/')) or hf_dir}", "",
             f"A {cfg.arch} {kind} from {origin}, exported with `rlhf-jax convert jax-to-hf`.", "",
             f"- started from: `{base}`" if base else "- started from: not recorded",
             f"- size: {cfg.n_layers} layers, d_model {cfg.d_model}, vocabulary {cfg.vocab_size}, "
             f"context {cfg.max_position} tokens; weights in {dtype}"]
    if scalar:
        norm = extra.get("reward_norm")
        lines.append(f"- the logit is the normalized score (raw - mean) / std, reward_norm "
                     f"{json.dumps(norm, sort_keys=True)}" if norm else "- the logit is the raw score")
    lines += ["", "```python", f"from transformers import AutoTokenizer, {auto}", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{hf_dir}")',
              f'model = {auto}.from_pretrained("{hf_dir}")',
              'score = model(**tokenizer("text to score", return_tensors="pt")).logits[0, 0]'
              if scalar else
              'ids = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=32)',
              "```", ""]
    return "\n".join(lines)


def _stage_base(our_dir: str) -> str | None:
    """The model a stage started from (``init_from`` / ``policy_from``), from the one config a
    training command saves beside its ``model/`` (``<workdir>/config_<command>.json``)."""
    workdir = os.path.dirname(storage.absolute(our_dir).rstrip("/"))
    names = [n for n in storage.listdir(workdir) if n.startswith("config_") and n.endswith(".json")]
    if len(names) != 1:
        return None
    try:
        saved = read_json_object(storage.join(workdir, names[0]), "the command's config")
    except UserError:      # the card is only worse without it; the export itself is fine
        return None
    return saved.get("init_from") or saved.get("policy_from") or None


# --- LoRA merge --------------------------------------------------------------------------------

LORA_META_FILE = LORA_LAYOUT.marker
LORA_ADAPTERS_DIR = LORA_LAYOUT.first


def merge_lora(base_dir: str, lora_dir: str, out_dir: str, *, overwrite: bool = False) -> str:
    """Write ``base_dir``'s model with the adapters of ``lora_dir`` merged in (``apply_lora``
    with ``lora.json``'s scale) to ``out_dir`` in our layout; ``orbax_to_hf`` then exports it.

    ``base_dir`` is the model the LoRA run started from (its ``policy_from``, recorded as
    ``base`` in lora.json): our layout or a transformers directory. The tokenizer and
    ``extra.json`` facts of the base are kept; the LoRA facts are added. The result is the
    PPO run's own ``model/`` when the base is stored in the parameter dtype the run used (the
    merge rounds to the base's dtype, as training does). Returns the absolute ``out_dir``.
    """
    check_output_dir(out_dir, OUR_LAYOUT, overwrite=overwrite)
    model, params, tokenizer, extra = merged_lora_model(base_dir, lora_dir)
    return save_our_checkpoint(out_dir, model, params, tokenizer, extra=extra,
                               overwrite=overwrite)


def merged_lora_model(base_dir: str, lora_dir: str) -> tuple[Transformer, Any, Any, dict]:
    """``model, params, tokenizer, extra`` of ``base_dir`` with ``lora_dir``'s adapters merged.

    The base is loaded in the adapters' layout (stacked ``layers`` under scan_layers or not),
    whatever layout it was saved in; merged kernels keep the base's dtype, as in training.
    """
    base_dir, lora_dir = storage.absolute(resolve_model_path(base_dir)), storage.absolute(lora_dir)
    if not is_our_checkpoint(base_dir) and not storage.exists(storage.join(base_dir, "config.json")):
        raise UserError(f"{base_dir}: not a model directory; the LoRA base must be an rlhf_jax "
                        f"model ({MODEL_CONFIG_FILE} + {PARAMS_DIR}/) or a transformers "
                        "checkpoint (config.json + *.safetensors)")
    meta = read_lora_meta(lora_dir)
    adapters_dir = storage.join(lora_dir, LORA_ADAPTERS_DIR)
    saved = saved_structure(adapters_dir, "the orbax pytree of A and B that a LoRA run saves")
    stacked = "layers" in saved
    model, params, tokenizer, extra = load_model(base_dir, None, scan_layers=stacked)
    recorded = meta.get("base")
    if isinstance(recorded, str) and recorded and storage.absolute(recorded) != base_dir:
        log.warning("%s: the adapters were trained on %s; merging them into %s",
                    storage.join(lora_dir, LORA_META_FILE), recorded, base_dir)

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
    lora_dir = storage.absolute(lora_dir)
    meta_path = storage.join(lora_dir, LORA_META_FILE)
    layout = (f"a LoRA directory holds {LORA_META_FILE} and {LORA_ADAPTERS_DIR}/ (PPO writes it "
              "as <workdir>/lora when ppo.lora.rank > 0)")
    if not storage.exists(meta_path):
        raise UserError(f"{meta_path}: missing; {layout}")
    meta = read_json_object(meta_path, "rank, alpha, scale, targets")
    scale = meta.get("scale")
    # bool is an int to Python but never a meaningful scale.
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise UserError(f"{meta_path}: 'scale' must be a number (alpha / rank); got {scale!r}")
    adapters_dir = storage.join(lora_dir, LORA_ADAPTERS_DIR)
    if not storage.exists(adapters_dir):
        raise UserError(f"{adapters_dir}: missing; {layout}")
    return dict(meta, scale=float(scale))


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
