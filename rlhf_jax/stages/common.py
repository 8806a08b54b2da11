"""What every stage's loop needs around its jitted step: mesh, models, evaluation, resume.

The loops themselves stay in their stage modules, readable top to bottom; this module holds the
small pieces they share so that each is written once.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax.convert import is_our_checkpoint, load_our_checkpoint, read_extra, read_model_config
from rlhf_jax.config import model_config_from
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.hf import config_from_hf, from_pretrained, load_tokenizer, read_hf_config
from rlhf_jax.models.params import init_params
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.optim import make_lr_schedule, make_optimizer
from rlhf_jax.sharding import make_mesh, replicated_fraction, shard_batch

log = logging.getLogger(__name__)


def enable_compilation_cache(directory: str) -> None:
    """Persist compiled executables under ``directory`` (JAX's persistent compilation cache).

    Stages that compile the same step (SFT and SFT-ptx, PPO and PPO-ptx, every sampler) and a
    re-run of a pipeline then load executables instead of compiling them again.
    """
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def setup_mesh(cfg: Any) -> Mesh:
    mesh = make_mesh(tuple(cfg.mesh.shape))
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
             jax.process_count())
    return mesh


def runtime_overrides(cfg: Any) -> dict[str, Any]:
    """Model fields a stage may change at load time (not the architecture)."""
    run = cfg.get("model_runtime", {}) or {}
    return {k: v for k, v in dict(run).items() if v is not None}


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


def optimizer_from(opt_cfg: Any, total_steps: int):
    """(optimizer, schedule) from a config section with lr, warmup, decay, b1, b2, ..."""
    schedule = make_lr_schedule(opt_cfg.lr, total_steps, warmup_steps=opt_cfg.get("warmup_steps", 0),
                                decay=opt_cfg.get("decay", "cosine"),
                                final_fraction=opt_cfg.get("final_fraction", 0.1),
                                warmup_start_fraction=opt_cfg.get("warmup_start_fraction", 0.0))
    optimizer = make_optimizer(schedule, b1=opt_cfg.get("b1", 0.9), b2=opt_cfg.get("b2", 0.95),
                               eps=opt_cfg.get("eps", 1e-8),
                               weight_decay=opt_cfg.get("weight_decay", 0.0),
                               grad_clip_norm=opt_cfg.get("grad_clip_norm", None) or None)
    return optimizer, schedule


def evaluate(eval_fn: Callable, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
             mesh: Mesh, weight_key: str) -> dict[str, float]:
    """Average ``eval_fn`` metrics over host batches, weighting each by ``metrics[weight_key]``."""
    totals: dict[str, float] = {}
    weight_sum = 0.0
    for batch in batches:
        metrics = jax.device_get(eval_fn(params, shard_batch(batch, mesh)))
        w = float(metrics[weight_key])
        weight_sum += w
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * w
    return {k: v / max(weight_sum, 1e-9) for k, v in totals.items() if k != weight_key} | {
        weight_key: weight_sum}


def validate(eval_fn: Callable, params: Any, batches: list, mesh: Mesh, weight_key: str,
             writer: Any, step: int) -> dict[str, float]:
    """Validation metrics (prefixed ``valid/``), written at ``step``; {} without batches."""
    if not batches:
        return {}
    metrics = {f"valid/{k}": v for k, v in evaluate(eval_fn, params, batches, mesh, weight_key).items()}
    writer.write(step, metrics)
    return metrics


def train_log_row(metrics: Mapping[str, Any], lr: float, step: int, steps_per_epoch: int,
                  bar: Any) -> dict[str, float]:
    """The periodic ``train/`` metrics row of a supervised stage (blocks on ``metrics``)."""
    return as_float_dict(metrics, "train/") | {
        "train/lr": lr, "train/tokens_per_s": bar.tokens_per_second,
        "train/epoch": (step + 1) / steps_per_epoch}


def fixed_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Validation batches in order; the last one is topped up from the start (static shapes).

    Every process evaluates its own contiguous share of each batch.
    """
    n = len(next(iter(arrays.values())))
    n_batches = max(1, -(-n // batch_size))
    order = np.arange(n_batches * batch_size) % n
    per_process = batch_size // jax.process_count()
    lo = jax.process_index() * per_process
    out = []
    for b in range(n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size][lo:lo + per_process]
        out.append({k: v[idx] for k, v in arrays.items()})
    return out


def split_rows(rows: list, valid_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/validation split of a row list."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_valid = int(round(len(rows) * valid_fraction))
    if valid_fraction > 0:
        n_valid = max(1, n_valid)
    valid = [rows[i] for i in sorted(order[:n_valid])]
    train = [rows[i] for i in sorted(order[n_valid:])]
    return train, valid


def step_rng(seed: int, step: int) -> jax.Array:
    """The dropout/sampling key of a step: a pure function of (seed, step), so resume is exact."""
    return jax.random.fold_in(jax.random.key(seed), step)


def resume(checkpointer: ckpt_lib.Checkpointer, state: Any, iterators: Mapping[str, Any]):
    """Restore ``state`` and iterator positions from the latest checkpoint, if any."""
    step = checkpointer.latest_step()
    if step is None:
        return state, 0, {}
    restored, meta = checkpointer.restore(step, state)
    for name, it in iterators.items():
        if name in meta.get("iterators", {}):
            it.restore(meta["iterators"][name])
    log.info("resumed from %s at step %d", checkpointer.directory, step)
    return restored, int(step), meta


def iterator_states(iterators: Mapping[str, Any]) -> dict[str, Any]:
    return {name: it.state() for name, it in iterators.items()}


def tokens_in(batch: Mapping[str, np.ndarray], key: str = "attention_mask") -> int:
    """Real tokens in a host batch, summed over processes (assumes equal shares)."""
    return int(np.asarray(batch[key]).sum()) * jax.process_count()


def as_float_dict(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    return {prefix + k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
