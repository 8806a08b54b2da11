"""Device mesh, the logical-axis rules table, and sharding helpers every stage uses.

Model code names *logical* axes only ("embed", "heads", "activation_batch", ...). One ordered
rules table maps each logical axis onto mesh axes ("data", "fsdp", "tensor"); changing how a model
is laid out on a pod means editing this table (or a config override of it), never the model.

Mesh axes are created as ``AxisType.Auto`` on purpose: we annotate inputs, outputs and a few
activations with ``NamedSharding`` and let GSPMD propagate the rest (the pjit model). jax 0.10's
``jax.make_mesh`` defaults to Explicit axes (sharding-in-types), which would turn every unannotated
op into a typing question.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Ordered: for each logical axis, the first rule whose mesh axes are still free and divide the
# dimension wins. A logical axis with no usable rule stays replicated.
LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
DEFAULT_RULES: LogicalRules = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache: sharded like the activations that fill it
    ("cache_layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
    # parameters: FSDP over the model dimension, tensor parallel over heads / mlp / vocab
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("position", None),
    ("norm", None),
    ("layers", None),
    ("score", None),
)


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Replace a single -1 in ``shape`` by whatever fills ``n_devices``."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: axis sizes must be positive (or one -1)")
    if -1 in shape:
        if n_devices % known:
            raise ValueError(f"mesh shape {shape}: {n_devices} devices are not divisible by {known}")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ValueError(
            f"mesh shape {shape} has {math.prod(shape)} slots but there are {n_devices} devices")
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (or the given) devices; axis types Auto (see module docstring)."""
    devices = list(jax.devices() if devices is None else devices)
    wanted = math.prod(int(s) for s in shape)
    if -1 not in tuple(shape) and 0 < wanted < len(devices) and jax.process_count() == 1:
        # A smaller mesh on one host (e.g. (1, 1, 1) for a single-device reference run).
        devices = devices[:wanted]
    resolved = resolve_mesh_shape(shape, len(devices))
    if len(resolved) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} does not match axis names {tuple(axis_names)}")
    return jax.make_mesh(resolved, tuple(axis_names),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(resolved), devices=devices)


def as_auto_mesh(mesh: Mesh | None) -> Mesh | None:
    """The same devices and axis names with every axis ``Auto`` (see module docstring).

    Public entry points call this on the mesh they are given, so a mesh made the standard way
    (``jax.make_mesh(shape, names)``, Explicit axes by default in jax 0.10) works as is.
    """
    if mesh is None or all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return mesh
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh axes {mesh.axis_names}: {unknown} unknown; pass a mesh over "
                         f"{MESH_AXES} (e.g. rlhf_jax.sharding.make_mesh((-1, 1, 1)))")
    return Mesh(mesh.devices, mesh.axis_names,
                axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def _as_tuple(mesh_axes: str | Sequence[str] | None) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def logical_to_spec(logical_axes: Sequence[str | None], mesh: Mesh,
                    rules: LogicalRules = DEFAULT_RULES,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry ``logical_axes``.

    A mesh axis is used at most once per array, and only when it divides the dimension (a
    kv_heads=1 model on tensor=4 keeps its K/V projection replicated instead of failing).
    Mesh axes of size 1 are dropped: they change nothing and keep specs readable.
    """
    rule_map: dict[str, list[tuple[str, ...]]] = {}
    for name, target in rules:
        rule_map.setdefault(name, []).append(_as_tuple(target))
    used: set[str] = set()
    spec: list[Any] = []
    for dim, name in enumerate(logical_axes):
        chosen: tuple[str, ...] = ()
        for target in rule_map.get(name, []) if name is not None else []:
            axes = tuple(a for a in target if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
            size = math.prod(mesh.shape[a] for a in axes)
            if shape is not None and size > 1 and shape[dim] % size:
                # Try the longest prefix of the target that divides the dimension.
                while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
                    axes = axes[:-1]
            if axes:
                chosen = axes
                break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def _is_partitioned(x: Any) -> bool:
    import flax.linen as nn
    return isinstance(x, nn.Partitioned)


def shardings_from_boxed(boxed_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """NamedShardings for a pytree of ``nn.LogicallyPartitioned`` leaves (abstract or concrete).

    Leaves without logical names are replicated. The result has the structure of the *unboxed*
    tree, so it can be used directly as ``out_shardings`` of a jitted init or a train step.
    """
    mesh = as_auto_mesh(mesh)
    def leaf_sharding(leaf: Any) -> NamedSharding:
        if _is_partitioned(leaf):
            value = leaf.value
            spec = logical_to_spec(leaf.names, mesh, rules, shape=value.shape)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)
    return jax.tree.map(leaf_sharding, boxed_tree, is_leaf=_is_partitioned)


def replicated_fraction(tree: Any) -> float:
    """Share of parameter bytes that are fully replicated across a multi-device mesh.

    On a real pod this should be close to 0 (norm scales and biases only); a large value means a
    rules table that leaves big matrices unsharded.
    """
    total = 0
    replicated = 0
    for leaf in jax.tree.leaves(tree):
        nbytes = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        total += nbytes
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or sharding.is_fully_replicated:
            replicated += nbytes
    return replicated / max(total, 1)


def check_batch_size(name: str, size: int, mesh: Mesh) -> None:
    """Batches are split over ('data', 'fsdp'): their size must divide evenly."""
    ways = math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
    if size % ways:
        raise ValueError(f"{name}={size} must be a multiple of data x fsdp = {ways} "
                         f"(mesh {dict(mesh.shape)})")


def batch_spec(ndim: int) -> PartitionSpec:
    """Leading (batch) dim over ('data', 'fsdp'); the rest replicated."""
    return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(as_auto_mesh(mesh), batch_spec(ndim))


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble a global batch from each process's local rows, split over ('data', 'fsdp').

    Every process passes only the rows it read (its own shard of the global batch, see
    ``rlhf_jax.data.BatchIterator``); on one host this is a plain device_put.
    """
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if jax.process_count() > 1:
            check_process_rows(as_auto_mesh(mesh), value.shape[0])
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out


@functools.lru_cache(maxsize=256)
def check_process_rows(mesh: Mesh, local_rows: int) -> None:
    """Refuse a mesh on which this process's devices do not hold exactly the rows it reads.

    ``BatchIterator`` hands process ``i`` rows ``[i * local, (i + 1) * local)`` of each global
    batch. If the batch axes ('data', 'fsdp') do not split the batch across processes in process
    order (e.g. a mesh whose only large axis is 'tensor', spanning hosts), the rows would be
    placed elsewhere or, worse, different processes would each claim to hold the same
    replicated rows with different data: a silently wrong batch.
    """
    global_rows = local_rows * jax.process_count()
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_rows,))
    spans = sorted({index[0].indices(global_rows)[:2] for index in index_map.values()})
    held: list[list[int]] = []
    for start, stop in spans:
        if held and start <= held[-1][1]:
            held[-1][1] = max(held[-1][1], stop)
        else:
            held.append([start, stop])
    first = jax.process_index() * local_rows
    if held != [[first, first + local_rows]]:
        raise ValueError(
            f"mesh {dict(mesh.shape)} over {jax.process_count()} processes: process "
            f"{jax.process_index()} reads batch rows [{first}, {first + local_rows}) but its devices "
            f"hold rows {[tuple(h) for h in held]} of {global_rows}; the batch axes {BATCH_AXES} "
            "must split every batch across the processes, in process order (put the hosts on "
            "'data' or 'fsdp', not on 'tensor')")


def shard_global_batch(global_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Like ``shard_batch``, for a batch every process holds in full (evaluation inputs).

    Each process places only the rows its own devices hold, wherever the mesh puts those
    devices, so the global array is the same batch whatever the number of processes.
    """
    if jax.process_count() == 1:
        return shard_batch(global_batch, mesh)
    out = {}
    for key, value in global_batch.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_callback(value.shape, batch_sharding(mesh, value.ndim),
                                                lambda index, value=value: value[index])
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(as_auto_mesh(mesh), PartitionSpec())


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None,
                            rules: LogicalRules = DEFAULT_RULES) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op without a mesh (single device)."""
    if mesh is None:
        return x
    mesh = as_auto_mesh(mesh)
    spec = logical_to_spec(logical_axes, mesh, rules, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


