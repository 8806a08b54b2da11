"""Deterministic, resumable, multi-host batch iteration over in-memory numpy arrays.

Every process holds the full (tokenized) dataset and computes the same global
permutation from ``(seed, epoch)``; each then takes only its own contiguous
slice of every global batch. No communication is needed, and the global batch
sequence depends only on ``(seed, global_batch_size, N)`` -- not on the number
of processes -- so a run can resume on a differently sized pod and see the
same global batches.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import ConfigError

_STATE_KEYS = ("seed", "epoch", "index")


class BatchIterator:
    """Infinite iterator over epochs of shuffled global batches; yields host-local slices.

    Args:
        arrays: name -> array, all with the same leading dimension N (examples).
        global_batch_size: examples per step summed over all processes; must be
            divisible by ``process_count``.
        seed: non-negative int; epoch ``e`` is permuted by
            ``np.random.default_rng([seed, e])``, so any epoch is reproducible alone.
        shuffle: if False, every epoch visits examples in order 0..N-1.
        process_index, process_count: this host's place in the job; default to
            ``jax.process_index()`` / ``jax.process_count()``.
        drop_remainder: if True, the last ``N % global_batch_size`` examples of
            each (shuffled) epoch are skipped. If False, the final batch of an
            epoch is topped up with that epoch's first examples, so every example
            is seen at least once per epoch while shapes stay static for jit.

    ``next(it)`` returns ``{name: array[global_batch_size // process_count, ...]}``.
    """

    def __init__(
        self,
        arrays: Mapping[str, Any],
        global_batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        drop_remainder: bool = True,
    ):
        self._arrays = _as_example_arrays(arrays)
        self.num_examples = len(next(iter(self._arrays.values())))
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        _check_layout(self.num_examples, global_batch_size, self.process_index, self.process_count)
        _check_seed(seed)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.seed = int(seed)
        if self.drop_remainder:
            self.steps_per_epoch = self.num_examples // self.global_batch_size
        else:
            self.steps_per_epoch = math.ceil(self.num_examples / self.global_batch_size)
        self._epoch = 0
        self._index = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._index >= self.steps_per_epoch:
            self._epoch += 1
            self._index = 0
        order = self._epoch_order(self._epoch)
        start = self._index * self.global_batch_size + self.process_index * self.local_batch_size
        example_ids = order[start: start + self.local_batch_size]
        self._index += 1
        return {name: array[example_ids] for name, array in self._arrays.items()}

    @property
    def epoch(self) -> int:
        """Epoch of the next batch's permutation (before roll-over)."""
        return self._epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Example ids of one epoch, length steps_per_epoch * global_batch_size (cached per epoch)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        needed = self.steps_per_epoch * self.global_batch_size
        if needed > len(order):
            order = np.concatenate([order, order[: needed - len(order)]])
        self._order_cache = (epoch, order)
        return order

    def state(self) -> dict[str, Any]:
        """JSON-serializable position: ``seed``, ``epoch``, ``index`` (next step within
        the epoch), plus ``num_examples`` and ``global_batch_size`` so that a restore
        onto different data is caught instead of silently reading other batches."""
        return {
            "seed": self.seed,
            "epoch": self._epoch,
            "index": self._index,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the iterator that produced ``state`` stood."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"iterator state {dict(state)!r} lacks {missing}; expected keys {list(_STATE_KEYS)}")
        for key, mine in (("num_examples", self.num_examples), ("global_batch_size", self.global_batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"iterator state has {key}={state[key]} but this iterator has {key}={mine}; "
                    "restoring would replay different batches (was the data or batch size changed?)"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(
                f"iterator state epoch={epoch}, index={index} is out of range; expected epoch >= 0 and "
                f"0 <= index <= steps_per_epoch={self.steps_per_epoch}"
            )
        _check_seed(state["seed"])
        self.seed = int(state["seed"])
        self._epoch, self._index = epoch, index
        self._order_cache = None


def _as_example_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not arrays:
        raise ValueError("BatchIterator needs at least one array")
    converted = {name: np.asarray(value) for name, value in arrays.items()}
    sizes = {name: (value.shape[0] if value.ndim else None) for name, value in converted.items()}
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ValueError(f"all arrays need the same leading (example) dimension; got leading sizes {sizes}")
    return converted


def _check_layout(num_examples: int, global_batch_size: int, process_index: int, process_count: int) -> None:
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by process_count={process_count} "
            "so every process gets the same number of examples"
        )
    if num_examples < global_batch_size:   # the data (after overlong rows dropped), not the code
        raise ConfigError(
            f"the dataset has {num_examples} examples, fewer than one global batch of {global_batch_size}; "
            "add data or lower the batch size"
        )


def _check_seed(seed: Any) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def make_global_batch(
    local_batch: Mapping[str, np.ndarray],
    mesh: Mesh,
    pspec: PartitionSpec | Mapping[str, PartitionSpec],
) -> dict[str, jax.Array]:
    """Assemble each process's local slice into global ``jax.Array`` s.

    Args:
        local_batch: name -> host-local array [local_batch, ...] (from BatchIterator).
        mesh: the device mesh.
        pspec: one PartitionSpec for every array (e.g. ``P("data")`` shards the
            batch axis), or a name -> PartitionSpec mapping.
    Returns:
        name -> global array of shape [global_batch, ...] sharded by ``NamedSharding(mesh, pspec)``.
    """
    batch = {}
    for name, local in local_batch.items():
        if isinstance(pspec, Mapping) and name not in pspec:
            raise KeyError(f"no PartitionSpec for batch array {name!r}; pspec has {sorted(pspec)}")
        spec = pspec[name] if isinstance(pspec, Mapping) else pspec
        batch[name] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(local))
    return batch
