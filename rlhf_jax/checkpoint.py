"""Checkpointing on orbax-checkpoint: managed training checkpoints and one-off pytree files.

:class:`Checkpointer` keeps the last few training checkpoints of a stage. Each step directory
holds two items:

* ``state``: the training pytree (params, optimizer state, rng, step, ...), written with
  ``StandardSave`` so sharded jax arrays are saved shard by shard (no gather to one host);
* ``meta``: a JSON dict for everything else exact resumption needs (data-iterator positions,
  adaptive KL coefficient, the config as a dict).

Restoring takes a *target* pytree that fixes the shape, dtype and sharding of every array,
so a checkpoint can be restored onto a different mesh or partitioning than it was saved with.

Multi-host: every process must construct the same :class:`Checkpointer` and call ``save`` /
``restore`` / ``wait`` together (orbax synchronises the processes and each one writes its
own shards), and the directory must be on storage all hosts share (e.g. ``gs://``).

:func:`save_pytree` / :func:`load_pytree` store a single pytree outside any manager, for a
stage's final output (e.g. the SFT params handed to the reward model and PPO stages);
:func:`saved_structure` reads what such a pytree holds (shapes and dtypes) without its arrays.
A pytree that cannot be read (truncated, missing pieces) is a :class:`DamagedPytreeError`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from rlhf_jax import distributed, storage
from rlhf_jax.errors import UserError

PyTree = Any

_STATE_ITEM = "state"
_META_ITEM = "meta"

logger = logging.getLogger(__name__)


def abstract_like(tree: PyTree) -> PyTree:
    """Abstract version of ``tree``: ``jax.ShapeDtypeStruct`` leaves carrying the shardings.

    Leaves may be jax arrays (their sharding is kept), ``ShapeDtypeStruct`` (kept as is),
    numpy arrays (no sharding: they are restored as numpy arrays) or Python scalars (kept as
    values; orbax restores scalars as saved). Typed PRNG keys are described by their key data;
    orbax's stored metadata turns them back into typed keys on restore.
    """
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)



def _check_json_serialisable(meta: dict) -> None:
    """Fail in the caller's frame, before an async save starts, if ``meta`` is not JSON."""
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {error}") from error


class Checkpointer:
    """Rolling training checkpoints of ``{"state": pytree, "meta": json dict}`` per step.

    Args:
        directory: where step subdirectories live; created if missing.
        max_to_keep: number of most recent checkpoints kept on disk (older ones are deleted).
        save_interval_steps: ``save`` only writes when ``step`` is a multiple of this,
            unless ``force=True``.
        async_save: write in a background thread (orbax's default). The device-to-host copy
            happens before ``save`` returns, so the caller may keep updating (or donating) the
            state; call :meth:`wait` before reading the files or exiting.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ) -> None:
        # orbax requires absolute local paths.
        self.directory = storage.absolute(directory)
        storage.makedirs(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
            # A kill mid-save leaves a "<step>.orbax-checkpoint-tmp-*" directory; orbax never
            # lists it as a step, and removing it here keeps the directory tidy.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=(_STATE_ITEM, _META_ITEM),
        )

    def save(
        self,
        step: int,
        state: PyTree,
        meta: dict | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Save ``state`` and ``meta`` as checkpoint ``step``; returns whether a save started.

        Returns False when the step is skipped by ``save_interval_steps`` (and not forced) or
        when a checkpoint for ``step`` already exists: after an exact resume the state at an
        existing step is the one already on disk, so rewriting it would only cost time.
        """
        meta = {} if meta is None else dict(meta)
        _check_json_serialisable(meta)
        step = int(step)
        if step in self._manager.all_steps():
            logger.info("checkpoint for step %d already exists in %s; not saving", step, self.directory)
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE_ITEM: ocp.args.StandardSave(state),
                    _META_ITEM: ocp.args.JsonSave(meta),
                }
            ),
            force=force,
        )

    def wait(self) -> None:
        """Block until every pending asynchronous save has been written."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """Most recent saved step, or None if the directory holds no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All saved steps, ascending."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None, target: PyTree) -> tuple[PyTree, dict]:
        """Restore checkpoint ``step`` (None: the latest) as ``(state, meta)``.

        Args:
            step: which checkpoint; None picks the latest.
            target: pytree with the structure of the saved state whose leaves give the shape,
                dtype and sharding to restore into: concrete arrays or ``ShapeDtypeStruct``
                with ``.sharding`` (see :func:`abstract_like`). Restored arrays get exactly
                these shardings, which may differ from those used when saving. None restores
                everything with the shardings recorded at save time (same topology only).

        Raises:
            FileNotFoundError: the directory has no checkpoint, or none for ``step``.
        """
        # A save of this very step may still be in flight.
        self.wait()
        available = self.all_steps()
        if step is None:
            if not available:
                raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
            step = available[-1]
        elif int(step) not in available:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {available}"
            )
        abstract_state = None if target is None else abstract_like(target)
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                **{
                    _STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                    _META_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        meta = restored[_META_ITEM]
        return restored[_STATE_ITEM], {} if meta is None else dict(meta)

    def set_aside(self, step: int) -> str:
        """Take checkpoint ``step`` out of the rotation (e.g. one that cannot be restored).

        Locally the step directory is renamed to ``damaged-<step>-<unix time>`` (kept for a
        post-mortem, never listed as a step again); on object stores it is deleted. Without
        this, a later save of the same step would be skipped as "already exists". Returns the
        new location ("" when deleted).
        """
        self.wait()
        step = int(step)
        moved = ""
        if not storage.is_url(self.directory):
            source = os.path.join(self.directory, str(step))
            moved = os.path.join(self.directory, f"damaged-{step}-{int(time.time())}")
            if jax.process_index() == 0 and os.path.exists(source):
                os.rename(source, moved)
            distributed.barrier(f"rlhf_jax set_aside {step}")
            self._manager.reload()
        elif step in self._manager.all_steps():
            self._manager.delete(step)
        return moved

    def read_meta(self, step: int) -> dict:
        """The ``meta`` dict of checkpoint ``step`` alone (no arrays are read)."""
        self.wait()
        restored = self._manager.restore(
            int(step), args=ocp.args.Composite(**{_META_ITEM: ocp.args.JsonRestore()}))
        meta = restored[_META_ITEM]
        return {} if meta is None else dict(meta)

    def close(self) -> None:
        """Finish pending saves and release orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def save_pytree(path: str | os.PathLike, tree: PyTree, *, overwrite: bool = False) -> str:
    """Save ``tree`` to ``path`` (a directory orbax creates) and wait until it is written.

    Used for stage outputs such as the final SFT params. Returns the absolute path. Raises
    orbax's ValueError if ``path`` already exists, unless ``overwrite`` is True.
    Multi-host: call on every process.
    """
    absolute = storage.absolute(path)
    storage.makedirs(storage.dirname(absolute))
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(absolute, tree, force=overwrite)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    return absolute


class DamagedPytreeError(UserError, ValueError):
    """A saved pytree whose metadata or arrays cannot be read (a truncated or partial copy)."""


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return " ".join(str(error).split()) or type(error).__name__


def saved_structure(path: str | os.PathLike, expected: str) -> dict:
    """The tree saved at ``path`` as nested dicts of ``jax.ShapeDtypeStruct`` (no sharding),
    read from orbax's metadata: no arrays, and no dependence on the device topology it was saved
    from. ``expected`` says what should be there, for the error naming a damaged directory."""
    absolute = storage.absolute(path)
    if not storage.isdir(absolute):
        raise DamagedPytreeError(f"{absolute}: missing; expected {expected}")
    checkpointer = ocp.StandardCheckpointer()
    try:
        item = checkpointer.metadata(absolute).item_metadata
    except (OSError, ValueError) as e:
        raise DamagedPytreeError(f"{absolute}: unreadable ({_root_cause(e)}); expected "
                                 f"{expected}") from e
    finally:
        checkpointer.close()

    def plain(node: Any) -> Any:
        if hasattr(node, "items"):
            return {key: plain(child) for key, child in node.items()}
        if not hasattr(node, "shape") or not hasattr(node, "dtype"):
            raise DamagedPytreeError(f"{absolute}: holds {type(node).__name__} where arrays "
                                     f"belong; expected {expected}")
        return jax.ShapeDtypeStruct(tuple(node.shape), node.dtype)

    if item is None:   # orbax only warns about a directory that is no checkpoint
        raise DamagedPytreeError(f"{absolute}: no orbax checkpoint metadata; expected {expected}")
    tree = plain(item)
    if not tree:
        raise DamagedPytreeError(f"{absolute}: an empty tree; expected {expected}")
    return tree


def load_pytree(path: str | os.PathLike, target: PyTree | None = None) -> PyTree:
    """Load a pytree saved by :func:`save_pytree`.

    ``target`` (arrays or ``ShapeDtypeStruct`` with shardings) fixes shapes, dtypes and
    shardings of the result, as in :meth:`Checkpointer.restore`; None restores as saved.
    Arrays that cannot be read (a truncated or partly copied directory) raise
    :class:`DamagedPytreeError` naming the directory and TensorStore's reason.
    """
    absolute = storage.absolute(path)
    if not storage.isdir(absolute):
        raise FileNotFoundError(f"no saved pytree at {absolute}")
    abstract_tree = None if target is None else abstract_like(target)
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(absolute, abstract_tree)
    except Exception as e:
        # orbax wraps a failed array read in a bare Exception (TensorStore's ValueError as its
        # cause); anything else is not about the files and keeps its traceback.
        if type(e) is not Exception and not isinstance(e, (ValueError, OSError)):
            raise
        raise DamagedPytreeError(f"{absolute}: damaged, its arrays cannot be read "
                                 f"({_root_cause(e)}); save or copy it again") from e
    finally:
        checkpointer.close()
