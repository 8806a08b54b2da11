"""A stage's compiled steps, built before (and without) weights or data.

``stages.<stage>.build(cfg, mesh)`` returns a ``Program``: the abstract train state
(ShapeDtypeStructs carrying their shardings), and every jitted step with named in/out shardings
and the abstract arguments that lower it. ``train()`` runs its loop over these same steps;
``rlhf_jax.compile`` lowers them for a TPU topology and ``rlhf_jax.profile`` times them here::

    program = ppo.build(cfg, mesh)
    compiled = program.steps["update"].lower().compile()     # AOT: memory_analysis, cost_analysis
    state, frozen = program.init_state(jax.random.key(0))    # random weights, right shardings
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Step:
    """One jitted step and the abstract arguments it is compiled for.

    ``tokens``: tokens one call processes (for tokens/s). ``loop_trips``: how many times the
    step's data-dependent ``while`` loop may run at most (the rollout's decode loop), which XLA's
    cost analysis counts once; ``loop_body`` is that body as its own step so its FLOPs can be
    added ``loop_trips - 1`` more times.
    """
    name: str
    fn: Any                       # a jax.jit-wrapped callable
    args: tuple                   # pytrees of jax.ShapeDtypeStruct (with shardings)
    tokens: int = 0
    loop_trips: int = 1
    loop_body: "Step | None" = None

    def lower(self):
        return self.fn.lower(*self.args)


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything a stage compiles, and how to make random inputs of the same shapes.

    ``state``/``frozen``: abstract trained state and frozen networks (PPO's reference and RM;
    ``{}`` elsewhere). ``init_state(rng) -> (state, frozen)`` creates random weights directly in
    their shardings (for profiling without a checkpoint). ``random_args(name, state, frozen,
    rng)`` returns concrete arguments for step ``name`` (random tokens, all-ones masks), so a
    step can run with no data at all.
    """
    stage: str
    mesh: Mesh
    models: dict[str, Any]
    state: PyTree
    frozen: PyTree
    steps: dict[str, Step]
    init_state: Callable[[jax.Array], tuple[PyTree, PyTree]]
    random_args: Callable[[str, PyTree, PyTree, jax.Array], tuple]
    calls_per_iteration: dict[str, int]   # how often ``train`` runs each step per iteration
                                          # (0: not every iteration, e.g. eval)
    optimizer: Any = None                 # optax transformation of the trained state
    schedule: Any = None                  # its learning-rate schedule
    plan: Any = None                      # the stage's other build decisions, typed
                                          # (``ppo.PPOPlan``, ``dpo.DPOPlan``)


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs of ``tree`` (arrays or structs) carrying ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def abstract_batch(shapes: dict[str, tuple[tuple[int, ...], Any]], sharding_fn) -> dict:
    """``{name: ShapeDtypeStruct}`` from ``{name: (shape, dtype)}``; ``sharding_fn(ndim)``."""
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_fn(len(shape)))
            for k, (shape, dtype) in shapes.items()}


def random_batch(structs: PyTree, vocab_size: int, seed: int = 0) -> PyTree:
    """Concrete arrays for a batch of ShapeDtypeStructs, placed in their shardings.

    Stand-in data for timing and AOT checks: token ids uniform over the vocabulary, masks all
    ones, position ids 0..T-1, ranks 0..K-1 (a strict order), floats 1 and bools True.
    """
    rng = np.random.default_rng(seed)

    def fill(path, struct):
        name = jax.tree_util.keystr(path).lower()
        shape, dtype = struct.shape, np.dtype(struct.dtype)
        if "position" in name or "ranks" in name or "indices" in name:
            value = np.broadcast_to(np.arange(shape[-1]), shape)
        elif "mask" in name or dtype == np.bool_ or np.issubdtype(dtype, np.floating):
            value = np.ones(shape)
        else:
            value = rng.integers(0, vocab_size, size=shape)
        value = np.asarray(value).astype(dtype)
        sharding = getattr(struct, "sharding", None)
        return jax.device_put(value, sharding) if sharding is not None else value
    return jax.tree_util.tree_map_with_path(fill, structs)


def abstract_key(sharding=None) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct for a typed PRNG key (``jax.random.key``)."""
    struct = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=sharding)
