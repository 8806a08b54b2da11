"""Mesh construction, the logical-axis rules, and sharded == unsharded forward and gradient."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.models import (Transformer, abstract_params, init_params, param_shardings,
                             place_params, stack_layers, tiny_config)
from rlhf_jax.sharding import (as_auto_mesh, batch_sharding, logical_to_spec, make_mesh, replicated,
                               replicated_fraction, resolve_mesh_shape, shard_batch,
                               with_logical_constraint)


# --- mesh shapes -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape, resolved", [
    ((-1, 1, 1), (8, 1, 1)),
    ((2, -1, 2), (2, 2, 2)),
    ((1, 2, -1), (1, 2, 4)),
    ((1, 1, 8), (1, 1, 8)),
])
def test_resolve_mesh_shape_fills_the_minus_one(shape, resolved):
    assert resolve_mesh_shape(shape, 8) == resolved


@pytest.mark.parametrize("shape, message", [
    ((-1, -1, 2), "at most one axis may be -1"),
    ((0, -1, 1), "axis sizes must be positive"),
    ((2, -2, 1), "axis sizes must be positive"),
    ((3, -1, 1), "8 devices are not divisible by 3"),
    ((2, 2, 1), r"mesh shape \(2, 2, 1\) has 4 slots but there are 8 devices"),
])
def test_resolve_mesh_shape_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        resolve_mesh_shape(shape, 8)


def test_make_mesh_uses_auto_axes_and_standard_names():
    mesh = make_mesh((2, -1, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="does not match axis names"):
        make_mesh((2, 4))


# --- logical axis rules ----------------------------------------------------------------------

def test_parameter_rules_on_fsdp_and_tensor_mesh():
    mesh = make_mesh((1, 2, 4))
    assert logical_to_spec(("vocab", "embed"), mesh, shape=(128, 64)) == P("tensor", "fsdp")
    assert logical_to_spec(("embed", "heads", "head_dim"), mesh, shape=(64, 8, 8)) == P(
        "fsdp", "tensor", None)
    assert logical_to_spec(("mlp", "embed"), mesh, shape=(128, 64)) == P("tensor", "fsdp")
    assert logical_to_spec(("norm",), mesh, shape=(64,)) == P(None)
    assert logical_to_spec((None, "not_a_rule"), mesh, shape=(4, 4)) == P(None, None)


def test_rules_fall_back_when_mesh_axis_does_not_divide():
    mesh = make_mesh((1, 2, 4))
    # kv_heads=2 on tensor=4: replicated instead of an error.
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), mesh, shape=(64, 2, 8)) == P(
        "fsdp", None, None)
    assert logical_to_spec(("vocab", "embed"), mesh, shape=(97, 63)) == P(None, None)
    # Without a shape every rule applies as written.
    assert logical_to_spec(("embed", "kv_heads"), mesh) == P("fsdp", "tensor")


def test_batch_rule_keeps_the_longest_dividing_prefix():
    mesh = make_mesh((2, 2, 2))
    assert logical_to_spec(("activation_batch", None), mesh, shape=(8, 3)) == P(("data", "fsdp"), None)
    assert logical_to_spec(("activation_batch", None), mesh, shape=(2, 3)) == P("data", None)
    assert logical_to_spec(("activation_batch", None), mesh, shape=(3, 3)) == P(None, None)


def test_each_mesh_axis_is_used_once_per_array():
    mesh = make_mesh((1, 2, 4))
    # heads and mlp both want "tensor": the first dim gets it, the second stays replicated.
    assert logical_to_spec(("heads", "mlp"), mesh, shape=(8, 128)) == P("tensor", None)
    rules = (("a", "fsdp"), ("b", ("fsdp", "tensor")))
    assert logical_to_spec(("a", "b"), mesh, rules, shape=(8, 8)) == P("fsdp", "tensor")


def test_ordered_rules_try_the_next_target():
    mesh = make_mesh((1, 2, 4))
    rules = (("embed", "tensor"), ("embed", "fsdp"))
    assert logical_to_spec(("embed",), mesh, rules, shape=(8,)) == P("tensor")
    assert logical_to_spec(("embed",), mesh, rules, shape=(6,)) == P("fsdp")   # 6 % 4 != 0
    assert logical_to_spec(("embed",), mesh, rules, shape=(5,)) == P(None)


def test_size_one_mesh_axes_are_dropped():
    mesh = make_mesh((8, 1, 1))
    assert logical_to_spec(("activation_batch", None), mesh, shape=(8, 4)) == P("data", None)
    assert logical_to_spec(("vocab", "embed"), mesh, shape=(128, 64)) == P(None, None)
    mesh = make_mesh((1, 8, 1))
    assert logical_to_spec(("activation_batch",), mesh, shape=(8,)) == P("fsdp")


def test_logical_constraint_is_a_no_op_without_mesh():
    x = jnp.ones((4, 3))
    assert with_logical_constraint(x, ("activation_batch", None), None) is x


# --- sharded model == single-device model ----------------------------------------------------

BATCH, LENGTH = 8, 8


def sharding_config(arch: str, **overrides):
    sizes = dict(vocab_size=128, d_model=64, n_heads=8, d_ff=128, n_layers=2, max_position=32)
    if arch == "llama":
        sizes["n_kv_heads"] = 2      # not divisible by tensor=4 or 8: exercises the fallback
    sizes.update(overrides)
    return tiny_config(arch, **sizes)


def batch():
    ids = np.random.RandomState(0).randint(1, 128, (BATCH, LENGTH)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[5, :6] = 0
    return ids, mask


def mean_nll(model, params, ids, mask):
    logits = model.apply({"params": params}, ids, mask).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1])
    target_logp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weights = mask[:, 1:].astype(jnp.float32)
    return -(target_logp * weights).sum() / weights.sum()


def forward_and_grad(model, params, ids, mask, mesh=None):
    def fn(params, ids, mask):
        loss, grads = jax.value_and_grad(functools.partial(mean_nll, model))(params, ids, mask)
        return model.apply({"params": params}, ids, mask), loss, grads
    if mesh is None:
        return jax.jit(fn)(params, ids, mask)
    shardings = param_shardings(model, mesh)
    rows = batch_sharding(mesh, 2)
    logits_sharding = NamedSharding(mesh, P(("data", "fsdp"), None, None))
    jitted = jax.jit(fn, in_shardings=(shardings, rows, rows),
                     out_shardings=(logits_sharding, replicated(mesh), shardings))
    return jitted(params, jax.device_put(ids, rows), jax.device_put(mask, rows))


@functools.cache
def single_device_reference(config, seed=0):
    """Params (as numpy) and the unsharded logits, loss and grads."""
    model = Transformer(config)
    params = init_params(model, jax.random.key(seed))
    logits, loss, grads = forward_and_grad(model, params, *batch())
    return jax.device_get((params, logits, loss, grads))


def test_init_params_are_born_sharded_with_single_device_values():
    config = sharding_config("llama")
    ref_params = single_device_reference(config)[0]
    mesh = make_mesh((1, 2, 4))
    model = Transformer(config, mesh=mesh)
    params = init_params(model, jax.random.key(0), mesh)
    expected = param_shardings(model, mesh)
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding == sharding
    chex.assert_trees_all_equal(params, ref_params)
    embedding = params["embed"]["embedding"]                 # [V, D] = ("vocab", "embed")
    assert embedding.sharding.spec == P("tensor", "fsdp")
    assert embedding.addressable_shards[0].data.shape == (128 // 4, 64 // 2)
    assert params["layer_1"]["mlp"]["gate"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert params["final_norm"]["scale"].sharding.is_fully_replicated


def compare_with_reference(label, logits, loss, grads, reference):
    _, ref_logits, ref_loss, ref_grads = reference
    real = batch()[1].astype(bool)
    logit_diff = np.abs(np.asarray(logits) - ref_logits)[real].max()
    print(f"\n[sharded {label}]: max |logit diff| {logit_diff:.2e}")
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-5)
    assert logit_diff <= 1e-5
    chex.assert_trees_all_close(grads, ref_grads, rtol=0.0, atol=1e-5, custom_message=label)


@pytest.mark.parametrize("arch, mesh_shape", [
    ("llama", (8, 1, 1)), ("llama", (2, 2, 2)), ("llama", (1, 2, 4)), ("llama", (1, 1, 8)),
    # GPT-2's sharded gradients also run in every sharded PPO test; this one is the slow tier's.
    pytest.param("gpt2", (1, 2, 4), marks=pytest.mark.slow),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_sharded_forward_and_gradient_equal_single_device(arch, mesh_shape):
    config = sharding_config(arch)
    reference = single_device_reference(config)
    mesh = make_mesh(mesh_shape)
    model = Transformer(config, mesh=mesh)          # activation constraints on
    shardings = param_shardings(model, mesh)
    params = place_params(reference[0], model, mesh)
    logits, loss, grads = forward_and_grad(model, params, *batch(), mesh=mesh)
    for leaf, sharding in zip(jax.tree.leaves(grads), jax.tree.leaves(shardings)):
        assert leaf.sharding == sharding
    if mesh_shape[2] > 1:    # something is actually split over the tensor axis
        assert not shardings["layer_0"]["attn"]["q"]["kernel"].is_fully_replicated
    compare_with_reference(f"{mesh_shape} {arch}", logits, loss, grads, reference)


def test_sharded_scanned_remat_model_equals_single_device():
    config = sharding_config("llama")
    ref_params, ref_logits, ref_loss, ref_grads = single_device_reference(config)
    n_layers = config.n_layers
    scanned = config.replace(scan_layers=True, remat=True)
    mesh = make_mesh((2, 2, 2))
    model = Transformer(scanned, mesh=mesh)
    shardings = param_shardings(model, mesh)
    assert shardings["layers"]["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)
    params = place_params(stack_layers(ref_params, n_layers), model, mesh)
    logits, loss, grads = forward_and_grad(model, params, *batch(), mesh=mesh)
    compare_with_reference("(2, 2, 2) llama scan+remat", logits, loss, grads,
                           (None, ref_logits, ref_loss, stack_layers(ref_grads, n_layers)))


def test_param_shardings_follow_the_rules():
    mesh = make_mesh((1, 2, 4))
    shardings = param_shardings(Transformer(sharding_config("llama")), mesh)
    specs = jax.tree.map(lambda s: s.spec, shardings)
    assert specs["embed"]["embedding"] == P("tensor", "fsdp")            # [V, D]
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")             # [D, V]
    assert specs["layer_0"]["attn"]["q"]["kernel"] == P("fsdp", "tensor", None)
    assert specs["layer_0"]["attn"]["k"]["kernel"] == P("fsdp", None, None)   # 2 kv heads
    assert specs["layer_0"]["attn"]["o"]["kernel"] == P("tensor", None, "fsdp")
    assert specs["layer_0"]["mlp"]["down"]["kernel"] == P("tensor", "fsdp")
    assert specs["layer_0"]["attn_norm"]["scale"] == P(None)


def test_replicated_fraction():
    config = sharding_config("gpt2")
    host_params = single_device_reference(config)[0]
    mesh = make_mesh((1, 2, 4))
    sharded = place_params(host_params, Transformer(config, mesh=mesh), mesh)
    fraction = replicated_fraction(sharded)
    print(f"\n[replicated fraction] gpt2 d_model=64 on (1,2,4): {fraction:.3f}")
    assert fraction < 0.5
    one_device = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    on_one_device = place_params(host_params, Transformer(config, mesh=one_device), one_device)
    assert replicated_fraction(on_one_device) == pytest.approx(1.0)
    assert replicated_fraction(host_params) == pytest.approx(1.0)    # numpy: no sharding


def test_shard_batch_places_rows_over_data_and_fsdp():
    mesh = make_mesh((2, 2, 2))
    rows = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    sharded = shard_batch({"input_ids": rows, "weights": rows[:, 0].astype(np.float32)}, mesh)
    ids = sharded["input_ids"]
    assert ids.sharding == NamedSharding(mesh, P(("data", "fsdp"), None))
    assert sharded["weights"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(ids), rows)
    device_coords = {d: c for c, d in np.ndenumerate(mesh.devices)}
    for shard in ids.addressable_shards:
        data, fsdp, _ = device_coords[shard.device]
        block = data * 2 + fsdp                   # 4 row blocks of 2, tensor axis replicates
        assert shard.data.shape == (2, 5)
        np.testing.assert_array_equal(np.asarray(shard.data), rows[2 * block:2 * block + 2])


# --- meshes as users make them (jax.make_mesh: Explicit axes) --------------------------------

def explicit_mesh(shape):
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"))
    assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)   # jax's default
    return mesh


def test_as_auto_mesh_keeps_devices_and_rejects_unknown_axes():
    mesh = explicit_mesh((2, 2, 2))
    auto = as_auto_mesh(mesh)
    assert all(t == jax.sharding.AxisType.Auto for t in auto.axis_types)
    assert auto.axis_names == mesh.axis_names and (auto.devices == mesh.devices).all()
    assert as_auto_mesh(auto) is auto and as_auto_mesh(None) is None
    with pytest.raises(ValueError, match=r"\['model'\] unknown"):
        as_auto_mesh(jax.make_mesh((2, 4), ("data", "model")))


def test_explicit_mesh_works_for_init_place_and_the_sharded_forward():
    config = sharding_config("llama")
    reference = single_device_reference(config)
    mesh = explicit_mesh((2, 2, 2))
    model = Transformer(config, mesh=mesh)
    assert all(t == jax.sharding.AxisType.Auto for t in model.mesh.axis_types)
    params = init_params(model, jax.random.key(0), mesh)
    chex.assert_trees_all_equal(params, reference[0])
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert jax.tree.structure(abstract_params(model, mesh)) == jax.tree.structure(params)
    placed = place_params(reference[0], model, mesh)
    logits, loss, grads = forward_and_grad(model, placed, *batch(), mesh=mesh)
    compare_with_reference("(2, 2, 2) llama, jax.make_mesh", logits, loss, grads, reference)


# --- no involuntary full rematerialization -----------------------------------------------------
# XLA's SPMD partitioner logs "[SPMD] Involuntary full rematerialization" (C++ logging, stderr)
# when it can only reshard a value by replicating it on every device. The embedding lookup used
# to do that on a (2, 2, 2) mesh. Compiles run in a subprocess so the C++ log can be captured.

REMAT_WARNING = "Involuntary full rematerialization"

_COMPILE_SCRIPT = r'''
import sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from rlhf_jax.models import Transformer, init_params, param_shardings, tiny_config
from rlhf_jax.sampling import SamplingConfig, make_generate_fn
from rlhf_jax.sharding import batch_sharding, make_mesh, replicated


def unconstrained_lookup(shape):
    """Control: the old lookup, a ("tensor", "fsdp") table gathered into batch-split rows."""
    mesh = make_mesh(shape)
    table = jax.ShapeDtypeStruct((128, 64), jnp.float32,
                                 sharding=NamedSharding(mesh, P("tensor", "fsdp")))
    ids = jax.ShapeDtypeStruct((8, 8), jnp.int32, sharding=batch_sharding(mesh, 2))
    rows = NamedSharding(mesh, P(("data", "fsdp"), None, None))
    fn = lambda t, i: jax.lax.with_sharding_constraint(jnp.take(t, i, axis=0), rows)
    jax.jit(fn).lower(table, ids).compile()


def model_steps(arch, shape):
    """Forward, value_and_grad of a token NLL, and the sampler, as the stages compile them."""
    sizes = dict(vocab_size=128, d_model=64, n_heads=8, d_ff=128, n_layers=1, max_position=32)
    if arch == "llama":
        sizes["n_kv_heads"] = 2
    mesh = make_mesh(shape)
    model = Transformer(tiny_config(arch, **sizes), mesh=mesh)
    shardings = param_shardings(model, mesh)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
    ids = jax.ShapeDtypeStruct((8, 8), jnp.int32, sharding=batch_sharding(mesh, 2))

    def loss(p, ids, mask):
        logp = jax.nn.log_softmax(model.apply({"params": p}, ids, mask).astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1))
    jax.jit(lambda p, i, m: model.apply({"params": p}, i, m)).lower(params, ids, ids).compile()
    jax.jit(jax.value_and_grad(loss),
            out_shardings=(replicated(mesh), shardings)).lower(params, ids, ids).compile()
    generate = make_generate_fn(model, SamplingConfig(max_new_tokens=3, greedy=True), mesh)
    generate.lower(params, ids, ids, jax.random.key(0)).compile()


if sys.argv[1] == "control":
    unconstrained_lookup((2, 2, 2))
else:
    for arch, shape in (("llama", (2, 2, 2)), ("gpt2", (2, 2, 2)), ("llama", (1, 4, 2))):
        model_steps(arch, shape)
print("compiled")
'''


def compile_in_subprocess(mode: str) -> str:
    """stderr (XLA's C++ log included) of compiling ``mode`` on 8 CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, mode], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
    return result.stderr


@pytest.mark.heavy     # compiles every step of three stages
def test_compiles_have_no_involuntary_full_rematerialization():
    # The capture works: the old unconstrained lookup does trigger the warning.
    assert REMAT_WARNING in compile_in_subprocess("control")
    stderr = compile_in_subprocess("models")
    hits = [line[:400] for line in stderr.splitlines() if REMAT_WARNING in line]
    assert not hits, "\n".join(hits)
