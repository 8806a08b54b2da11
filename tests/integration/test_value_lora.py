"""LoRA for the PPO value network (``ppo.value_lora.rank`` > 0; rlhf_jax.stages.ppo).

The value starts from the RM, so its frozen base is ``frozen.reward`` itself and it trains
``{"adapters", "score_head"}``. Pure pieces on test_ppo's tiny networks: fresh adapters (B = 0)
give exactly the values, GAE advantages and returns of the plain value network; a value step
moves only B and the head by the chain rule of the full-weight gradient and leaves the RM, a
non-donated argument, intact. Then one micro ``train`` with LoRA on both networks: the
checkpoints hold the value's trainables only, and nothing compiles after the first iteration.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ppo_toys import BETA, P, hand_rollout, perturbed, ppo_config, run_train, toy_overrides

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax.errors import ConfigError
from rlhf_jax.models.lora import LoRA, apply_lora, init_lora
from rlhf_jax.optim import make_optimizer
from rlhf_jax.scoring import fold_normalization, norm_array
from rlhf_jax.sharding import make_mesh
from rlhf_jax.stages import ppo
from rlhf_jax.train_state import TrainState

RANK, ALPHA = 4, 8.0
NORM = {"mean": 0.3, "std": 2.0}


@pytest.fixture(scope="module")
def value_nets(base):
    """Policy, reference, RM; the value = the RM with its normalization folded into the head,
    as train() starts it; fresh rank-4 adapters on the RM's attention and MLP."""
    policy, init, reward, reward_init = base
    policy_params = perturbed(init, 10, 0.3)
    reward_params = perturbed(reward_init, 13, 0.3)
    value_params = fold_normalization(reward_params, NORM)
    cfg = ppo_config(f"ppo.value_lora.rank={RANK}", f"ppo.value_lora.alpha={ALPHA}",
                     "ppo.value_lora.targets=('attn', 'mlp')").ppo
    roles = ppo.make_roles(cfg, policy, reward, reward)[0]
    trainable = roles.value.trainable_from(value_params, jax.random.key(7))
    frozen = ppo.Frozen(perturbed(policy_params, 11, 0.05), reward_params, norm_array(NORM))
    return dict(roles=roles, plain_roles=ppo.make_roles(ppo_config().ppo, policy, reward, reward)[0],
                policy=policy_params, value=value_params, frozen=frozen, trainable=trainable,
                scale=ALPHA / RANK, cfg=cfg)


def experience(n, value_params, roles="plain_roles"):
    fn = jax.jit(functools.partial(ppo.make_experience, roles=n[roles], prompt_len=P, cfg=n["cfg"]))
    return fn(n["policy"], value_params, n["frozen"], ppo.Rollout(**hand_rollout()),
              jnp.float32(BETA))


def test_value_lora_config(base):
    policy, _, reward, _ = base
    value_role = lambda *o: ppo.make_roles(ppo_config(*o).ppo, policy, reward, reward)[0].value
    assert value_role().trains == "full"
    role = value_role(f"ppo.value_lora.rank={RANK}")
    assert (role.trains, role.lora_rank, role.base_from) == ("lora+head", RANK, "reward")
    # grpo / rloo have no value network: no value LoRA whatever the field says.
    assert value_role(f"ppo.value_lora.rank={RANK}", "ppo.advantage=grpo", "ppo.group_size=2",
                      "ppo.kl_controller=fixed").trains == "none"


def test_value_lora_config_errors_name_field_and_value():
    from rlhf_jax import validate
    for overrides, message in [
            (("ppo.value_lora.rank=-2",), r"ppo.value_lora.rank=-2"),
            (("ppo.value_lora.rank=4", "ppo.value_lora.alpha=-1.0"), r"ppo.value_lora.alpha=-1.0"),
            (("ppo.value_lora.rank=4", "ppo.value_lora.targets=('nope',)"),
             r"ppo.value_lora.targets="),
            (("ppo.value_lora.rank=4", "ppo.advantage=rloo", "ppo.group_size=2"),
             r"ppo.value_lora.rank=4: expected 0 with ppo.advantage='rloo'"),
            (("ppo.value_lora.rank=4", "reward_from=/rm", "value_from=/elsewhere"),
             r"value_from='/elsewhere': expected empty")]:
        with pytest.raises(ConfigError, match=message):
            validate.check(ppo_config(*overrides))
    # value_from naming the RM itself (as the pipeline writes it) is the RM: only the missing
    # directory is reported.
    with pytest.raises(ConfigError) as err:
        validate.check(ppo_config("ppo.value_lora.rank=4", "reward_from=/rm", "value_from=/rm"))
    assert "value_lora" not in str(err.value) and "reward_from='/rm'" in str(err.value)


def test_value_lora_needs_the_rms_architecture(base):
    policy, _, reward, _ = base
    cfg = ppo_config(f"ppo.value_lora.rank={RANK}")
    wider = reward.clone(config=reward.config.replace(d_ff=reward.config.d_ff * 2))
    with pytest.raises(ConfigError, match="the RM's architecture"):
        ppo.build(cfg, make_mesh((1, 1, 1)),
                  models={"policy": policy, "value": wider, "reward": reward})


def test_zero_b_values_equal_the_plain_value_network(value_nets):
    n = value_nets
    ref = jax.device_get(experience(n, n["value"]))
    got = jax.device_get(experience(n, n["trainable"], roles="roles"))
    for field in ("old_values", "rewards", "advantages", "returns", "scores", "old_logprobs"):
        np.testing.assert_allclose(getattr(got, field), getattr(ref, field), rtol=1e-6,
                                   atol=1e-6, err_msg=field)
    assert np.abs(ref.old_values).max() > 1e-3      # the comparison is not of zeros


@pytest.mark.heavy     # the quick tier trains the value LoRA end to end (test_value_lora_train_learns_...)
def test_value_update_moves_b_and_head_by_the_chain_rule(value_nets):
    n = value_nets
    cfg, scale, trainable = n["cfg"], n["scale"], n["trainable"]
    # Experience from a perturbed value so the returns are not the values (a real loss).
    exp = experience(n, perturbed(n["value"], 21, 0.2))
    idx = jnp.arange(4, dtype=jnp.int32)
    mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), exp)
    objective = lambda params: ppo.value_objective(params, n["roles"], mb, prompt_len=P,
                                                   cfg=cfg)[0]
    merge = lambda t: n["roles"].value.merge(t, n["frozen"].reward)
    full = jax.grad(objective)(n["value"])
    part = jax.grad(lambda t: objective(merge(t)))(trainable)
    # d/dB at W + s A B (B = 0) is s A^T dW; A has no gradient yet; the head's is the full one.
    fc_a = trainable["adapters"]["layer_1"]["mlp"]["fc_in"]["a"]
    np.testing.assert_allclose(part["adapters"]["layer_1"]["mlp"]["fc_in"]["b"],
                               scale * fc_a.T @ full["layer_1"]["mlp"]["fc_in"]["kernel"],
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(part["adapters"]["layer_1"]["mlp"]["fc_in"]["a"], 0.0)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-8),
                 part["score_head"], full["score_head"])

    opt = make_optimizer(1e-2)
    # Own buffers: the step donates its state, and the head is the fixture's value head.
    own = jax.tree.map(jnp.copy, trainable)
    state = TrainState(jnp.zeros((), jnp.int32), own, opt.init(own))
    rm_before = jax.device_get(n["frozen"].reward)
    step = jax.jit(functools.partial(ppo.value_update_step, roles=n["roles"], value_opt=opt,
                                     prompt_len=P, cfg=cfg), donate_argnums=0)
    new, stats = step(state, exp, idx, n["frozen"].reward)
    assert float(stats["value_grad_norm"]) > 0
    # Same loss as the plain network at the same (unmerged) point.
    np.testing.assert_allclose(float(stats["value_loss"]), float(objective(n["value"])), rtol=1e-5)
    assert jax.tree.structure(new.params) == jax.tree.structure(trainable)
    for path, b in jax.tree_util.tree_leaves_with_path(new.params["adapters"]):
        if path[-1].key == "b":
            assert float(jnp.abs(b).max()) > 0, path
    assert not np.allclose(new.params["score_head"]["kernel"], trainable["score_head"]["kernel"])
    # The RM (the value's base, also PPO's scorer) is untouched and alive.
    assert not any(x.is_deleted() for x in jax.tree.leaves(n["frozen"].reward))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(n["frozen"].reward), rm_before)


def test_merge_is_the_rm_plus_scaled_product(value_nets):
    n = value_nets
    trainable = jax.tree.map(lambda x: x + 0.01, n["trainable"])       # nonzero B
    merged = n["roles"].value.merge(trainable, n["frozen"].reward)
    expected = apply_lora(n["frozen"].reward, LoRA(trainable["adapters"], n["scale"]))
    q = lambda t: t["layer_0"]["attn"]["q"]["kernel"]
    np.testing.assert_allclose(q(merged), q(expected), rtol=1e-6)
    assert merged["score_head"] is trainable["score_head"]
    assert merged["embed"] is n["frozen"].reward["embed"]        # untouched leaves: no copy


# --- the loop ------------------------------------------------------------------------------------

ITERATIONS = 3


@pytest.fixture(scope="module")
def both_run(toy_dirs):  # noqa: F811
    cfg = ppo_config(*toy_overrides(
        toy_dirs, f"ppo.iterations={ITERATIONS}", "ppo.rollout_batch_size=16",
        "ppo.minibatch_size=8", "ppo.lr=3e-2", "ppo.value_lr=3e-2", "ppo.checkpoint_every=1",
        "ppo.lora.rank=2", f"ppo.value_lora.rank={RANK}", "ppo.value_lora.targets=('all',)"))
    workdir = toy_dirs["root"] / "value_lora_ppo"
    final, compiles = run_train(cfg, workdir)
    return dict(cfg=cfg, workdir=str(workdir), final=final, compiles=compiles)


def test_value_lora_train_learns_and_checkpoints_only_trainables(both_run, toy_dirs):  # noqa: F811
    final = both_run["final"]
    assert np.isfinite(final["loss/value_avg"]) and np.isfinite(final["val/var_explained"])
    program = ppo.build(both_run["cfg"], make_mesh((-1, 1, 1)))
    value = program.state.value.params
    assert sorted(value) == ["adapters", "score_head"]
    assert all(s.sharding.is_fully_replicated for s in jax.tree.leaves(value))
    n_trainable = sum(x.size for x in jax.tree.leaves(value))
    n_rm = sum(x.size for x in jax.tree.leaves(program.frozen.reward))
    assert n_trainable < n_rm / 2
    with ckpt_lib.Checkpointer(os.path.join(both_run["workdir"], "checkpoints")) as checkpointer:
        restored, _ = checkpointer.restore(max(checkpointer.all_steps()), program.state)
    assert jax.tree.structure(restored.value.params) == jax.tree.structure(value)
    # Trained: B moved away from zero (where the marker RM has a gradient at all: its q = k = 0
    # and zeroed layer-1 / fc_out kernels are saddles that B = 0 cannot leave), and the head
    # away from the RM's folded head.
    adapters = jax.device_get(restored.value.params["adapters"])
    for block, name in (("attn", "o"), ("attn", "v"), ("mlp", "fc_out")):
        assert np.abs(adapters["layer_0"][block][name]["b"]).max() > 0, name
    folded = fold_normalization(toy_dirs["rm_params"], toy_dirs["norm"])["score_head"]
    assert not np.allclose(jax.device_get(restored.value.params["score_head"]["kernel"]),
                           folded["kernel"])
    extra = json.load(open(os.path.join(both_run["workdir"], "model", "extra.json")))
    assert extra["value_lora_rank"] == RANK and extra["lora_rank"] == 2


def test_value_lora_no_recompilation_across_iterations(both_run):
    compiles = both_run["compiles"]
    assert len(compiles) == ITERATIONS and compiles[0] > 0
    assert compiles[2:] == [compiles[1]] * (ITERATIONS - 2), compiles


def test_value_lora_fresh_adapters_start_at_b_zero(value_nets):
    lora = init_lora(value_nets["frozen"].reward, jax.random.key(7), RANK, ALPHA, ("attn", "mlp"))
    jax.tree.map(np.testing.assert_array_equal, value_nets["trainable"]["adapters"],
                 jax.device_get(lora.adapters))
