"""Creating, sharding and reshaping parameter pytrees.

Parameters are born in their final shardings: ``init_params`` jits ``model.init`` with
``out_shardings`` derived from the logical axis names, so no host ever holds a full copy.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from rlhf_jax.models.transformer import Cache, Transformer, cache_axes
from rlhf_jax.sharding import as_auto_mesh, logical_to_spec, shardings_from_boxed

PyTree = Any


def _dummy_inputs(model: Transformer) -> jax.Array:
    return jnp.zeros((1, 2), jnp.int32)


@functools.lru_cache(maxsize=64)
def abstract_boxed_params(model: Transformer) -> PyTree:
    """Shapes, dtypes and logical names of every parameter, without allocating anything.

    Cached per (hashable) model definition: tracing ``init`` costs ~0.2 s even for a tiny model,
    and building one PPO program asks for each network's shapes several times."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy_inputs(model)))
    return variables["params"]


def abstract_params(model: Transformer, mesh: Mesh | None = None) -> PyTree:
    """ShapeDtypeStructs (with shardings when a mesh is given) of the unboxed parameter tree."""
    mesh = as_auto_mesh(mesh)
    boxed = abstract_boxed_params(model)
    unboxed = nn.meta.unbox(boxed)
    if mesh is None:    # fresh leaves: callers tell trees apart by leaf identity (compile.py)
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), unboxed)
    shardings = param_shardings(model, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        unboxed, shardings)


def param_shardings(model: Transformer, mesh: Mesh) -> PyTree:
    """NamedSharding per parameter, from the model's logical axes and its rules table.

    Any mesh works here and in the other helpers taking one: an Explicit-axes mesh
    (``jax.make_mesh``'s default) is used as its Auto twin (``rlhf_jax.sharding.as_auto_mesh``).
    """
    return shardings_from_boxed(abstract_boxed_params(model), as_auto_mesh(mesh), model.rules)


def init_params(model: Transformer, rng: jax.Array, mesh: Mesh | None = None) -> PyTree:
    """Random parameters, created directly in their shardings when a mesh is given."""
    mesh = as_auto_mesh(mesh)

    def init(key):
        return nn.meta.unbox(model.init(key, _dummy_inputs(model))["params"])
    if mesh is None:
        return jax.jit(init)(rng)
    return jax.jit(init, out_shardings=param_shardings(model, mesh))(rng)


def place_params(params: PyTree, model: Transformer, mesh: Mesh | None) -> PyTree:
    """Move an existing (host or device) parameter tree onto the model's shardings."""
    mesh = as_auto_mesh(mesh)
    if mesh is None:
        return jax.tree.map(jnp.asarray, params)
    return jax.device_put(params, param_shardings(model, mesh))


def cache_shardings(model: Transformer, mesh: Mesh, cache: Cache) -> Cache:
    """Shardings for a KV cache (arrays or ``ShapeDtypeStruct``s from ``cache_shapes``), same tree."""
    mesh = as_auto_mesh(mesh)
    return jax.tree.map(lambda leaf: NamedSharding(mesh, logical_to_spec(
        cache_axes(leaf.ndim), mesh, model.rules, shape=leaf.shape)), cache)


def stack_layers(params: PyTree, n_layers: int) -> PyTree:
    """``layer_0 .. layer_{L-1}`` -> ``layers`` with a leading layer axis (for scan_layers)."""
    params = dict(params)
    layers = [params.pop(f"layer_{i}") for i in range(n_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return params


def unstack_layers(params: PyTree) -> PyTree:
    """Inverse of ``stack_layers``; a tree without ``layers`` is returned as is."""
    if "layers" not in params:
        return params
    params = dict(params)
    stacked = params.pop("layers")
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n_layers):
        params[f"layer_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return params


def cast_floating(params: PyTree, dtype: Any) -> PyTree:
    """Cast floating-point leaves (e.g. to the config's param_dtype)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


