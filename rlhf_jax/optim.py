"""Optimizers, learning-rate schedules and weight EMA shared by every stage.

Builders take plain keyword arguments so a config object can splat its fields into them.
Paper defaults (InstructGPT App. C): Adam(b1=0.9, b2=0.95); SFT and RM use cosine decay to
10% of the peak with no warmup; PPO uses a constant rate after a 10-iteration warmup from
0.1x the peak, and keeps an EMA of the policy weights with decay 0.992.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[Any], jax.Array]
LearningRate = Union[float, Schedule]

_DECAY_KINDS = ("cosine", "constant")


def make_lr_schedule(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "cosine",
    final_fraction: float = 0.1,
    warmup_start_fraction: float = 0.0,
) -> Schedule:
    """Linear warmup followed by cosine decay or a constant rate.

    Warmup: step 0 -> ``warmup_start_fraction * peak_lr``, rising linearly to ``peak_lr`` at
    ``warmup_steps``. Then "cosine" decays to ``final_fraction * peak_lr`` at ``total_steps``
    (and stays there), "constant" holds ``peak_lr``.

    Args:
      peak_lr: learning rate reached at the end of warmup.
      total_steps: number of optimizer steps of the run (end of the cosine).
      warmup_steps: linear warmup length; 0 starts at the peak.
      decay: "cosine" or "constant".
      final_fraction: cosine floor as a fraction of ``peak_lr`` (paper: 0.1).
      warmup_start_fraction: warmup starting point as a fraction of ``peak_lr`` (PPO: 0.1).

    Returns:
      ``schedule(step) -> float32 scalar`` usable by optax and under jit.
    """
    if decay not in _DECAY_KINDS:
        raise ValueError(f"decay must be one of {_DECAY_KINDS}, got {decay!r}")
    if peak_lr < 0 or warmup_steps < 0 or total_steps < 0:
        raise ValueError("peak_lr, total_steps and warmup_steps must be non-negative")
    if decay == "cosine" and warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps})")

    start_lr = warmup_start_fraction * peak_lr
    final_lr = final_fraction * peak_lr
    # max(.., 1) keeps the divisions finite for degenerate (zero-length) phases.
    warmup_length = float(max(warmup_steps, 1))
    decay_length = float(max(total_steps - warmup_steps, 1))

    def schedule(step: Any) -> jax.Array:
        # A host-side step (logging) is evaluated in NumPy: eager jnp would compile a handful
        # of tiny XLA programs on a loop's first logging step.
        xp = np if isinstance(step, (int, float, np.number, np.ndarray)) else jnp
        step = xp.asarray(step, xp.float32)
        warmup_progress = xp.clip(step / warmup_length, 0.0, 1.0)
        warmup_lr = start_lr + (peak_lr - start_lr) * warmup_progress
        if decay == "constant":
            after_warmup = xp.asarray(peak_lr, xp.float32)
        else:
            decay_progress = xp.clip((step - warmup_steps) / decay_length, 0.0, 1.0)
            cosine = 0.5 * (1.0 + xp.cos(math.pi * decay_progress))
            after_warmup = final_lr + (peak_lr - final_lr) * cosine
        return xp.where(step < warmup_steps, warmup_lr, after_warmup).astype(xp.float32)

    return schedule


def current_lr(schedule: LearningRate, step: int) -> float:
    """Learning rate at (host-side) ``step`` for logging; accepts a schedule or a constant."""
    return float(schedule(int(step)) if callable(schedule) else schedule)


def make_optimizer(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip_norm: Optional[float] = None,
    weight_decay_mask: Optional[Any] = None,
) -> optax.GradientTransformation:
    """Adam (or AdamW when ``weight_decay`` > 0), optionally behind global-norm clipping.

    Args:
      learning_rate: float or schedule (``make_lr_schedule``).
      b1, b2, eps: Adam moments (paper: 0.9, 0.95).
      weight_decay: decoupled weight decay; 0 selects plain Adam.
      grad_clip_norm: when set, gradients are clipped to this global norm before Adam.
      weight_decay_mask: optional pytree/callable passed to ``optax.adamw`` to exempt
        parameters (e.g. biases, norms) from decay.

    Returns:
      an ``optax.GradientTransformation``.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if weight_decay > 0:
        adam = optax.adamw(
            learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
            mask=weight_decay_mask,
        )
    else:
        adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    if grad_clip_norm is None:
        return adam
    if grad_clip_norm <= 0:
        raise ValueError(f"grad_clip_norm must be positive, got {grad_clip_norm}")
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adam)


def ema_update(ema_params: Any, params: Any, decay: Union[float, jax.Array]) -> Any:
    """One EMA step: ``ema <- decay * ema + (1 - decay) * params``, leaf by leaf.

    The blend is computed in at least float32 and cast back to each EMA leaf's dtype
    (normally the params' dtype), so there is a single rounding per step. An EMA stored in
    bf16 still drops increments below bf16 resolution (decay 0.992 moves it by 0.8% of the
    gap); pass a float32 copy as ``ema_params`` to avoid that. Jit-friendly; ``decay`` may
    be traced.
    """

    def blend(ema_leaf: jax.Array, param_leaf: jax.Array) -> jax.Array:
        compute_dtype = jnp.promote_types(ema_leaf.dtype, jnp.float32)
        ema32 = ema_leaf.astype(compute_dtype)
        param32 = param_leaf.astype(compute_dtype)
        return (ema32 + (1.0 - decay) * (param32 - ema32)).astype(ema_leaf.dtype)

    return jax.tree_util.tree_map(blend, ema_params, params)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm of all leaves of ``tree`` together (float32 scalar), e.g. for grad logging."""
    return optax.global_norm(jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree))
