"""The transformer itself: KV-cache decoding, scalar head, dtypes, dropout, left padding,
scanned layers and rematerialisation."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import (Transformer, init_cache, init_params, stack_layers, tiny_config,
                             unstack_layers)
from rlhf_jax.models.params import abstract_params

VOCAB = 64


def _param_structure(config):
    """The config fields that do not change the (unstacked) parameter values."""
    return config.replace(dtype="float32", dropout=0.0, remat=False, scan_layers=False)


@functools.cache
def _unstacked_params(structure, seed: int):
    # Jitted init compiles slowly on CPU (one threefry per parameter): share it across tests.
    return init_params(Transformer(structure), jax.random.key(seed))


def build(arch: str = "gpt2", seed: int = 0, **overrides):
    """A tiny model and its params (stacked when scan_layers); same values for equal structure."""
    if arch == "llama":
        overrides.setdefault("n_kv_heads", 2)    # grouped-query attention
    config = tiny_config(arch, **overrides)
    params = _unstacked_params(_param_structure(config), seed)
    if config.scan_layers:
        params = stack_layers(params, config.n_layers)
    return Transformer(config), params


@functools.cache
def jitted_apply(model):
    return jax.jit(model.apply)


def left_padded_batch(batch: int = 3, length: int = 11, pads=(0, 2, 4), seed: int = 1):
    ids = np.random.RandomState(seed).randint(1, VOCAB, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


def forward(model, params, ids, mask, **kwargs):
    return jitted_apply(model)({"params": params}, ids, mask, **kwargs)


def mean_nll(model, params, ids, mask):
    """Mean next-token negative log-likelihood over real target tokens."""
    logits = model.apply({"params": params}, ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    target_logp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weights = mask[:, 1:].astype(jnp.float32)
    return -(target_logp * weights).sum() / weights.sum()


# --- KV cache --------------------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_decoding_equals_full_forward(arch, scan_layers):
    model, params = build(arch, scan_layers=scan_layers)
    prompt_len, new_tokens = 5, 6
    ids, mask = left_padded_batch(length=prompt_len + new_tokens)
    full = np.asarray(forward(model, params, ids, mask))

    chex.clear_trace_counter()      # parametrized: the same step footprint in every case

    @jax.jit
    @chex.assert_max_traces(n=2)    # the prefill and one decode step: no retrace per position
    def step(params, tokens, slot_mask, cache, cache_index):
        return model.apply({"params": params}, tokens, slot_mask, cache=cache,
                           cache_index=cache_index)

    batch, total = ids.shape
    cache = init_cache(model.config, batch, total)
    slot_mask = np.zeros((batch, total), np.int32)
    slot_mask[:, :prompt_len] = mask[:, :prompt_len]
    prefill, cache = step(params, ids[:, :prompt_len], slot_mask, cache, 0)
    kv, dh, n_layers = model.config.kv_heads, model.config.dims_per_head, model.config.n_layers
    if scan_layers:     # keys and values [B, KV, S, Dh], stacked over layers
        chex.assert_shape(cache["k"], (n_layers, batch, kv, total, dh))
        chex.assert_shape(cache["v"], (n_layers, batch, kv, total, dh))
    else:               # one buffer per layer, updated in place by the decode loop
        assert len(cache["k"]) == len(cache["v"]) == n_layers
        chex.assert_shape(cache["k"], [(batch, kv, total, dh)] * n_layers)
        chex.assert_shape(cache["v"], [(batch, kv, total, dh)] * n_layers)
    real = mask[:, :prompt_len].astype(bool)
    diffs = [np.abs(np.asarray(prefill) - full[:, :prompt_len])[real].max()]
    for t in range(prompt_len, total):
        slot_mask[:, t] = 1
        logits, cache = step(params, ids[:, t:t + 1], slot_mask, cache, t)
        diffs.append(np.abs(np.asarray(logits)[:, 0] - full[:, t]).max())
    print(f"\n[kv cache] {arch} scan={scan_layers}: max |logit diff| = {max(diffs):.3e}")
    assert max(diffs) <= 1e-5


def test_cache_call_without_index_is_an_error():
    model, params = build("gpt2")
    cache = init_cache(model.config, 1, 4)
    with pytest.raises(ValueError, match="cache_index"):
        model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), cache=cache)


# --- scalar head -----------------------------------------------------------------------------

SCALAR_D_MODEL = 1023     # many kernel entries, so the init std is measured precisely


@pytest.fixture(scope="module")
def scalar_model():
    config = tiny_config("gpt2", d_model=SCALAR_D_MODEL, n_heads=3, n_layers=1, d_ff=16,
                         head="scalar")
    model = Transformer(config)
    return model, init_params(model, jax.random.key(3))


def test_scalar_head_outputs_float32_per_position(scalar_model):
    model, params = scalar_model
    assert "score_head" in params and "lm_head" not in params
    ids, mask = left_padded_batch()
    for compute_dtype in ("float32", "bfloat16"):
        values = forward(Transformer(model.config.replace(dtype=compute_dtype)), params, ids, mask)
        chex.assert_shape(values, ids.shape)
        chex.assert_type(values, jnp.float32)
        assert np.isfinite(np.asarray(values)).all()


def test_scalar_head_init_scale(scalar_model):
    _, params = scalar_model
    kernel = np.asarray(params["score_head"]["kernel"])
    assert kernel.shape == (SCALAR_D_MODEL, 1)
    expected_std = 1.0 / np.sqrt(SCALAR_D_MODEL + 1)       # 1/32; the other kernels use 0.02
    print(f"\n[scalar head] init std {kernel.std():.4f}, expected {expected_std:.4f}")
    assert abs(kernel.std() / expected_std - 1) < 0.15
    assert abs(kernel.mean()) < 5 * expected_std / np.sqrt(SCALAR_D_MODEL)
    np.testing.assert_array_equal(np.asarray(params["score_head"]["bias"]), 0.0)


# --- dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bfloat16_compute_is_close_to_float32(arch):
    model32, params = build(arch, dtype="float32")
    model16 = Transformer(model32.config.replace(dtype="bfloat16"))
    ids, mask = left_padded_batch()
    logits32 = np.asarray(forward(model32, params, ids, mask))
    logits16 = forward(model16, params, ids, mask)
    assert logits16.dtype == jnp.bfloat16
    logits16 = np.asarray(logits16, np.float32)
    real = mask.astype(bool)
    diff = np.abs(logits16 - logits32)[real].max()
    scale = np.abs(logits32[real]).max()
    print(f"\n[bf16] {arch}: max |logit diff| = {diff:.3e} (max |logit| {scale:.3e})")
    assert np.isfinite(logits16).all()
    assert diff <= 0.05 * scale + 1e-2


def test_param_dtype_sets_the_stored_dtype():
    config = tiny_config("llama", param_dtype="bfloat16", dtype="bfloat16")
    shapes = abstract_params(Transformer(config))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    shapes32 = abstract_params(Transformer(config.replace(param_dtype="float32")))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes32)} == {jnp.dtype(jnp.float32)}


# --- dropout ---------------------------------------------------------------------------------

def test_dropout_only_when_not_deterministic():
    model, params = build("gpt2", dropout=0.3)
    no_dropout_model = Transformer(model.config.replace(dropout=0.0))
    ids, mask = left_padded_batch()
    apply = jax.jit(model.apply, static_argnames="deterministic")

    def run(deterministic, seed=None):
        rngs = None if seed is None else {"dropout": jax.random.key(seed)}
        return np.asarray(apply({"params": params}, ids, mask, deterministic=deterministic,
                                rngs=rngs))

    evaluation = run(True)
    np.testing.assert_array_equal(evaluation, run(True))
    np.testing.assert_allclose(evaluation, forward(no_dropout_model, params, ids, mask), atol=1e-6)

    train_a, train_a_again, train_b = run(False, 0), run(False, 0), run(False, 1)
    np.testing.assert_array_equal(train_a, train_a_again)     # same rng, same mask
    assert np.abs(train_a - evaluation).max() > 1e-3
    assert np.abs(train_a - train_b).max() > 1e-3


# --- positions and padding -------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padding_does_not_change_real_positions(arch):
    model, params = build(arch)
    ids = np.random.RandomState(2).randint(1, VOCAB, (1, 7)).astype(np.int32)
    unpadded = np.asarray(forward(model, params, ids, np.ones_like(ids)))
    pad = 4
    padded_ids = np.concatenate([np.full((1, pad), 5, np.int32), ids], axis=1)
    padded_mask = np.concatenate([np.zeros((1, pad), np.int32), np.ones_like(ids)], axis=1)
    padded = np.asarray(forward(model, params, padded_ids, padded_mask))
    diff = np.abs(padded[:, pad:] - unpadded).max()
    print(f"\n[left padding] {arch}: max |logit diff| = {diff:.3e}")
    assert diff <= 1e-5
    assert np.isfinite(padded).all()    # fully-masked padding rows give no NaN


def test_explicit_position_ids_override_the_default():
    model, params = build("gpt2")
    ids = np.random.RandomState(3).randint(1, VOCAB, (1, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    default = np.asarray(forward(model, params, ids, mask))
    same = np.asarray(forward(model, params, ids, mask, position_ids=np.arange(6)[None]))
    shifted = np.asarray(forward(model, params, ids, mask, position_ids=np.arange(6)[None] + 3))
    np.testing.assert_allclose(same, default, atol=1e-6)
    assert np.abs(shifted - default).max() > 1e-4


# --- layer stacking, scan and remat ----------------------------------------------------------

def test_stack_unstack_round_trip_and_scanned_layout():
    model, params = build("llama")
    n_layers = model.config.n_layers
    stacked = stack_layers(params, n_layers)
    assert "layers" in stacked and not any(k.startswith("layer_") for k in stacked)
    assert stacked["layers"]["attn"]["q"]["kernel"].shape == (
        n_layers, *params["layer_0"]["attn"]["q"]["kernel"].shape)
    scanned_shapes = abstract_params(Transformer(model.config.replace(scan_layers=True)))
    assert jax.tree.structure(scanned_shapes) == jax.tree.structure(stacked)
    assert jax.tree.map(lambda a: a.shape, scanned_shapes) == jax.tree.map(lambda a: a.shape, stacked)

    restored = unstack_layers(stacked)
    chex.assert_trees_all_equal(restored, params)    # same structure, same values
    assert unstack_layers(params) is params        # no "layers": returned as is


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scanned_model_equals_unrolled_model(arch):
    model, params = build(arch)
    scanned = Transformer(model.config.replace(scan_layers=True))
    ids, mask = left_padded_batch()
    unrolled_logits = np.asarray(forward(model, params, ids, mask))
    scanned_logits = np.asarray(forward(scanned, stack_layers(params, model.config.n_layers),
                                        ids, mask))
    np.testing.assert_allclose(scanned_logits, unrolled_logits, atol=1e-5)


def test_remat_gives_the_same_loss_gradient():
    model, params = build("llama")
    n_layers = model.config.n_layers
    ids, mask = left_padded_batch()

    def loss_and_grads(config, params):
        fn = functools.partial(mean_nll, Transformer(config))
        return jax.jit(jax.value_and_grad(fn))(params, ids, mask)

    loss, grads = loss_and_grads(model.config, params)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads)) > 0
    cases = {
        "remat": (model.config.replace(remat=True), params, grads),
        "scan+remat": (model.config.replace(remat=True, scan_layers=True),
                       stack_layers(params, n_layers), stack_layers(grads, n_layers)),
    }
    for name, (config, case_params, expected_grads) in cases.items():
        case_loss, case_grads = loss_and_grads(config, case_params)
        np.testing.assert_allclose(case_loss, loss, rtol=1e-6, err_msg=name)
        chex.assert_trees_all_close(case_grads, expected_grads, rtol=1e-7, atol=1e-6,
                                    custom_message=name)


# --- RoPE scaling config -----------------------------------------------------------------------

LLAMA3 = dict(rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
              rope_high_freq_factor=4.0, rope_original_max_position=8192)


def test_llama3_rope_config_round_trips_and_scales_only_long_wavelengths():
    from rlhf_jax.models import TransformerConfig
    from rlhf_jax.models.transformer import rope_inv_freq
    config = tiny_config("llama", head_dim=128, rope_theta=500000.0, **LLAMA3)
    assert TransformerConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(config.replace())
    plain = np.asarray(rope_inv_freq(128, 500000.0))
    scaled = np.asarray(rope_inv_freq(128, 500000.0, **config.rope_scaling_params))
    wavelength = 2 * np.pi / plain
    short, long = wavelength < 8192 / 4, wavelength > 8192 / 1
    np.testing.assert_array_equal(scaled[short], plain[short])          # high frequencies kept
    np.testing.assert_allclose(scaled[long], plain[long] / 8.0, rtol=1e-6)   # stretched 8x
    between = ~short & ~long
    assert between.any()
    assert np.all((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8.0))
    assert tiny_config("llama").rope_scaling_params == {}


@pytest.mark.parametrize("overrides, message", [
    (dict(rope_scaling="yarn"), r"rope_scaling='yarn'; expected 'default' or 'llama3'"),
    (dict(LLAMA3, rope_original_max_position=None), r"needs rope_original_max_position"),
    (dict(LLAMA3, rope_factor=0.5), r"rope_factor=0\.5 must be >= 1"),
    (dict(LLAMA3, rope_high_freq_factor=1.0), r"0 < rope_low_freq_factor < rope_high_freq_factor"),
])
def test_invalid_rope_scaling_config(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        tiny_config("llama", **overrides)
    assert "\n" not in str(error.value)


def test_llama3_rope_needs_rope_positions():
    with pytest.raises(ValueError, match=r"needs position='rope', got 'learned'"):
        tiny_config("gpt2", **LLAMA3)


# --- the projection's hand-ordered backward pass ----------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("x_shape,kernel_shape,in_dims", [
    ((2, 5, 8), (8, 3, 4), 1),        # q/k/v: [B, T, D] @ [D, H, Dh]
    ((2, 5, 3, 4), (3, 4, 8), 2),     # o: [B, T, H, Dh] @ [H, Dh, D]
    ((7, 8), (8, 6), 1),
])
def test_projection_gradients_equal_autodiff(x_shape, kernel_shape, in_dims, dtype):
    from rlhf_jax.models.transformer import project
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape), dtype)
    contract = tuple(range(x.ndim - in_dims, x.ndim))
    plain = lambda x, k: jax.lax.dot_general(x, k, ((contract, tuple(range(in_dims))), ((), ())))
    out = plain(x, kernel)
    g = jnp.asarray(rng.standard_normal(out.shape), dtype)
    np.testing.assert_array_equal(project(x, kernel, in_dims), out)
    ours = jax.vjp(lambda x, k: project(x, k, in_dims), x, kernel)[1](g)
    reference = jax.vjp(plain, x, kernel)[1](g)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for a, b in zip(ours, reference):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol * float(jnp.abs(b).max()))
