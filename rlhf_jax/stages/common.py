"""What every stage's loop needs around its jitted step: mesh, models, evaluation, resume.

The loops themselves stay in their stage modules, readable top to bottom; this module holds the
small pieces they share so that each is written once, among them what keeps a run from being
lost:

* :class:`Preemption`: SIGTERM / SIGINT finish the current step, save a checkpoint and raise
  :class:`~rlhf_jax.errors.Preempted`; the same command then resumes.
* :class:`FiniteGuard`: the first NaN / Inf loss or gradient norm stops the run with
  :class:`~rlhf_jax.errors.NonFiniteError`, and no non-finite state is ever checkpointed.
* :func:`resume`: the latest readable checkpoint (a damaged one is set aside with a warning),
  refusing one saved with a different config (see :data:`CONFIG_FIELDS_FREE_ON_RESUME`).
* :func:`check_writable`: an unwritable output fails before any work, naming the path.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import errors
from rlhf_jax.convert import is_our_checkpoint, load_our_checkpoint, read_extra, read_model_config
from rlhf_jax.config import model_config_from
from rlhf_jax.data import tokenize_comparisons
from rlhf_jax.data.sources import read_source
from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.models.hf import config_from_hf, from_pretrained, load_tokenizer, read_hf_config
from rlhf_jax.models.params import init_params
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.metrics import MetricsWriter, ProgressBar
from rlhf_jax.optim import current_lr, make_lr_schedule, make_optimizer
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


# XLA:CPU spends most of a step's compile time in LLVM; at -O1 instead of -O2 the PPO steps of
# the speed benchmark compiled 15-20% faster (experience: 2.4 s -> 1.3 s) and ran within noise
# of -O2 (bench/ppo_speed.py workload, 3 alternating pairs on a 2-core EPYC).
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def compile_ahead(program: Any, names: Sequence[str]) -> dict[str, Any]:
    """Start lowering and compiling ``program``'s steps ``names`` on worker threads.

    Returns ``{name: Future}`` of ``jax.stages.Compiled`` executables. The stage meanwhile
    restores weights and reads data, and XLA compiles the steps side by side (it releases the
    GIL), instead of one after the other inside the first iteration. A loop that calls these
    executables cannot recompile: a changed shape or sharding is an error, not a silent compile.
    """
    import concurrent.futures

    options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="compile")
    futures = {name: pool.submit(lambda step: step.lower().compile(compiler_options=options),
                                 program.steps[name]) for name in names}
    pool.shutdown(wait=False)
    return futures


class SideThread:
    """Runs jobs on one extra thread where that buys compute, else inline at ``submit``.

    On a CPU backend JAX runs an executable on the calling thread, so two independent programs
    called from one thread use one core at a time; from two threads they use two. Accelerators
    queue programs asynchronously anyway, and a multi-process run must launch its programs in
    the same order on every process, so there (and when ``enabled`` is False) a job runs at once.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = jax.default_backend() == "cpu" and jax.process_count() == 1
        self._pool = None
        if enabled:
            import concurrent.futures
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="side")

    def submit(self, fn: Callable, *args: Any):
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        import concurrent.futures
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(fn(*args))
        return done

    def __enter__(self) -> SideThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


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


def comparison_rows(data: Any, seed: int) -> tuple[list, list]:
    """(train, validation) comparison rows of a stage's ``data`` section: ``data.valid`` when
    set, else a deterministic ``data.valid_fraction`` of ``data.train``. K-way rankings and
    TRL chosen/rejected pairs (K = 2) both come back as canonical K-way rows; the RM and DPO
    read the same files."""
    read = lambda spec: read_source(spec, "comparisons", data_dir=data.get("tfds_data_dir"),
                                    field_map=data.get("field_map"), max_k=data.max_k)
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


def step_rng(seed: int, step: int) -> jax.Array:
    """The dropout/sampling key of a step: a pure function of (seed, step), so resume is exact."""
    return jax.random.fold_in(jax.random.key(seed), step)


# --- resume ------------------------------------------------------------------------------------

# Config fields that may differ between the run that saved a checkpoint and the one resuming it.
# They change how often things are logged or saved, or how the same numbers are computed, not
# the numbers: logging / evaluation / sampling / checkpoint cadence and retention, the stage's
# display name, the device mesh (a checkpoint restores onto any mesh), rematerialisation and
# log-prob chunking (memory knobs), and ``allow_config_change`` itself. Paths (data, init_from,
# tokenizer, ...) do count: a changed path may hold other data, and there is no cheap way to
# tell a moved file from a different one; ``allow_config_change`` covers a moved workdir.
CONFIG_FIELDS_FREE_ON_RESUME = frozenset({
    "allow_config_change", "name", "mesh.shape", "model_runtime.remat",
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.logprob_chunk",
    "ppo.sample_every", "ppo.n_samples_logged", "ppo.checkpoint_every", "ppo.logprob_chunk",
})


def config_dict(cfg: Any) -> dict:
    """``cfg`` as plain JSON data (tuples become lists), as stored in checkpoint meta."""
    if cfg is None:
        return {}
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.loads(json.dumps(data, default=str))


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: Mapping, current: Mapping) -> list[str]:
    """``"field (checkpoint X, now Y)"`` for every field that differs, free fields excluded.

    Fields only one side has (added or removed by a code update since the checkpoint) are not
    compared, except a section that is empty on one side and filled on the other.
    """
    a, b = _flatten(saved), _flatten(current)
    short = lambda v: r if len(r := repr(v)) <= 60 else r[:57] + "..."
    diffs = [f"{key} (checkpoint {short(a[key])}, now {short(b[key])})"
             for key in sorted(set(a) & set(b))
             if key not in CONFIG_FIELDS_FREE_ON_RESUME and a[key] != b[key]]
    for empty_side, one, other in (("checkpoint", a, b), ("now", b, a)):
        for key in sorted(k for k, v in one.items() if v == {} and k not in other):
            filled = short({k: v for k, v in other.items() if k.startswith(key + ".")})
            if filled != "{}" and key not in CONFIG_FIELDS_FREE_ON_RESUME:
                saved_text, now_text = ("{}", filled) if empty_side == "checkpoint" else (filled, "{}")
                diffs.append(f"{key} (checkpoint {saved_text}, now {now_text})")
    return diffs


def _check_resume_config(cfg: Any, meta: Mapping, where: str) -> None:
    if cfg is None:
        return
    if "config" not in meta:
        log.info("%s: the checkpoint stores no config (written before configs were stored); "
                 "not comparing", where)
        return
    diffs = config_differences(meta["config"], config_dict(cfg))
    if not diffs:
        return
    if cfg.get("allow_config_change", False):
        log.warning("%s: resuming with a changed config (allowed): %s", where, "; ".join(diffs))
        return
    raise errors.ConfigError(
        f"{where}: the config differs from the one this checkpoint was saved with: "
        f"{'; '.join(diffs)}; rerun with the checkpoint's values, use a new --workdir, or pass "
        "--allow_config_change to resume anyway")


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def resume(checkpointer: ckpt_lib.Checkpointer, state: Any, iterators: Mapping[str, Any],
           cfg: Any = None):
    """``(state, step, meta)`` from the latest readable checkpoint; ``(state, 0, {})`` if none.

    A checkpoint that cannot be read (truncated or missing files) is set aside with a warning
    and the previous one is tried; when none can be read, a one-line UserError names the
    directory. With ``cfg``, a checkpoint saved with a different config (beyond
    :data:`CONFIG_FIELDS_FREE_ON_RESUME`) raises ConfigError unless ``cfg.allow_config_change``.
    """
    steps = checkpointer.all_steps()
    if not steps:
        return state, 0, {}
    failures: list[str] = []
    for step in reversed(steps):
        where = f"{checkpointer.directory} (step {step})"
        try:
            meta = checkpointer.read_meta(step)
        except Exception as error:  # orbax / tensorstore raise many types for damaged files
            failures.append(f"step {step}: {type(error).__name__}: {_one_line(error)}")
            log.warning("checkpoint %s cannot be read (%s); trying an earlier one", where,
                        failures[-1])
            continue
        _check_resume_config(cfg, meta, where)
        try:
            restored, meta = checkpointer.restore(step, state)
        except Exception as error:
            failures.append(f"step {step}: {type(error).__name__}: {_one_line(error)}")
            log.warning("checkpoint %s cannot be restored (%s); trying an earlier one", where,
                        failures[-1])
            continue
        for name, it in iterators.items():
            if name in meta.get("iterators", {}):
                try:
                    it.restore(meta["iterators"][name])
                except ValueError as error:
                    raise errors.ConfigError(f"{where}: data iterator {name!r}: "
                                             f"{_one_line(error, 300)}") from error
        for damaged in steps[steps.index(step) + 1:]:
            # Out of the rotation: otherwise saving this step again would be skipped.
            moved = checkpointer.set_aside(damaged)
            log.warning("set the unreadable checkpoint of step %d aside%s", damaged,
                        f" as {moved}" if moved else "")
        log.info("resumed from %s at step %d", checkpointer.directory, step)
        return restored, int(step), meta
    raise errors.UserError(
        f"{checkpointer.directory}: no checkpoint can be restored ({'; '.join(failures)}); "
        "move the directory away to start from scratch")


def checkpoint_meta(cfg: Any, iterators: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """What a checkpoint stores beside the state: iterator positions, the config, ``extra``."""
    return {"iterators": iterator_states(iterators), "config": config_dict(cfg), **extra}


def save_checkpoint(checkpointer: ckpt_lib.Checkpointer, step: int, state: Any, meta: dict,
                    guard: FiniteGuard) -> bool:
    """Save ``state`` as checkpoint ``step`` only if every step so far and the state itself are
    finite (raises NonFiniteError otherwise), so a NaN state never rotates out a good one."""
    guard.check()
    guard.check_tree(step, state)
    return checkpointer.save(step, state, meta, force=True)


def stop_if_preempted(preemption: Preemption, checkpointer: ckpt_lib.Checkpointer, step: int,
                      state: Any, meta: Callable[[], dict], guard: FiniteGuard) -> None:
    """After a step: if SIGTERM / SIGINT arrived, checkpoint ``step`` (unless it is the one on
    disk already), wait until it is written, and raise Preempted. Call it at the same point on
    every process."""
    if not preemption.requested():
        return
    checkpointer.wait()
    if step not in checkpointer.all_steps():
        save_checkpoint(checkpointer, step, state, meta(), guard)
        checkpointer.wait()
    log.warning("%s: checkpoint of step %d saved in %s; stopping", preemption.name, step,
                checkpointer.directory)
    raise errors.Preempted(preemption.signum)


# --- signals ------------------------------------------------------------------------------------

class Preemption:
    """Context manager turning SIGTERM / SIGINT into a request to stop after the current step.

    The first signal only sets :attr:`signum` (the loop checks :meth:`requested` after every
    step, checkpoints and raises Preempted); a second one raises Preempted at once, for a
    person who does not want to wait. The previous handlers come back on exit. A signal that
    arrives after the loop (the final evaluation and save run to the end) is passed on to an
    enclosing Preemption (the pipeline's, which then stops before the next stage), else only
    logged. Outside the main thread Python cannot install handlers; the guard is then inert.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "no signal"

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self.signum is not None and exc_type is None:
            outer = getattr(self._previous.get(self.signum), "__self__", None)
            if isinstance(outer, Preemption):
                outer.record(self.signum)
            else:
                log.warning("%s arrived after the last step; the outputs were finished anyway",
                            self.name)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise errors.Preempted(signum, f"stopped by a second {signal.Signals(signum).name} "
                                   "without checkpointing the current step; run the same command "
                                   "again to resume from the last checkpoint")
        self.record(signum)
        log.warning("%s received: finishing the current step, then saving a checkpoint "
                    "(send it again to stop at once)", self.name)

    def record(self, signum: int) -> None:
        if self.signum is None:
            self.signum = int(signum)

    def requested(self) -> bool:
        """Whether a stop was requested on any process (a collective on multi-host runs)."""
        if jax.process_count() == 1:
            return self.signum is not None
        from jax.experimental import multihost_utils
        signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
        if self.signum is None and np.max(signums) > 0:
            self.signum = int(np.max(signums))
        return self.signum is not None


# --- finite-value guard ---------------------------------------------------------------------------

@jax.jit
def _first_non_finite(first: tuple, step: jax.Array, values: list) -> tuple:
    """(step, metric index, value) of the first non-finite value seen; step -1 while none."""
    first_step, first_index, first_value = first
    stacked = jnp.stack([jnp.asarray(v, jnp.float32).reshape(()) for v in values])
    bad = ~jnp.isfinite(stacked)
    index = jnp.argmax(bad).astype(jnp.int32)
    new = (first_step < 0) & jnp.any(bad)
    return (jnp.where(new, step, first_step), jnp.where(new, index, first_index),
            jnp.where(new, stacked[index], first_value))


@jax.jit
def _leaves_finite(leaves: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


class FiniteGuard:
    """Stops a stage at the first NaN / Inf loss, gradient norm or parameter.

    :meth:`observe` folds a step's scalar metrics into a small device-side record of the first
    non-finite one, so the check costs no host sync per step; :meth:`check` fetches it (call it
    where the loop syncs anyway: at logging steps, before a checkpoint, at the end) and raises
    NonFiniteError naming the stage, step and metric. :meth:`check_values` does the same for
    values already on the host, :meth:`check_tree` for every floating leaf of a state (before
    each save). The last finite checkpoint stays on disk.
    """

    def __init__(self, stage: str, names: Sequence[str] = (),
                 checkpointer: ckpt_lib.Checkpointer | None = None) -> None:
        self.stage = stage
        self.names = tuple(names)
        self.checkpointer = checkpointer
        self._first: tuple | None = None

    def observe(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = [metrics[name] for name in self.names]
        if self._first is None:
            # Committed like the metrics, so the second call hits the first call's executable.
            sharding = getattr(values[0], "sharding", None)
            init = (np.int32(-1), np.int32(-1), np.float32(0))
            self._first = tuple(jax.device_put(x, sharding) for x in init)
        self._first = _first_non_finite(self._first, np.int32(step), values)

    def check(self) -> None:
        if self._first is None:
            return
        step, index, value = (x.item() for x in jax.device_get(self._first))
        if step >= 0:
            self._raise(step, self.names[index], value)

    def check_values(self, step: int, values: Mapping[str, Any]) -> None:
        for name, value in values.items():
            array = np.asarray(value, np.float64)
            if not np.all(np.isfinite(array)):
                self._raise(step, name, array[~np.isfinite(array)].flat[0])

    def check_tree(self, step: int, tree: Any, what: str = "state") -> None:
        paths, leaves = [], []
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
                paths.append(path)
                leaves.append(leaf)
        if not leaves:
            return
        finite = np.asarray(jax.device_get(_leaves_finite(leaves)))
        if not finite.all():
            bad = paths[int(np.argmin(finite))]
            self._raise(step, f"{what}/{jax.tree_util.keystr(bad, simple=True, separator='/')}"
                        if bad else what, None)

    def _raise(self, step: int, metric: str, value: Any) -> None:
        shown = f" ({value})" if value is not None else " (NaN/Inf)"
        latest = None if self.checkpointer is None else self.checkpointer.latest_step()
        if latest is None:
            then = "no checkpoint had been saved yet; lower the learning rate and rerun"
        else:
            then = (f"the last finite checkpoint, step {latest} in {self.checkpointer.directory}, "
                    "is kept; lower the learning rate, then rerun with a new --workdir or resume "
                    "from it with --allow_config_change")
        raise errors.NonFiniteError(f"{self.stage}: step {step}: non-finite {metric}{shown}; "
                                    f"stopped without saving that state; {then}")


# --- outputs --------------------------------------------------------------------------------------

@contextlib.contextmanager
def stage_run(cfg: Any, workdir: str):
    """What every supervised stage's loop runs inside: its outputs checked writable up front,
    then ``(stack, preemption, mesh)``. The stack unwinds in reverse order on any exit: the bar
    is closed, pending checkpoint saves are committed (never left as *-tmp), the previous
    signal handlers come back."""
    check_writable(workdir, os.path.join(workdir, "checkpoints"), os.path.join(workdir, "model"))
    with contextlib.ExitStack() as stack:
        preemption = stack.enter_context(Preemption())
        yield stack, preemption, setup_mesh(cfg)


def check_writable(*paths: str, recursive: bool = True) -> None:
    """Fail at once, naming the path, if a stage could not write its outputs there.

    Each path that exists is probed with a real file (``os.access`` is wrong for root and
    read-only mounts), and with ``recursive`` so is every directory below it (a save replaces
    or rotates them); a path that does not exist yet is probed at its nearest existing parent.
    """
    for path in paths:
        if "://" in str(path):
            continue
        path = os.path.abspath(path)
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise errors.UserError(f"{probe}: exists and is not a directory; expected an output "
                                   "directory there")
        dirs = [probe]
        if probe == path and recursive:
            dirs += [os.path.join(root, d) for root, names, _ in os.walk(path) for d in names]
        for directory in dirs:
            try:
                fd, name = tempfile.mkstemp(dir=directory, prefix=".rlhf_jax-write-test-")
                os.close(fd)
                os.remove(name)
            except OSError as error:
                raise errors.UserError(
                    f"{directory}: not writable ({error.strerror or error}); fix its "
                    "permissions or use another --workdir") from error


def supervised_loop(cfg: Any, workdir: str, stack: Any, preemption: "Preemption", mesh: Mesh,
                    program: Any, state: Any, iterators: Mapping[str, Any],
                    next_batch: Callable[[], Mapping[str, np.ndarray]], valid_batches: list,
                    steps_per_epoch: int, total_steps: int, *, weight_key: str, token_key: str,
                    postfix: Sequence[str]) -> tuple[Any, dict, dict, "FiniteGuard"]:
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
        os.path.join(workdir, "checkpoints"), max_to_keep=cfg.train.get("keep_checkpoints", 2)))
    state, start_step, _ = resume(checkpointer, state, iterators, cfg)
    guard = FiniteGuard(name, ("loss", "grad_norm"), checkpointer)
    meta = lambda: checkpoint_meta(cfg, iterators)
    writer = stack.enter_context(MetricsWriter(workdir))
    writer.discard_after(start_step)

    bar = stack.enter_context(ProgressBar(total_steps, desc=name, initial=start_step))
    if preemption.requested():
        raise errors.Preempted(preemption.signum)    # nothing done since the last checkpoint
    metrics: dict = {}
    for step in range(start_step, total_steps):
        host_batch = next_batch()
        state, metrics = train_step(state, shard_batch(host_batch, mesh), step_rng(cfg.seed, step))
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
            save_checkpoint(checkpointer, step + 1, state, meta(), guard)
        stop_if_preempted(preemption, checkpointer, step + 1, state, meta, guard)
    bar.close()
    guard.check()
    guard.check_tree(total_steps, state.params, "params")
    final = validate(eval_step, state.params, valid_batches, mesh, weight_key, writer, total_steps)
    checkpointer.wait()
    return state, final, metrics, guard


def iterator_states(iterators: Mapping[str, Any]) -> dict[str, Any]:
    return {name: it.state() for name, it in iterators.items()}


def tokens_in(batch: Mapping[str, np.ndarray], key: str = "attention_mask") -> int:
    """Real tokens in a host batch, summed over processes (assumes equal shares)."""
    return int(np.asarray(batch[key]).sum()) * jax.process_count()


def as_float_dict(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    return {prefix + k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
