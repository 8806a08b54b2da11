"""The rollout's sampler layout (``ppo.sampler``): the policy is resharded once per rollout into
a decode layout, so the decode loop gathers no weight; samples equal the training layout's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ppo_toys import ppo_config, toy_overrides

from rlhf_jax import collectives
from rlhf_jax.sharding import make_mesh
from rlhf_jax.stages import ppo

MESH = (1, 4, 2)             # data x fsdp x tensor: weights sharded over fsdp 4 and tensor 2


def program_for(toy_dirs, *overrides):
    cfg = ppo_config(*toy_overrides(toy_dirs, "ppo.rollout_batch_size=8", "ppo.minibatch_size=4",
                                    *overrides))
    models = {"policy": toy_dirs["policy"], "reward": toy_dirs["rm"], "value": toy_dirs["rm"]}
    return ppo.build(cfg, make_mesh(MESH), models=models)


@pytest.fixture(scope="module")
def programs(toy_dirs):
    """``get(*overrides)``: the program and its compiled rollout, built once per module."""
    cache = {}

    def get(*overrides):
        if overrides not in cache:
            program = program_for(toy_dirs, *overrides)
            cache[overrides] = program, program.steps["rollout"].lower().compile()
        return cache[overrides]
    return get


def loop_gathers(program, compiled, axis="fsdp"):
    """All-gathers over ``axis`` inside the rollout's loops (per call, trips included)."""
    rows = collectives.collectives(compiled.as_text(), dict(program.mesh.shape),
                                   program.steps["rollout"].loop_trips)
    return [r for r in rows if r["kind"] == "all-gather" and r["in_loop"] and axis in r["axes"]]


def test_decode_layout_gathers_no_weight_inside_the_decode_loop(programs):
    (decode, decode_rollout), (train, train_rollout) = (
        programs(f"ppo.sampler.layout={layout}") for layout in ("decode", "train"))
    # Before: the FSDP layout gathers every layer's weights on every generated token.
    before = loop_gathers(train, train_rollout)
    assert before and sum(r["count"] for r in before) >= train.steps["rollout"].loop_trips
    # After: weights replicated over fsdp (sharded over tensor only): nothing over fsdp in the loop.
    assert loop_gathers(decode, decode_rollout) == []
    weights = jax.tree.leaves(decode.steps["rollout"].args[0])
    assert all("fsdp" not in str(w.sharding.spec) for w in weights)
    assert any("tensor" in str(w.sharding.spec) for w in weights)


def _rollout(program, compiled, seed=0):
    state, frozen = program.init_state(jax.random.key(0))
    name_args = program.random_args("rollout", state, frozen, jax.random.key(seed))
    rollout = compiled(*name_args)
    experience = program.steps["experience"].fn(
        state.policy.params, {} if not program.plan.roles.with_value else state.value.params,
        frozen, rollout, jnp.float32(0.1))
    return jax.device_get(rollout), jax.device_get(experience)


def test_samples_equal_the_training_layout_in_float32_and_close_in_bfloat16(programs):
    (r_decode, e_decode), (r_train, _) = (
        _rollout(*programs(f"ppo.sampler.layout={layout}")) for layout in ("decode", "train"))
    np.testing.assert_array_equal(r_decode.sequences, r_train.sequences)
    mask = e_decode.response_mask > 0
    assert mask.sum() > 0
    # float32 sampler: its log-probs are the trainer's up to summation order (KV-cache decode vs
    # one full forward pass).
    assert float(e_decode.sampler_gap[mask].max()) < 1e-4
    _, e_bf16 = _rollout(*programs("ppo.sampler.dtype=bfloat16"))
    gap = e_bf16.sampler_gap[e_bf16.response_mask > 0]
    # bfloat16 weights and activations: ~3 significant digits, stated as 0.05 nats on average.
    assert 0 < float(gap.mean()) < 0.05, gap.mean()


def test_sampler_config_errors_name_field_and_value(toy_dirs):
    from rlhf_jax import validate
    from rlhf_jax.errors import ConfigError
    for override, message in (("ppo.sampler.layout=pipelined", r"ppo.sampler.layout='pipelined'"),
                              ("ppo.sampler.dtype=int4", r"ppo.sampler.dtype='int4'")):
        with pytest.raises(ConfigError, match=message):
            validate.check(ppo_config(override))
