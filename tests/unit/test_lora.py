"""LoRA on the parameter pytree: parity with the base model, the merged kernel against a NumPy
loop, the adapted projection inside the model, gradients, targets and parameter counts."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import objectives as obj
from rlhf_jax.models import Transformer, abstract_params, stack_layers, tiny_config
from rlhf_jax.models.lora import (LoRA, apply_lora, expand_targets, init_lora, lora_param_count,
                                  lora_targets)

RANK, ALPHA = 4, 8.0


@functools.cache
def _base_params(arch: str):
    """Random values in the model's own parameter tree (``abstract_params``: shapes from
    ``model.init``); filled with NumPy because the jitted ``init_params`` takes ~10 s to compile
    on a busy CPU. Norm scales near 1 and nonzero biases, so every term of a layer matters."""
    config = tiny_config(arch, **({"n_kv_heads": 2} if arch == "llama" else {}))
    rng = np.random.default_rng(0)

    def fill(path, spec):
        name = path[-1].key
        values = rng.normal(size=spec.shape) * (0.1 if name == "scale" else 0.05)
        return jnp.asarray(values + (name == "scale"), spec.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract_params(Transformer(config)))


def build(arch: str = "gpt2", scan_layers: bool = False):
    """A tiny model (llama with grouped-query attention) and its params, stacked under scan."""
    config = tiny_config(arch, scan_layers=scan_layers,
                         **({"n_kv_heads": 2} if arch == "llama" else {}))
    params = _base_params(arch)
    if scan_layers:
        params = stack_layers(params, config.n_layers)
    return Transformer(config), params


@functools.cache
def jitted_apply(model):
    return jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask))


def batch(rows: int = 2, length: int = 7, seed: int = 1):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, 64, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), np.int32)
    mask[0, :2] = 0   # left padding
    return ids, mask


def with_random_b(lora: LoRA, seed: int = 5, std: float = 0.5) -> LoRA:
    """The same adapters with B drawn from N(0, std^2) (A kept)."""
    rng = np.random.default_rng(seed)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(size=x.shape) * std, x.dtype)
        if path[-1].key == "b" else x, lora.adapters)
    return LoRA(adapters=adapters, scale=lora.scale)


def np_merged_kernel(kernel, a, b, scale, n_lead):
    """W + scale * sum_r A[..., r] (outer) B[r, ...], one layer at a time, in float64."""
    kernel, a, b = (np.asarray(x, np.float64) for x in (kernel, a, b))
    if n_lead:
        return np.stack([np_merged_kernel(kernel[i], a[i], b[i], scale, 0)
                         for i in range(kernel.shape[0])])
    out = kernel.copy()
    for r in range(a.shape[-1]):
        out += scale * np.multiply.outer(a[..., r], b[r])
    return out


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# --- parity and the merged kernels ----------------------------------------------------------

@pytest.mark.parametrize("arch,scan_layers", [("gpt2", False), ("llama", True)],
                         ids=["gpt2-unrolled", "llama-scan"])
def test_fresh_adapters_give_the_base_logits_exactly(arch, scan_layers):
    model, params = build(arch, scan_layers)
    lora = init_lora(params, jax.random.key(1), RANK, ALPHA)
    merged = apply_lora(params, lora)
    ids, mask = batch()
    forward = jitted_apply(model)
    np.testing.assert_array_equal(np.asarray(forward(merged, ids, mask)),
                                  np.asarray(forward(params, ids, mask)))
    for path in lora_targets(params):
        np.testing.assert_array_equal(get(merged, path)["kernel"], get(params, path)["kernel"])
    # Non-target leaves are passed through untouched, and the input tree is not mutated.
    assert merged["embed"]["embedding"] is params["embed"]["embedding"]
    block = "layers" if scan_layers else "layer_0"
    assert merged[block]["attn_norm"]["scale"] is params[block]["attn_norm"]["scale"]
    assert merged[block]["attn"]["q"] is not params[block]["attn"]["q"]


@pytest.mark.parametrize("arch,scan_layers", [("gpt2", False), ("gpt2", True), ("llama", False),
                                              ("llama", True)])
def test_merged_kernels_match_loop(arch, scan_layers):
    _, params = build(arch, scan_layers)
    lora = with_random_b(init_lora(params, jax.random.key(2), RANK, ALPHA))
    merged = apply_lora(params, lora)
    expected_names = {"gpt2": {"q", "k", "v", "o", "fc_in", "fc_out"},
                      "llama": {"q", "k", "v", "o", "gate", "up", "down"}}[arch]
    paths = lora_targets(params)
    assert {p[-1] for p in paths} == expected_names
    assert len(paths) == len(expected_names) * (1 if scan_layers else 2)
    for path in paths:
        kernel = get(params, path)["kernel"]
        adapter = get(lora.adapters, path)
        assert adapter["a"].shape[:-1] == kernel.shape[:adapter["a"].ndim - 1]
        expected = np_merged_kernel(kernel, adapter["a"], adapter["b"], ALPHA / RANK,
                                    int(scan_layers))
        np.testing.assert_allclose(np.asarray(get(merged, path)["kernel"], np.float64), expected,
                                   rtol=1e-6, atol=1e-6)
        assert not np.allclose(expected, kernel)
    # scale=0 switches the adapters off; jit gives the same merge.
    switched_off = apply_lora(params, lora, scale=0.0)
    np.testing.assert_array_equal(get(switched_off, paths[0])["kernel"],
                                  get(params, paths[0])["kernel"])
    jitted = jax.jit(apply_lora)(params, lora)
    chex.assert_trees_all_close(jitted, merged, rtol=1e-6, atol=1e-7)


def test_adapted_projections_inside_the_model_equal_x_times_merged_kernel():
    model, params = build("gpt2")
    lora = with_random_b(init_lora(params, jax.random.key(3), RANK, ALPHA))
    ids, mask = batch()
    merged = apply_lora(params, lora)
    run = jax.jit(lambda p: model.apply({"params": p}, ids, mask, capture_intermediates=True))
    logits, state = run(merged)
    inter = state["intermediates"]["layer_1"]
    scale = ALPHA / RANK
    checks = [("attn_norm", ("attn", "q"), "btd,dhk->bthk"),
              ("mlp_norm", ("mlp", "fc_in"), "btd,df->btf")]
    for norm, module, equation in checks:
        x = np.asarray(inter[norm]["__call__"][0], np.float64)
        y = np.asarray(get(inter, module)["__call__"][0], np.float64)
        base = get(params["layer_1"], module)
        adapter = get(lora.adapters["layer_1"], module)
        kernel = np_merged_kernel(base["kernel"], adapter["a"], adapter["b"], scale, 0)
        expected = np.einsum(equation, x, kernel) + np.asarray(base["bias"], np.float64)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    base_logits = jitted_apply(model)(params, ids, mask)
    assert np.abs(np.asarray(logits) - np.asarray(base_logits)).max() > 1e-3  # adapters act


# --- gradients --------------------------------------------------------------------------------

def test_gradient_reaches_b_first_then_a():
    model, params = build("llama", scan_layers=True)
    ids, mask = batch()

    @jax.jit
    @chex.assert_max_traces(n=1)     # the second call (random B, same shapes) reuses the trace
    def lora_grad(lora):
        def loss(l):
            logits = model.apply({"params": apply_lora(params, l)}, ids, mask)
            return obj.next_token_loss(logits[:, :-1], ids[:, 1:], mask[:, 1:])[0]
        return jax.grad(loss)(lora)

    lora = init_lora(params, jax.random.key(4), RANK, ALPHA)
    grads = lora_grad(lora)
    assert isinstance(grads, LoRA) and grads.scale == lora.scale
    for path in lora_targets(params):
        g = get(grads.adapters, path)
        assert np.all(np.asarray(g["a"]) == 0.0), path        # dL/dA = dL/dW' B^T = 0 with B = 0
        per_layer = np.abs(np.asarray(g["b"])).reshape(g["b"].shape[0], -1).max(axis=-1)
        assert np.all(per_layer > 0), path                     # every layer's B learns

    grads = lora_grad(with_random_b(lora))
    for path in lora_targets(params):
        g = get(grads.adapters, path)
        assert np.abs(np.asarray(g["a"])).max() > 0, path
        assert np.abs(np.asarray(g["b"])).max() > 0, path
        assert np.all(np.isfinite(np.asarray(g["a"]))) and np.all(np.isfinite(np.asarray(g["b"])))


# --- targets, counts, init --------------------------------------------------------------------

def test_param_count_and_shapes_by_hand():
    _, params = build("gpt2")
    d, h, dh, f, layers = 32, 4, 8, 64, 2
    per_layer = {"q": (d, h * dh), "k": (d, h * dh), "v": (d, h * dh), "o": (h * dh, d),
                 "fc_in": (d, f), "fc_out": (f, d)}
    lora = init_lora(params, jax.random.key(0), RANK, ALPHA)
    assert lora.rank == RANK and lora.scale == ALPHA / RANK
    assert lora_param_count(lora) == layers * sum(RANK * (i + o) for i, o in per_layer.values())
    assert get(lora.adapters, ("layer_0", "attn", "o"))["a"].shape == (h, dh, RANK)
    assert get(lora.adapters, ("layer_0", "attn", "q"))["b"].shape == (RANK, h, dh)

    attn_only = init_lora(params, jax.random.key(0), 2, 2.0, targets="attn")
    assert set(attn_only.adapters["layer_0"]) == {"attn"}
    assert lora_param_count(attn_only) == layers * sum(
        2 * (i + o) for name, (i, o) in per_layer.items() if name in {"q", "k", "v", "o"})

    stacked = init_lora(stack_layers(params, layers), jax.random.key(0), RANK, ALPHA, ("q", "v"))
    assert stacked.adapters["layers"]["attn"]["q"]["a"].shape == (layers, d, RANK)
    assert stacked.adapters["layers"]["attn"]["v"]["b"].shape == (layers, RANK, h, dh)


def test_a_init_is_scaled_normal_and_b_is_zero():
    _, params = build("gpt2")
    lora = init_lora(params, jax.random.key(7), 16, 16.0, targets=("fc_out",))
    for layer in ("layer_0", "layer_1"):
        a = np.asarray(lora.adapters[layer]["mlp"]["fc_out"]["a"])
        assert a.dtype == np.float32 and a.shape == (64, 16)
        assert abs(a.std() * np.sqrt(64) - 1.0) < 0.15        # N(0, 1 / fan_in)
        assert np.all(np.asarray(lora.adapters[layer]["mlp"]["fc_out"]["b"]) == 0.0)
    a0 = lora.adapters["layer_0"]["mlp"]["fc_out"]["a"]
    assert not np.allclose(a0, lora.adapters["layer_1"]["mlp"]["fc_out"]["a"])  # own keys


def test_target_validation():
    _, params = build("gpt2")
    assert expand_targets("all") == expand_targets(("attn", "mlp"))
    with pytest.raises(ValueError, match="unknown LoRA target"):
        init_lora(params, jax.random.key(0), RANK, ALPHA, targets=("query",))
    with pytest.raises(ValueError, match="no LoRA target"):
        init_lora(params, jax.random.key(0), RANK, ALPHA, targets=("gate",))  # GELU model
    with pytest.raises(ValueError, match="rank"):
        init_lora(params, jax.random.key(0), 0, ALPHA)
    # Abstract parameters are enough to build adapters (shapes only).
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert lora_param_count(init_lora(abstract, jax.random.key(0), RANK, ALPHA)) == \
        lora_param_count(init_lora(params, jax.random.key(0), RANK, ALPHA))


def test_merge_with_shardings_constrains_each_product_to_its_kernels_sharding():
    """Replicated adapters on an FSDP-sharded base: given the base's shardings, each A @ B is
    constrained to its kernel's sharding (in a whole PPO update XLA otherwise keeps the float32
    products replicated: the LoRA update of Llama-3.2-1B on v5e:4x4 needed 17.4 GB per device,
    more than its full fine-tune); the merged values are the same."""
    from rlhf_jax.models.params import abstract_params as placed_params
    from rlhf_jax.sharding import make_mesh
    mesh = make_mesh((1, 8, 1))
    config = tiny_config("llama", scan_layers=True, n_kv_heads=2, d_model=64, d_ff=256)
    model = Transformer(config).clone(mesh=mesh)
    specs = placed_params(model, mesh)
    shardings = jax.tree.map(lambda s: s.sharding, specs)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jax.device_put(
        rng.normal(size=s.shape).astype(s.dtype) * 0.05, s.sharding), specs)
    lora = with_random_b(init_lora(params, jax.random.key(3), RANK, ALPHA, ("mlp",)))
    n_adapted = len(lora_targets(params, ("mlp",)))
    kernel = lambda tree: tree["layers"]["mlp"]["up"]["kernel"]
    assert not kernel(shardings).is_fully_replicated       # the base is sharded at all

    def merged(with_shardings):
        fn = jax.jit(lambda p, a: apply_lora(
            p, LoRA(a, lora.scale), shardings=shardings if with_shardings else None))
        return fn(params, lora.adapters), fn.lower(params, lora.adapters).as_text()

    (plain, plain_text), (constrained, constrained_text) = merged(False), merged(True)
    chex.assert_trees_all_close(constrained, plain, rtol=1e-6, atol=1e-7)
    count = lambda text: text.count("sharding_constraint")     # shardy's op
    assert count(constrained_text) == count(plain_text) + n_adapted
