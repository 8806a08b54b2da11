"""The supervised stages' loop and what SFT, the reward model and DPO share around it.

Optimizer, comparison rows and arrays, validation batches, metric rows, the run context and
:func:`supervised_loop`; PPO has its own loop. A helper module of ``stages/``, not a stage: the
stage modules import it and never each other.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import errors, locking, reliability, runtime, storage
from rlhf_jax.data import tokenize_comparisons
from rlhf_jax.data.sources import read_source, source_options
from rlhf_jax.metrics import MetricsWriter, ProgressBar, TraceWindow
from rlhf_jax.optim import current_lr, make_lr_schedule, make_optimizer
from rlhf_jax.sharding import shard_batch

log = logging.getLogger(__name__)


def optimizer_from(opt_cfg: Any, total_steps: int):
    """(optimizer, schedule) from a config section with lr, warmup, decay, b1, b2, ..."""
    schedule = make_lr_schedule(opt_cfg.lr, total_steps, warmup_steps=opt_cfg.warmup_steps,
                                decay=opt_cfg.decay, final_fraction=opt_cfg.final_fraction,
                                warmup_start_fraction=opt_cfg.warmup_start_fraction)
    optimizer = make_optimizer(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                               weight_decay=opt_cfg.weight_decay,
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


def comparison_rows(data: Any, seed: int) -> tuple[list, list]:
    """(train, validation) comparison rows of a stage's ``data`` section: ``data.valid`` when
    set, else a deterministic ``data.valid_fraction`` of ``data.train``. K-way rankings and
    TRL chosen/rejected pairs (K = 2) both come back as canonical K-way rows; the RM and DPO
    read the same files."""
    read = lambda spec: read_source(spec, "comparisons", max_k=data.max_k, **source_options(data))
    rows = read(data.train)
    if data.get("valid"):
        return rows, read(data.valid)
    return split_rows(rows, data.valid_fraction, seed)


def comparison_arrays(rows: list, tokenizer: Any, data: Any, max_k: int, keys: Sequence[str],
                      kind: str) -> dict[str, np.ndarray]:
    """``keys`` of the tokenized ``[N, max_k, T]`` comparisons (prompt left-padded to
    ``data.max_prompt_len``, so every response starts at that position), logging the
    truncation statistics under ``kind``."""
    arrays, stats = tokenize_comparisons(rows, tokenizer, data.max_prompt_len,
                                         data.max_response_len, max_k, data.overlong)
    log.info("%s %s", kind, stats)
    return {key: arrays[key] for key in keys}


@contextlib.contextmanager
def stage_run(cfg: Any, workdir: str):
    """What every supervised stage's loop runs inside: its outputs checked writable up front,
    the workdir locked against a second run, then ``(stack, preemption, mesh)``. The stack
    unwinds in reverse order on any exit: the bar is closed, pending checkpoint saves are
    committed (never left as *-tmp), the previous signal handlers come back, the lock goes."""
    reliability.check_writable(workdir, storage.join(workdir, "checkpoints"),
                               storage.join(workdir, "model"))
    with contextlib.ExitStack() as stack:
        stack.enter_context(locking.RunLock(workdir))
        preemption = stack.enter_context(reliability.Preemption())
        yield stack, preemption, runtime.setup_mesh(cfg)


def supervised_loop(cfg: Any, workdir: str, stack: Any, preemption: reliability.Preemption,
                    mesh: Mesh, program: Any, state: Any, iterators: Mapping[str, Any],
                    next_batch: Callable[[], Mapping[str, np.ndarray]], valid_batches: list,
                    steps_per_epoch: int, total_steps: int, *, weight_key: str, token_key: str,
                    postfix: Sequence[str]) -> tuple[Any, dict, dict, reliability.FiniteGuard]:
    """SFT's and the RM's loop: resume, train with the finite guard, log, validate, checkpoint,
    stop on preemption. Returns the state, the final validation metrics, the last step's
    metrics and the guard (for checks on what the stage computes after the loop).

    ``stack`` (an ExitStack) owns the checkpointer, writer and bar, so any exit commits pending
    saves and closes them.
    """
    name = cfg.get("name", "")
    train_step, eval_step = program.steps["train"].fn, program.steps["eval"].fn
    schedule = program.schedule
    checkpointer = stack.enter_context(ckpt_lib.Checkpointer(
        storage.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints))
    state, start_step, _ = reliability.resume(checkpointer, state, iterators, cfg)
    guard = reliability.FiniteGuard(name, ("loss", "grad_norm"), checkpointer)
    meta = lambda: reliability.checkpoint_meta(cfg, iterators)
    writer = stack.enter_context(MetricsWriter(workdir, config=cfg))
    writer.discard_after(start_step)

    bar = stack.enter_context(ProgressBar(total_steps, desc=name, initial=start_step))
    trace = TraceWindow(cfg.profile_steps, storage.join(workdir, "profile"))
    stack.callback(trace.close)
    if preemption.requested():
        raise errors.Preempted(preemption.signum)    # nothing done since the last checkpoint
    metrics: dict = {}
    for step in range(start_step, total_steps):
        trace.step(step)
        host_batch = next_batch()
        with jax.profiler.TraceAnnotation("train"):
            state, metrics = train_step(state, shard_batch(host_batch, mesh),
                                        runtime.step_rng(cfg.seed, step))
        guard.observe(step + 1, metrics)
        bar.update(tokens=tokens_in(host_batch, token_key))
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps:
            row = train_log_row(metrics, float(current_lr(schedule, step)), step, steps_per_epoch,
                                bar)
            writer.write(step + 1, row)
            bar.set_postfix(**{k.split("/")[-1]: row[k] for k in postfix})
            guard.check()
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < total_steps:
            validate(eval_step, state.params, valid_batches, mesh, weight_key, writer, step + 1)
        if (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < total_steps:
            reliability.save_checkpoint(checkpointer, step + 1, state, meta(), guard)
        reliability.stop_if_preempted(preemption, checkpointer, step + 1, state, meta, guard)
    bar.close()
    guard.check()
    guard.check_tree(total_steps, state.params, "params")
    final = validate(eval_step, state.params, valid_batches, mesh, weight_key, writer, total_steps)
    checkpointer.wait()
    return state, final, metrics, guard


def tokens_in(batch: Mapping[str, np.ndarray], key: str = "attention_mask") -> int:
    """Real tokens in a host batch, summed over processes (assumes equal shares)."""
    return int(np.asarray(batch[key]).sum()) * jax.process_count()


def as_float_dict(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    return {prefix + k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
