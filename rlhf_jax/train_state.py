"""The state every gradient-based stage trains, its shardings, and the jitted step factory.

A stage supplies ``loss_fn(params, batch, rng) -> (loss, metrics)``; ``make_train_step`` turns it
into one jitted update with named in/out shardings and a donated state, so parameters and
optimizer state keep the layout the rules table gives them (left to the compiler, a gradient can
come back sharded differently from its parameter).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.models.params import abstract_boxed_params
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sharding import batch_sharding, shardings_from_boxed

PyTree = Any
LossFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: PyTree
    opt_state: PyTree


def create_train_state(params: PyTree, optimizer: optax.GradientTransformation,
                       shardings: TrainState | None = None) -> TrainState:
    """Fresh optimizer state, created in its final sharding when ``shardings`` is given."""
    def build(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p))
    if shardings is None:
        return jax.jit(build)(params)
    return jax.jit(build, out_shardings=shardings, donate_argnums=())(params)


def train_state_shardings(model: Transformer, optimizer: optax.GradientTransformation,
                          mesh: Mesh) -> TrainState:
    """Shardings for a TrainState: optimizer moments inherit their parameter's logical axes.

    ``optimizer.init`` maps over the *boxed* abstract params, so Adam's mu/nu keep the
    LogicallyPartitioned metadata of their parameter (the MaxText recipe); counts are replicated.
    """
    boxed = abstract_boxed_params(model)
    abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                   opt_state=optimizer.init(p)), boxed)
    return shardings_from_boxed(abstract, mesh, model.rules)


def abstract_train_state(model: Transformer, optimizer: optax.GradientTransformation,
                         mesh: Mesh) -> TrainState:
    """ShapeDtypeStructs (with shardings) of the TrainState ``create_train_state`` would make."""
    shardings = train_state_shardings(model, optimizer, mesh)
    shapes = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                 opt_state=optimizer.init(p)),
                            nn.meta.unbox(abstract_boxed_params(model)))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)


def shardings_of(abstract: PyTree) -> PyTree:
    """The ``.sharding`` of every ShapeDtypeStruct (or array) of a tree."""
    return jax.tree.map(lambda x: x.sharding, abstract)


def batch_shardings(batch: PyTree, mesh: Mesh) -> PyTree:
    """Batch-major sharding for any batch pytree (dict or dataclass): each leaf's leading dim
    over ('data', 'fsdp'); scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda v: batch_sharding(mesh, len(v.shape)) if len(v.shape) else replicated,
                        batch)


def apply_gradients(state: TrainState, grads: PyTree,
                    optimizer: optax.GradientTransformation) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    mesh: Mesh | None = None, state_shardings: TrainState | None = None,
                    example_batch: Mapping[str, Any] | None = None) -> Callable:
    """``step(state, batch, rng) -> (state, metrics)``, jitted, state donated.

    With a mesh, ``state_shardings`` and ``example_batch`` (for its shapes) fix the layouts.
    Metrics come back replicated scalars.
    """
    def step(state: TrainState, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        new_state = apply_gradients(state, grads, optimizer)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        return new_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, donate_argnums=0,
                   in_shardings=(state_shardings, batch_shardings(example_batch, mesh), replicated),
                   out_shardings=(state_shardings, replicated))


def make_eval_step(loss_fn: LossFn, mesh: Mesh | None = None, param_shardings: PyTree = None,
                   example_batch: Mapping[str, Any] | None = None) -> Callable:
    """``eval(params, batch) -> metrics`` (deterministic: no dropout rng)."""
    def evaluate(params, batch):
        loss, metrics = loss_fn(params, batch, None)
        return dict(metrics, loss=loss)
    if mesh is None:
        return jax.jit(evaluate)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(evaluate, in_shardings=(param_shardings, batch_shardings(example_batch, mesh)),
                   out_shardings=replicated)


