"""Tests for rlhf_jax.optim: schedule golden values, clipping, EMA math, convergence."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import optim


def test_cosine_schedule_golden_values():
    peak, total, warmup = 1e-3, 110, 10
    schedule = optim.make_lr_schedule(peak, total_steps=total, warmup_steps=warmup)
    assert float(schedule(0)) == pytest.approx(0.0, abs=1e-12)
    assert float(schedule(5)) == pytest.approx(0.5 * peak, rel=1e-6)
    assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-6)
    # Midpoint of the cosine phase: halfway between peak and the 10% floor.
    assert float(schedule(60)) == pytest.approx(0.55 * peak, rel=1e-5)
    assert float(schedule(total)) == pytest.approx(0.1 * peak, rel=1e-5)
    assert float(schedule(total + 50)) == pytest.approx(0.1 * peak, rel=1e-5)


def test_cosine_schedule_without_warmup_starts_at_peak():
    schedule = optim.make_lr_schedule(9e-6, total_steps=100)
    assert float(schedule(0)) == pytest.approx(9e-6, rel=1e-6)
    assert float(schedule(100)) == pytest.approx(9e-7, rel=1e-5)
    values = np.array([float(schedule(s)) for s in range(0, 101, 10)])
    assert np.all(np.diff(values) < 0)


def test_constant_schedule_with_ppo_warmup():
    peak = 2e-6
    schedule = optim.make_lr_schedule(
        peak, total_steps=500, warmup_steps=10, decay="constant", warmup_start_fraction=0.1
    )
    assert float(schedule(0)) == pytest.approx(0.1 * peak, rel=1e-6)
    assert float(schedule(5)) == pytest.approx(0.55 * peak, rel=1e-6)
    assert float(schedule(10)) == pytest.approx(peak, rel=1e-6)
    assert float(schedule(499)) == pytest.approx(peak, rel=1e-6)
    assert float(optim.current_lr(schedule, jnp.int32(3))) == pytest.approx(
        0.1 * peak + 0.3 * 0.9 * peak, rel=1e-6
    )
    assert float(optim.current_lr(5e-4, 123)) == pytest.approx(5e-4)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError):
        optim.make_lr_schedule(1e-3, total_steps=10, decay="linear")
    with pytest.raises(ValueError):
        optim.make_lr_schedule(1e-3, total_steps=10, warmup_steps=20)


def _first_update(optimizer, grads, params):
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return updates


def test_gradient_clipping_bounds_the_update():
    # eps=1 makes Adam's first step lr * g / (|g| + 1), so it depends on the gradient scale
    # and the effect of clipping is visible in the update itself.
    params = {"w": jnp.zeros((4,)), "b": jnp.zeros((2,))}
    huge = {"w": jnp.full((4,), 1e3), "b": jnp.full((2,), -1e3)}
    max_norm = 0.5
    clipped_optimizer = optim.make_optimizer(1.0, eps=1.0, grad_clip_norm=max_norm)
    plain_optimizer = optim.make_optimizer(1.0, eps=1.0)

    scale = max_norm / float(optim.global_norm(huge))
    rescaled = jax.tree_util.tree_map(lambda g: g * scale, huge)
    with_clip = _first_update(clipped_optimizer, huge, params)
    expected = _first_update(plain_optimizer, rescaled, params)
    for got, want in zip(jax.tree_util.tree_leaves(with_clip), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6)

    # Each coordinate of the clipped gradient is 0.5 / sqrt(6), bounding the step below lr.
    per_coord = max_norm / np.sqrt(6.0)
    bound = per_coord / (per_coord + 1.0)
    assert float(optim.global_norm(with_clip)) <= np.sqrt(6.0) * bound + 1e-6
    unclipped = _first_update(plain_optimizer, huge, params)
    assert float(optim.global_norm(unclipped)) > 5 * float(optim.global_norm(with_clip))

    # Gradients already inside the ball are left alone.
    small = jax.tree_util.tree_map(lambda g: g * 1e-4, huge)
    for got, want in zip(
        jax.tree_util.tree_leaves(_first_update(clipped_optimizer, small, params)),
        jax.tree_util.tree_leaves(_first_update(plain_optimizer, small, params)),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_optimizer_reduces_a_quadratic():
    target = jnp.array([1.0, -2.0, 3.0])
    params = {"x": jnp.zeros((3,))}

    def loss_fn(p):
        return jnp.sum(jnp.square(p["x"] - target))

    schedule = optim.make_lr_schedule(0.1, total_steps=200, warmup_steps=5)
    for weight_decay, clip in [(0.0, None), (0.01, 1.0)]:
        optimizer = optim.make_optimizer(schedule, weight_decay=weight_decay, grad_clip_norm=clip)
        state = optimizer.init(params)
        current = params

        @jax.jit
        def step(p, s):
            grads = jax.grad(loss_fn)(p)
            updates, s = optimizer.update(grads, s, p)
            return optax.apply_updates(p, updates), s

        initial_loss = float(loss_fn(current))
        for _ in range(200):
            current, state = step(current, state)
        assert float(loss_fn(current)) < 0.01 * initial_loss


def test_ema_update_golden_values():
    ema = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
    params = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(0.0)}
    updated = optim.ema_update(ema, params, 0.992)
    np.testing.assert_allclose(updated["a"], [0.992 * 1 + 0.008 * 3, 0.992 * 2], rtol=1e-6)
    np.testing.assert_allclose(updated["b"], 0.992 * 4, rtol=1e-6)

    twice = optim.ema_update(updated, params, 0.5)
    np.testing.assert_allclose(twice["b"], 0.5 * 0.992 * 4, rtol=1e-6)


def test_ema_update_keeps_dtype_and_jits():
    ema = {"w": jnp.ones((3,), jnp.bfloat16)}
    params = {"w": jnp.zeros((3,), jnp.bfloat16)}
    updated = jax.jit(optim.ema_update)(ema, params, jnp.float32(0.75))
    assert updated["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(updated["w"], np.float32), 0.75)


def test_global_norm_matches_numpy():
    tree = {"a": jnp.array([3.0, 4.0]), "b": [jnp.array([[12.0]], jnp.bfloat16)]}
    assert float(optim.global_norm(tree)) == pytest.approx(13.0, rel=1e-6)
