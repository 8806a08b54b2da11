"""What keeps a run from being lost: resume, checkpoint saves, preemption, finite-value guards.

* :class:`Preemption`: SIGTERM / SIGINT finish the current step, save a checkpoint and raise
  :class:`~rlhf_jax.errors.Preempted`; the same command then resumes.
* :class:`FiniteGuard`: the first NaN / Inf loss or gradient norm stops the run with
  :class:`~rlhf_jax.errors.NonFiniteError`, and no non-finite state is ever checkpointed.
* :func:`resume`: the latest readable checkpoint (a damaged one is set aside with a warning),
  refusing one saved with a different config (see :data:`CONFIG_FIELDS_FREE_ON_RESUME`).
* :func:`check_writable`: an unwritable output fails before any work, naming the path.

Every stage's loop and the pipeline use these; they sit on ``checkpoint`` and ``errors`` only.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import errors, storage

log = logging.getLogger(__name__)


# --- resume ---------------------------------------------------------------------------------------

# Config fields that may differ between the run that saved a checkpoint and the one resuming it.
# They change how often things are logged or saved, or how the same numbers are computed, not
# the numbers: logging / evaluation / sampling / checkpoint cadence and retention, the stage's
# display name, the device mesh (a checkpoint restores onto any mesh), rematerialisation and
# log-prob chunking (memory knobs), the experiment tracker (a resumed W&B run logs only new
# steps; TensorBoard purges the replayed ones), and ``allow_config_change`` itself. Paths
# (data, init_from, tokenizer, ...) do count: a changed path may hold other data, and there is
# no cheap way to tell a moved file from a different one; ``allow_config_change`` covers a
# moved workdir.
CONFIG_FIELDS_FREE_ON_RESUME = frozenset({
    "allow_config_change", "tracker", "name", "mesh.shape", "model_runtime.remat",
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


def iterator_states(iterators: Mapping[str, Any]) -> dict[str, Any]:
    return {name: it.state() for name, it in iterators.items()}


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


# --- signals --------------------------------------------------------------------------------------

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

def check_writable(*paths: str, recursive: bool = True) -> None:
    """Fail at once, naming the path, if a stage could not write its outputs there.

    Each local path that exists is probed with a real file (``os.access`` is wrong for root and
    read-only mounts), and with ``recursive`` so is every directory below it (a save replaces
    or rotates them); a path that does not exist yet is probed at its nearest existing parent.
    A URL is probed by writing and deleting an object under it, once per bucket: an object
    store grants writes (and the deletes checkpoint rotation needs) per bucket, and has no
    directories to walk.
    """
    probed_buckets: set[str] = set()
    for path in paths:
        if storage.is_url(path):
            bucket = "/".join(str(path).split("/", 3)[:3])          # gs://bucket
            if bucket not in probed_buckets:
                _probe_url(str(path))
                probed_buckets.add(bucket)
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


def _probe_url(url: str) -> None:
    probe = storage.join(url, f".rlhf_jax-write-test-{uuid.uuid4().hex[:12]}")
    try:
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except Exception as error:   # gcsfs / the store's client raise many types
        raise errors.UserError(
            f"{url}: not writable ({type(error).__name__}: {_one_line(error)}); check that the "
            "bucket exists and that these credentials may create and delete objects in it, or "
            "use another --workdir") from error
