"""LoRA for the PPO policy (``ppo.lora.rank`` > 0; rlhf_jax.stages.ppo + models/lora.py).

Pure pieces on test_ppo's tiny policy and hand rollout: a fresh adapter (B = 0) gives exactly
the experience of the plain policy; an update moves only the adapters (their gradient is the
chain rule of the full-weight gradient) and leaves the base, a non-donated argument, intact.
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
from test_ppo import (BETA, P, base, hand_rollout, perturbed, ptx_batch,  # noqa: F401 (fixtures)
                      ppo_config, run_train, toy_dirs, toy_overrides)

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax.models.lora import LoRA, apply_lora, init_lora, lora_param_count
from rlhf_jax.optim import make_optimizer
from rlhf_jax.scoring import norm_array
from rlhf_jax.sharding import make_mesh
from rlhf_jax.stages import common, ppo
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
    return dict(models=ppo.Models(policy, reward, reward), policy=policy_params,
                value=value_params, frozen=frozen, lora=lora,
                cfg=ppo_config("ppo.ptx_coef=1.0", "ppo.ema_decay=0.9",
                               f"ppo.lora.rank={RANK}").ppo)


def test_lora_config_default_is_off():
    cfg = ppo_config()
    assert cfg.ppo.lora.rank == 0 and ppo.lora_rank(cfg.ppo) == 0
    assert ppo.lora_rank(ppo_config(f"ppo.lora.rank={RANK}").ppo) == RANK


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
    plain = jax.jit(functools.partial(ppo.make_experience, n["models"], prompt_len=P, cfg=n["cfg"]))
    with_lora = jax.jit(functools.partial(ppo.lora_make_experience, n["models"],
                                          scale=n["lora"].scale, prompt_len=P, cfg=n["cfg"]))
    ref = jax.device_get(plain(n["policy"], *args))
    got = jax.device_get(with_lora(n["lora"].adapters, *args))
    for field in ("old_logprobs", "ref_logprobs", "old_values", "rewards", "kl", "scores",
                  "advantages", "returns"):
        np.testing.assert_allclose(getattr(got, field), getattr(ref, field), rtol=1e-6,
                                   atol=1e-6, err_msg=field)
    # Policy == reference at the start: no KL, as in the full fine-tune.
    np.testing.assert_array_equal(got.kl, 0.0)


def test_update_moves_only_adapters_by_the_chain_rule(lora_nets):
    n = lora_nets
    cfg, lora = n["cfg"], n["lora"]
    rollout = ppo.Rollout(**hand_rollout())
    exp = jax.jit(functools.partial(ppo.lora_make_experience, n["models"], scale=lora.scale,
                                    prompt_len=P, cfg=cfg))(
        lora.adapters, n["value"], n["frozen"], rollout, jnp.float32(BETA))
    ptx = ptx_batch()
    idx = jnp.arange(4, dtype=jnp.int32)
    mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), exp)

    # d/dB of the objective at W + s A B is s A^T dW (B = 0: A gets no gradient yet).
    full, _ = ppo.policy_gradient(n["policy"], n["models"], mb, ptx, prompt_len=P, cfg=cfg)
    part, _ = ppo.policy_gradient(lora.adapters, n["models"], mb, ptx, prompt_len=P, cfg=cfg,
                                  merge=ppo.lora_merge(n["policy"], lora.scale))
    q_a = lora.adapters["layer_0"]["attn"]["q"]["a"]
    expected_b = lora.scale * jnp.einsum("dr,dhk->rhk", q_a, full["layer_0"]["attn"]["q"]["kernel"])
    np.testing.assert_allclose(part["layer_0"]["attn"]["q"]["b"], expected_b, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(part["layer_0"]["attn"]["q"]["a"], 0.0)

    opt = make_optimizer(3e-2)
    state = TrainState(jnp.zeros((), jnp.int32), lora.adapters, opt.init(lora.adapters))
    ema = jax.tree.map(jnp.copy, lora.adapters)
    base_before = jax.device_get(n["policy"])
    update = jax.jit(functools.partial(ppo.policy_update_step, models=n["models"], policy_opt=opt,
                                       prompt_len=P, cfg=cfg, lora_scale=lora.scale),
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


def test_lora_train_writes_merged_model_and_adapters(lora_run, toy_dirs):  # noqa: F811
    workdir = lora_run["workdir"]
    assert np.isfinite(lora_run["final"]["ptx/loss"])
    info = json.load(open(os.path.join(workdir, "lora", "lora.json")))
    assert info["rank"] == RANK and info["scale"] == ALPHA / RANK
    assert info["targets"] == ["attn"]
    adapters = jax.device_get(ckpt_lib.load_pytree(os.path.join(workdir, "lora", "adapters")))
    lora = LoRA(adapters, info["scale"])
    assert info["n_params"] == lora_param_count(lora)

    _, base_params, _, _ = common.load_model(str(toy_dirs["root"] / "sft"), None)
    model, merged, tok, extra = common.load_model(os.path.join(workdir, "model"), None)
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


def test_lora_no_recompilation_across_iterations(lora_run):
    compiles = lora_run["compiles"]
    assert len(compiles) == LORA_ITERATIONS and compiles[0] > 0
    # Iteration 2's window also holds the first checkpoint save's eager compiles; from then on
    # nothing compiles.
    assert compiles[2:] == [compiles[1]] * (LORA_ITERATIONS - 2), compiles
