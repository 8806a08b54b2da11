"""LoRA for the PPO policy (``ppo.lora.rank`` > 0; rlhf_jax.stages.ppo + models/lora.py).

Pure pieces on test_ppo's tiny policy and hand rollout: a fresh adapter (B = 0) gives exactly
the experience of the plain policy; an update moves only the adapters (their gradient is the
chain rule of the full-weight gradient) and leaves the base, a non-donated argument, intact.
``build()``'s jitted rollout, experience, update and value-update steps (LoRA on the policy and
on the value: replicated adapters, sharded bases) give the single-device results on (2,2,2) and
(8,1,1) meshes.
Then one micro ``train`` on test_ppo's marker-RM toy task (PPO-ptx, EMA, checkpoints): it writes
model/ = apply_lora(base, adapters), lora/, checkpoints of the adapters only, and compiles
nothing after the first iteration.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ppo_toys import (BETA, B, N, P, hand_rollout, perturbed, ppo_config, ptx_batch, run_train,
                      toy_overrides, toy_roles)

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import model_io
from rlhf_jax.models.lora import LoRA, apply_lora, init_lora, lora_param_count
from rlhf_jax.optim import make_optimizer
from rlhf_jax.scoring import norm_array
from rlhf_jax.sharding import make_mesh
from rlhf_jax.stages import ppo
from rlhf_jax.train_state import TrainState

RANK, ALPHA = 4, 16.0


@pytest.fixture(scope="module")
def lora_nets(base):
    """Policy weights (= the reference: adapters off), RM, value; fresh rank-4 attn adapters."""
    policy, init, reward, reward_init = base
    policy_params = perturbed(init, 10, 0.3)
    reward_params = perturbed(reward_init, 13, 0.3)
    value_params = perturbed(reward_params, 12, 0.05)
    lora = init_lora(policy_params, jax.random.key(5), RANK, ALPHA, ("attn",))
    frozen = ppo.Frozen(policy_params, reward_params, norm_array({"mean": 0.3, "std": 2.0}))
    return dict(plain_roles=toy_roles(policy, reward, reward),
                roles=toy_roles(policy, reward, reward, f"ppo.lora.rank={RANK}"), policy=policy_params,
                value=value_params, frozen=frozen, lora=lora,
                cfg=ppo_config("ppo.ptx_coef=1.0", "ppo.ema_decay=0.9",
                               f"ppo.lora.rank={RANK}").ppo)


def test_lora_config_default_is_off(lora_nets):
    assert ppo_config().ppo.lora.rank == 0
    assert lora_nets["plain_roles"].policy.trains == "full"
    role = lora_nets["roles"].policy
    assert (role.trains, role.lora_rank, role.lora_scale, role.base_from) == (
        "lora", RANK, ALPHA / RANK, "reference")


def test_lora_config_errors_name_field_and_value():
    from rlhf_jax import validate
    from rlhf_jax.errors import ConfigError
    for overrides, message in [(("ppo.lora.rank=-1",), r"ppo.lora.rank=-1"),
                               (("ppo.lora.rank=4", "ppo.lora.alpha=0.0"), r"ppo.lora.alpha=0.0"),
                               (("ppo.lora.rank=4", "ppo.lora.targets=('attn', 'bogus')"),
                                r"ppo.lora.targets=")]:
        with pytest.raises(ConfigError, match=message):
            validate.check(ppo_config(*overrides))


def test_zero_b_experience_equals_plain_policy(lora_nets):
    n = lora_nets
    rollout = ppo.Rollout(**hand_rollout())
    args = (n["value"], n["frozen"], rollout, jnp.float32(BETA))
    plain = jax.jit(functools.partial(ppo.make_experience, roles=n["plain_roles"], prompt_len=P,
                                      cfg=n["cfg"]))
    with_lora = jax.jit(functools.partial(ppo.make_experience, roles=n["roles"], prompt_len=P,
                                          cfg=n["cfg"]))
    ref = jax.device_get(plain(n["policy"], *args))
    got = jax.device_get(with_lora(n["lora"].adapters, *args))
    for field in ("old_logprobs", "ref_logprobs", "old_values", "rewards", "kl", "scores",
                  "advantages", "returns"):
        np.testing.assert_allclose(getattr(got, field), getattr(ref, field), rtol=1e-6,
                                   atol=1e-6, err_msg=field)
    # Policy == reference at the start: no KL, as in the full fine-tune.
    np.testing.assert_array_equal(got.kl, 0.0)


@pytest.mark.heavy     # the quick tier's LoRA PPO: the train, checkpoint and no-recompile tests
def test_update_moves_only_adapters_by_the_chain_rule(lora_nets):
    n = lora_nets
    cfg, lora = n["cfg"], n["lora"]
    rollout = ppo.Rollout(**hand_rollout())
    exp = jax.jit(functools.partial(ppo.make_experience, roles=n["roles"], prompt_len=P, cfg=cfg))(
        lora.adapters, n["value"], n["frozen"], rollout, jnp.float32(BETA))
    ptx = ptx_batch()
    idx = jnp.arange(4, dtype=jnp.int32)
    mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), exp)

    # d/dB of the objective at W + s A B is s A^T dW (B = 0: A gets no gradient yet).
    full, _ = ppo.policy_gradient(n["policy"], {}, n["plain_roles"], mb, ptx, prompt_len=P,
                                  cfg=cfg)
    part, _ = ppo.policy_gradient(lora.adapters, n["policy"], n["roles"], mb, ptx, prompt_len=P,
                                  cfg=cfg)
    q_a = lora.adapters["layer_0"]["attn"]["q"]["a"]
    expected_b = lora.scale * jnp.einsum("dr,dhk->rhk", q_a, full["layer_0"]["attn"]["q"]["kernel"])
    np.testing.assert_allclose(part["layer_0"]["attn"]["q"]["b"], expected_b, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(part["layer_0"]["attn"]["q"]["a"], 0.0)

    opt = make_optimizer(3e-2)
    # Own buffers: the step donates them, and the fixture's adapters serve later tests.
    own = jax.tree.map(jnp.copy, lora.adapters)
    state = TrainState(jnp.zeros((), jnp.int32), own, opt.init(own))
    ema = jax.tree.map(jnp.copy, lora.adapters)
    base_before = jax.device_get(n["policy"])
    update = jax.jit(functools.partial(ppo.policy_update_step, roles=n["roles"], policy_opt=opt,
                                       prompt_len=P, cfg=cfg),
                     donate_argnums=(0, 1))
    new_state, new_ema, stats = update(state, ema, exp, idx, ptx, n["policy"])
    assert np.isfinite(float(stats["ptx_loss"])) and float(stats["policy_grad_norm"]) > 0
    # The trained tree is the adapters; every B moved, the base is untouched and still alive.
    assert jax.tree.structure(new_state.params) == jax.tree.structure(lora.adapters)
    for path, b in jax.tree_util.tree_leaves_with_path(new_state.params):
        if path[-1].key == "b":
            assert float(jnp.abs(b).max()) > 0, path
    assert not any(x.is_deleted() for x in jax.tree.leaves(n["policy"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(n["policy"]), base_before)
    # EMA over the adapters: decay * old (0) + (1 - decay) * new for B.
    q = lambda t: t["layer_0"]["attn"]["q"]["b"]
    np.testing.assert_allclose(q(new_ema), (1 - cfg.ema_decay) * q(new_state.params), rtol=1e-5,
                               atol=1e-9)


# --- the loop ------------------------------------------------------------------------------------

LORA_ITERATIONS = 3


@pytest.fixture(scope="module")
def lora_run(toy_dirs):  # noqa: F811
    cfg = ppo_config(*toy_overrides(
        toy_dirs, f"ppo.iterations={LORA_ITERATIONS}", "ppo.rollout_batch_size=16",
        "ppo.minibatch_size=8", "ppo.ptx_coef=1.0", "ppo.lr=3e-2", "ppo.ema_decay=0.9",
        "ppo.checkpoint_every=1", f"ppo.lora.rank={RANK}", f"ppo.lora.alpha={ALPHA}"))
    workdir = toy_dirs["root"] / "lora_ppo"
    final, compiles = run_train(cfg, workdir)
    return dict(cfg=cfg, workdir=str(workdir), final=final, compiles=compiles)


@pytest.mark.heavy     # trains LoRA PPO; the quick tier's LoRA: tests/unit/test_lora.py, test_value_lora, test_lora_export
def test_lora_train_writes_merged_model_and_adapters(lora_run, toy_dirs):  # noqa: F811
    workdir = lora_run["workdir"]
    assert np.isfinite(lora_run["final"]["ptx/loss"])
    info = json.load(open(os.path.join(workdir, "lora", "lora.json")))
    assert info["rank"] == RANK and info["scale"] == ALPHA / RANK
    assert info["targets"] == ["attn"]
    adapters = jax.device_get(ckpt_lib.load_pytree(os.path.join(workdir, "lora", "adapters")))
    lora = LoRA(adapters, info["scale"])
    assert info["n_params"] == lora_param_count(lora)

    _, base_params, _, _ = model_io.load_model(str(toy_dirs["root"] / "sft"), None)
    model, merged, tok, extra = model_io.load_model(os.path.join(workdir, "model"), None)
    assert tok is not None and extra["lora_rank"] == RANK and extra["lora_merged"]
    expected = jax.device_get(jax.jit(apply_lora)(jax.device_get(base_params), lora))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 jax.device_get(merged), expected)
    # The adapters trained (the merged model is not the base), only on the attention kernels.
    moved = jax.tree_util.tree_map_with_path(
        lambda path, a, b: (jax.tree_util.keystr(path), not np.array_equal(a, b)),
        jax.device_get(merged), jax.device_get(base_params))
    changed = {name for name, diff in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple))
               if diff}
    assert changed and all("attn" in name and "kernel" in name for name in changed), changed
    assert os.path.isdir(os.path.join(workdir, "model_ema"))


@pytest.mark.heavy     # trains LoRA PPO; the quick tier's LoRA: tests/unit/test_lora.py, test_value_lora, test_lora_export
def test_lora_checkpoints_hold_only_adapters(lora_run):
    """The checkpoint restores into build()'s abstract state, whose policy is the adapters."""
    cfg = lora_run["cfg"]
    program = ppo.build(cfg, make_mesh((-1, 1, 1)))
    adapters = program.state.policy.params
    assert jax.tree.structure(program.state.ema_params) == jax.tree.structure(adapters)
    assert all(path[-1].key in ("a", "b") for path, _ in
               jax.tree_util.tree_leaves_with_path(adapters))
    assert all(s.sharding.is_fully_replicated for s in jax.tree.leaves(adapters))
    # The profiling-only ptx step (not run by train) lowers too: adapters, ptx batch, base.
    assert len(program.steps["ptx"].args) == 3
    program.steps["ptx"].lower()
    with ckpt_lib.Checkpointer(os.path.join(lora_run["workdir"], "checkpoints")) as checkpointer:
        steps = checkpointer.all_steps()
        assert steps and max(steps) == LORA_ITERATIONS - 1
        restored, meta = checkpointer.restore(max(steps), program.state)
    assert int(restored.policy.step) == (LORA_ITERATIONS - 1) * 2
    assert jax.tree.structure(restored.policy.params) == jax.tree.structure(adapters)


@pytest.mark.heavy     # trains LoRA PPO; the quick tier's LoRA: tests/unit/test_lora.py, test_value_lora, test_lora_export
def test_lora_no_recompilation_across_iterations(lora_run):
    compiles = lora_run["compiles"]
    assert len(compiles) == LORA_ITERATIONS and compiles[0] > 0
    # Iteration 2's window also holds the first checkpoint save's eager compiles; from then on
    # nothing compiles.
    assert compiles[2:] == [compiles[1]] * (LORA_ITERATIONS - 2), compiles


# --- sharded == unsharded, through build()'s jitted steps ---------------------------------------

MESH_UPDATES = 4          # 2 epochs x 2 minibatches of 4


def lora_mesh_cfg():
    # ptx rows = ptx_per_episode x minibatch_size = 8: divisible over data x fsdp = 8 of (8,1,1).
    return ppo_config(f"data.max_prompt_len={P}", f"data.max_response_len={N}",
                      "data.ptx_seq_len=8", "ppo.rollout_batch_size=8", "ppo.minibatch_size=4",
                      "ppo.ptx_per_episode=2", "ppo.ptx_coef=1.0", "ppo.ema_decay=0.9",
                      "ppo.lr=1e-2", "ppo.warmup_iterations=0", "ppo.iterations=1",
                      "ppo.epochs=2", f"ppo.lora.rank={RANK}", f"ppo.lora.alpha={ALPHA}",
                      f"ppo.value_lora.rank={RANK}", "ppo.value_lora.targets=('attn', 'mlp')")


@pytest.fixture(scope="module")
def lora_mesh_inputs(lora_nets):
    """Host inputs shared by every mesh: weights, adapters with B != 0 (so the merged policy is
    not the reference and every LoRA term matters), the hand rollout, ptx batches, minibatches."""
    n = jax.device_get({k: lora_nets[k] for k in ("policy", "value", "frozen")})
    adapters = perturbed(lora_nets["lora"].adapters, 21, 0.05)
    # The value's trainables on the RM, B != 0 too.
    value_role = ppo.make_roles(lora_mesh_cfg().ppo, lora_nets["roles"].policy.model,
                                lora_nets["roles"].reward.model,
                                lora_nets["roles"].reward.model)[0].value
    value = perturbed(value_role.trainable_from(n["value"], jax.random.key(8)), 22, 0.05)
    order = np.random.default_rng(0)
    indices = [perm[i:i + 4] for perm in (order.permutation(B) for _ in range(2))
               for i in (0, 4)]
    return dict(policy=n["policy"], value=jax.device_get(value), reward=n["frozen"].reward,
                adapters=jax.device_get(adapters), rollout=hand_rollout(),
                ptx=[jax.device_get(ptx_batch(seed=30 + i, batch=8)) for i in range(MESH_UPDATES)],
                indices=[i.astype(np.int32) for i in indices])


def run_lora_steps(inputs, base_models, shape):
    """Rollout, experience and MESH_UPDATES policy updates (PPO-ptx, EMA) and value updates
    through the steps ``ppo.build`` jits for ``shape``, with the state placed as ``train``
    places it."""
    mesh = make_mesh(shape)
    models = {name: getattr(base_models, name).model.clone(mesh=mesh)
              for name in ("policy", "value", "reward")}
    program = ppo.build(lora_mesh_cfg(), mesh, models=models)
    plan, steps = program.plan, program.steps
    place = lambda tree, like: jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), tree, like)
    state = ppo.init_ppo_state(program.state, plan.policy_opt, plan.value_opt,
                               inputs["adapters"], inputs["value"])
    frozen = ppo.make_frozen(program.frozen, inputs["policy"], inputs["reward"],
                             {"mean": 0.3, "std": 2.0})
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.policy.params))
    base_arg = (frozen.reference,)

    r = inputs["rollout"]
    prompts = place((r["sequences"][:, :P], r["attention_mask"][:, :P]), steps["rollout"].args[1:3])
    sampler_weights = steps["sync"].fn(state.policy.params, *base_arg)   # merged, resharded
    sampled = steps["rollout"].fn(sampler_weights, *prompts,
                                  place(jax.random.key(7), steps["rollout"].args[3]))
    # The hand rollout's sampler log-probs: zeros (only the experience's gap field reads them).
    rollout = place(ppo.Rollout(**r, logprobs=np.zeros(r["response_mask"].shape, np.float32)),
                    steps["experience"].args[3])
    experience = steps["experience"].fn(state.policy.params, state.value.params, frozen, rollout,
                                        place(jnp.float32(BETA), steps["experience"].args[4]))
    out = dict(sampled=jax.device_get(sampled), experience=jax.device_get(experience), stats=[])
    policy, ema = state.policy, state.ema_params
    for idx, ptx in zip(inputs["indices"], inputs["ptx"]):
        policy, ema, stats = steps["update"].fn(policy, ema, experience,
                                                place(idx, steps["update"].args[3]),
                                                place(ptx, steps["update"].args[4]), *base_arg)
        out["stats"].append(jax.device_get(stats))
    value, out["value_stats"] = state.value, []
    for idx in inputs["indices"]:
        value, stats = steps["value_update"].fn(value, experience,
                                                place(idx, steps["value_update"].args[2]),
                                                frozen.reward)
        out["value_stats"].append(jax.device_get(stats))
    return out | dict(adapters=jax.device_get(policy.params), ema=jax.device_get(ema),
                      opt_state=jax.device_get(policy.opt_state), step=int(policy.step),
                      value=jax.device_get(value.params), value_step=int(value.step))


@pytest.fixture(scope="module")
def lora_mesh_runs(lora_mesh_inputs, lora_nets):
    """``get(shape)``: ``run_lora_steps`` on that mesh, run once (the reference is shared)."""
    out = {}

    def get(shape):
        if shape not in out:
            out[shape] = run_lora_steps(lora_mesh_inputs, lora_nets["roles"], shape)
        return out[shape]
    return get


def assert_trees_close(got, ref, what, rtol=1e-5, atol=1e-5):
    # atol: f32 rounding of log-probs ~ -3 (and of their small differences, the KL) reordered
    # by a sharded reduction, and Adam's ~lr-sized steps on it, stay a few 1e-6 here.
    leaves = jax.tree_util.tree_leaves_with_path(ref)
    assert jax.tree.structure(got) == jax.tree.structure(ref), what
    for (path, b), a in zip(leaves, jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("shape", [pytest.param((2, 2, 2), marks=pytest.mark.heavy),
                                   pytest.param((8, 1, 1), marks=pytest.mark.slow)],
                         ids=lambda shape: "x".join(map(str, shape)))
def test_lora_steps_sharded_equal_single_device(lora_mesh_runs, lora_mesh_inputs, shape):
    ref, got = lora_mesh_runs((1, 1, 1)), lora_mesh_runs(shape)
    # Same key -> the same samples on any mesh.
    for field in ("sequences", "attention_mask", "response_mask", "has_eos"):
        np.testing.assert_array_equal(getattr(got["sampled"], field),
                                      getattr(ref["sampled"], field), err_msg=field)
    assert_trees_close(got["experience"], ref["experience"], "experience")
    assert len(got["stats"]) == len(ref["stats"]) == MESH_UPDATES
    for i, (g, r) in enumerate(zip(got["stats"], ref["stats"])):
        assert set(g) == set(r) and "ptx_loss" in r
        assert_trees_close(g, r, f"update {i} stats")
    assert got["step"] == ref["step"] == MESH_UPDATES
    assert_trees_close(got["adapters"], ref["adapters"], "adapters")
    assert_trees_close(got["ema"], ref["ema"], "ema")
    assert_trees_close(got["opt_state"], ref["opt_state"], "opt_state")
    for i, (g, r) in enumerate(zip(got["value_stats"], ref["value_stats"])):
        assert_trees_close(g, r, f"value update {i} stats")
    assert got["value_step"] == ref["value_step"] == MESH_UPDATES
    assert_trees_close(got["value"], ref["value"], "value")

    # Not vacuous: the adapters made the policy differ from the reference (KL > 0), the updates
    # moved every adapter, and the EMA trails them.
    assert np.abs(ref["experience"].kl).sum() > 0.1
    assert all(float(s["ptx_loss"]) > 0 and float(s["policy_grad_norm"]) > 0 for s in ref["stats"])
    start = lora_mesh_inputs["adapters"]
    for (path, new), old, ema in zip(jax.tree_util.tree_leaves_with_path(ref["adapters"]),
                                     jax.tree.leaves(start), jax.tree.leaves(ref["ema"])):
        assert np.abs(new - old).max() > 1e-3, jax.tree_util.keystr(path)
        assert np.abs(ema - new).max() > 1e-4, jax.tree_util.keystr(path)
    assert all(float(s["value_loss"]) > 0 for s in ref["value_stats"])
    for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(ref["value"]),
                                jax.tree.leaves(lora_mesh_inputs["value"])):
        assert np.abs(new - old).max() > 1e-4, jax.tree_util.keystr(path)
