"""Tests for the PPO / PPO-ptx stage (rlhf_jax.stages.ppo).

Pure pieces (make_experience, update_step, policy_gradient, next_kl_coef) run on tiny
hand-built rollouts; the loop (`train`) runs on a toy task whose reward model is hand-set so
its score is known exactly: it rises with the fraction of marker tokens ("good") in the
sequence (see `marker_reward_params`). Everything is module-scoped so each network, jitted
function and `train` run is built once.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ppo_toys import (B, BETA, MARKER, P, TOY_RESPONSE_LEN, gae_numpy, hand_rollout, toy_roles,
                      log_softmax_np, perturbed, ppo_config, ptx_batch, run_train, toy_overrides)

from rlhf_jax import model_io, runtime
from rlhf_jax import objectives as obj
from rlhf_jax.metrics import read_jsonl_metrics
from rlhf_jax.optim import make_optimizer
from rlhf_jax.stages import ppo
from rlhf_jax.scoring import norm_array, normalize
from rlhf_jax.train_state import TrainState

# --- fixtures: networks and experience -----------------------------------------------------------

@pytest.fixture(scope="module")
def nets(base):
    """Policy (f32 + a bf16-compute twin), a perturbed reference, RM and value (random heads)."""
    policy, init, reward, reward_init = base
    # Big enough noise that logits are far from uniform and KL terms are not tiny.
    policy_params = perturbed(init, 10, 0.3)
    ref_params = perturbed(policy_params, 11, 0.05)
    reward_params = perturbed(reward_init, 13, 0.3)
    value_params = perturbed(reward_params, 12, 0.05)
    norm = {"mean": 0.3, "std": 2.0}
    models = toy_roles(policy, reward, reward)
    bf16 = lambda m: m.clone(config=m.config.replace(dtype="bfloat16"))
    models_bf16 = toy_roles(bf16(policy), bf16(reward), bf16(reward))
    frozen = ppo.Frozen(ref_params, reward_params, norm_array(norm))
    return dict(models=models, models_bf16=models_bf16, policy=policy_params, ref=ref_params,
                reward=reward_params, value=value_params, frozen=frozen)


def experience_fn(models, pcfg):
    return jax.jit(functools.partial(ppo.make_experience, roles=models, prompt_len=P, cfg=pcfg))


@pytest.fixture(scope="module")
def experiences(nets):
    """Experience of one hand rollout: f32 with GAE unwhitened (gamma<1 to exercise it),
    f32 with the default whitening, and bf16 compute."""
    rollout = hand_rollout()
    args = (nets["policy"], nets["value"], nets["frozen"], ppo.Rollout(**rollout), jnp.float32(BETA))
    raw_cfg = ppo_config("ppo.whiten_advantages=False", "ppo.gamma=0.9", "ppo.lam=0.8").ppo
    default_cfg = ppo_config().ppo
    out = dict(rollout=rollout, raw_cfg=raw_cfg, default_cfg=default_cfg)
    out["raw"] = jax.device_get(experience_fn(nets["models"], raw_cfg)(*args))
    out["default"] = experience_fn(nets["models"], default_cfg)(*args)
    out["bf16"] = jax.device_get(experience_fn(nets["models_bf16"], default_cfg)(*args))
    return out


# --- 1. per-token rewards ------------------------------------------------------------------------

def test_per_token_rewards_golden_literal():
    # r_t = -beta * (logp_t - ref_t) on every response token, + score on the last one only.
    logprobs = jnp.array([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, -0.5, -0.5]])
    ref = jnp.array([[-1.5, -2.0, -2.0, 0.0], [-1.0, -0.25, -0.5, -1.5]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    rewards, kl = obj.per_token_rewards(logprobs, ref, jnp.array([2.0, -1.0]), mask, 0.1)
    np.testing.assert_allclose(kl, [[0.5, 0.0, -1.0, 0.0], [0.5, -0.25, 0.0, 1.0]], atol=1e-7)
    np.testing.assert_allclose(rewards, [[-0.05, 0.0, 0.1 + 2.0, 0.0],
                                         [-0.05, 0.025, 0.0, -0.1 - 1.0]], atol=1e-6)
    assert rewards.dtype == kl.dtype == jnp.float32


def test_make_experience_rewards_golden(nets, experiences):
    """Rewards = score (normalized, at the final response token) - beta * (logp - ref_logp)."""
    exp, rollout = experiences["raw"], experiences["rollout"]
    models = nets["models"]
    seqs, attn = np.asarray(rollout["sequences"]), np.asarray(rollout["attention_mask"])
    mask = np.asarray(rollout["response_mask"], np.float64)
    targets = seqs[:, P:]

    forward = jax.jit(lambda params, head_params: (
        models.policy.model.apply({"params": params["policy"]}, seqs, attn),
        models.policy.model.apply({"params": params["ref"]}, seqs, attn),
        models.reward.model.apply({"params": head_params["reward"]}, seqs, attn),
        models.value.model.apply({"params": head_params["value"]}, seqs, attn)))
    logits, ref_logits, raw, values = (np.asarray(x) for x in forward(
        {"policy": nets["policy"], "ref": nets["ref"]},
        {"reward": nets["reward"], "value": nets["value"]}))

    def logprobs_of(logits):
        lp = np.take_along_axis(log_softmax_np(logits[:, P - 1:-1]), targets[..., None], -1)[..., 0]
        return lp * mask

    logp, ref_logp = logprobs_of(logits), logprobs_of(ref_logits)
    last = attn.shape[1] - 1 - np.argmax(attn[:, ::-1], axis=1)          # last real token
    scores = (raw[np.arange(B), last] - 0.3) / 2.0                       # reward_norm above

    expected = -BETA * (logp - ref_logp)
    expected[np.arange(B), mask.sum(-1).astype(int) - 1] += scores
    np.testing.assert_allclose(exp.old_logprobs, logp, atol=2e-5)
    np.testing.assert_allclose(exp.ref_logprobs, ref_logp, atol=2e-5)
    np.testing.assert_allclose(exp.scores, scores, atol=2e-5)
    np.testing.assert_allclose(exp.kl, (logp - ref_logp) * mask, atol=4e-5)
    np.testing.assert_allclose(exp.rewards, expected, atol=1e-5)
    assert np.all(exp.rewards[mask == 0] == 0)
    assert np.abs(exp.kl).sum() > 0.1                                 # the KL term is exercised
    # Values: the value network read where the policy decides each response token.
    np.testing.assert_allclose(exp.old_values, values[:, P - 1:-1] * mask, atol=2e-5)


def test_experience_is_float32_under_bf16_compute(nets, experiences):
    exp, ref = experiences["bf16"], jax.device_get(experiences["default"])
    for key in ("rewards", "old_values", "advantages", "returns", "kl", "scores", "old_logprobs",
                "ref_logprobs", "response_mask"):
        assert getattr(exp, key).dtype == np.float32, key
        assert np.all(np.isfinite(getattr(exp, key))), key
    mask = exp.response_mask
    # Same formula holds on the bf16 run's own quantities...
    expected = -BETA * (exp.old_logprobs - exp.ref_logprobs)
    expected[np.arange(B), mask.sum(-1).astype(int) - 1] += exp.scores
    np.testing.assert_allclose(exp.rewards, expected * mask, atol=1e-5)
    # ...and bf16 compute stays close to the f32 experience (bf16 has ~3 significant digits).
    np.testing.assert_allclose(exp.old_logprobs, ref.old_logprobs, atol=0.15)
    np.testing.assert_allclose(exp.scores, ref.scores, atol=0.15)


def test_missing_eos_penalty_replaces_score(nets, experiences):
    pcfg = ppo_config("ppo.missing_eos_penalty=-3.0").ppo
    rollout = experiences["rollout"]
    exp = jax.device_get(experience_fn(nets["models"], pcfg)(
        nets["policy"], nets["value"], nets["frozen"], ppo.Rollout(**rollout), jnp.float32(BETA)))
    base = jax.device_get(experiences["default"])
    has_eos = np.asarray(rollout["has_eos"])
    np.testing.assert_allclose(exp.scores[~has_eos], -3.0)
    np.testing.assert_allclose(exp.scores[has_eos], base.scores[has_eos], atol=1e-6)
    last = exp.response_mask.sum(-1).astype(int) - 1
    np.testing.assert_allclose(exp.rewards[np.arange(B), last],
                               -3.0 * ~has_eos + base.scores * has_eos
                               - BETA * exp.kl[np.arange(B), last], atol=1e-5)


# --- 4. GAE --------------------------------------------------------------------------------------

def test_gae_in_experience_matches_numpy_loop(experiences):
    exp, pcfg = experiences["raw"], experiences["raw_cfg"]
    adv, ret = gae_numpy(exp.rewards, exp.old_values, exp.response_mask, pcfg.gamma,
                         pcfg.lam)
    np.testing.assert_allclose(exp.advantages, adv, atol=1e-5)
    np.testing.assert_allclose(exp.returns, ret, atol=1e-5)
    # Default config: gamma = 1, lam = 0.95, advantages whitened over the response tokens.
    exp = jax.device_get(experiences["default"])
    mask = exp.response_mask.astype(bool)
    adv, ret = gae_numpy(exp.rewards, exp.old_values, mask, 1.0, 0.95)
    np.testing.assert_allclose(exp.returns, ret, atol=1e-5)
    flat = adv[mask]
    whitened = (adv - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(exp.advantages, whitened, atol=1e-5)


# --- 2./3. update step and the combined gradient ---------------------------------------------------

HIGH_LR = 3e-2


@pytest.fixture(scope="module")
def updater(nets):
    """A jitted update_step (high lr, no grad clipping) and a fresh PPOState."""
    pcfg = ppo_config("ppo.ptx_coef=0.0").ppo
    policy_opt, value_opt = make_optimizer(HIGH_LR), make_optimizer(1e-3)
    policy_step = functools.partial(ppo.policy_update_step, base={}, roles=nets["models"],
                                    policy_opt=policy_opt, prompt_len=P, cfg=pcfg)
    value_step = functools.partial(ppo.value_update_step, base={}, roles=nets["models"],
                                   value_opt=value_opt, prompt_len=P, cfg=pcfg)

    @jax.jit
    def update(state, experience, indices, ptx):
        """Both halves of one minibatch update (train runs them as two programs)."""
        policy, ema, pstats = policy_step(state.policy, state.ema_params, experience, indices, ptx)
        value, vstats = value_step(state.value, experience, indices)
        return ppo.PPOState(policy, value, ema), pstats | vstats

    def fresh_state():
        return ppo.PPOState(
            TrainState(jnp.zeros((), jnp.int32), nets["policy"], policy_opt.init(nets["policy"])),
            TrainState(jnp.zeros((), jnp.int32), nets["value"], value_opt.init(nets["value"])), {})

    return dict(update=update, fresh_state=fresh_state, policy_opt=policy_opt,
                value_opt=value_opt, cfg=pcfg)


def test_first_minibatch_ratio_is_one_then_clipping_kicks_in(experiences, updater):
    exp = experiences["default"]            # made with the same policy params as the state's
    state = updater["fresh_state"]()
    order = np.random.default_rng(0)
    clipfracs, first = [], None
    for epoch in range(4):
        perm = order.permutation(B)
        for mb in range(2):
            indices = jnp.asarray(perm[mb * 4:(mb + 1) * 4])
            state, stats = updater["update"](state, exp, indices, None)
            stats = jax.device_get(stats)
            first = stats if first is None else first
            clipfracs.append(float(stats["clipfrac"]))
    assert abs(float(first["ratio_mean"]) - 1.0) < 1e-6
    assert abs(float(first["ratio_max"]) - 1.0) < 1e-6
    assert float(first["clipfrac"]) == 0.0
    assert float(first["approxkl"]) < 1e-10
    assert int(state.policy.step) == 8 and int(state.value.step) == 8
    # Later minibatches of later epochs move away from the rollout policy: clipping engages.
    assert max(clipfracs[1:]) > 0.0, clipfracs
    assert all(np.isfinite(clipfracs))


def test_policy_gradient_is_ppo_plus_gamma_ptx(nets, experiences):
    gamma = 2.5
    pcfg = ppo_config(f"ppo.ptx_coef={gamma}").ppo
    models, params = nets["models"], nets["policy"]
    mb = jax.tree.map(lambda x: x[:4], experiences["default"])
    ptx = ptx_batch()

    @jax.jit
    def grads(params):
        combined, stats = ppo.policy_gradient(params, {}, models, mb, ptx, prompt_len=P, cfg=pcfg)
        g_ppo = jax.grad(lambda p: ppo.policy_objective(p, models, mb, prompt_len=P, cfg=pcfg)[0])(params)
        ptx_loss, g_ptx = jax.value_and_grad(ppo.ptx_objective)(params, models, ptx)
        return combined, stats, g_ppo, g_ptx, ptx_loss

    combined, stats, g_ppo, g_ptx, ptx_loss = jax.device_get(grads(params))
    expected = jax.tree.map(lambda a, b: a + gamma * b, g_ppo, g_ptx)
    for got, want in zip(jax.tree.leaves(combined), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["ptx_loss"], ptx_loss, rtol=1e-6)
    assert 2.0 < float(ptx_loss) < 6.0                           # ~log(28) for a weak model
    assert optax_norm(g_ptx) > 0 and optax_norm(g_ppo) > 0


def optax_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))


def test_ptx_coef_zero_is_plain_ppo(nets, experiences, updater):
    """gamma_ptx = 0 with a ptx batch given gives bitwise the params of the ptx-less update."""
    exp = experiences["default"]
    indices = jnp.arange(4)
    plain, plain_stats = updater["update"](updater["fresh_state"](), exp, indices, None)
    with_batch, stats = updater["update"](updater["fresh_state"](), exp, indices, ptx_batch())
    assert "ptx_loss" not in stats
    for a, b in zip(jax.tree.leaves(plain.policy.params), jax.tree.leaves(with_batch.policy.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(plain_stats["policy_loss"], stats["policy_loss"])
    # ...and the update did change the params (the comparison above is not vacuous).
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(plain.policy.params), jax.tree.leaves(nets["policy"])))
    assert moved > 1e-3


# --- 8. KL controller ------------------------------------------------------------------------------

def test_adaptive_kl_controller_moves_beta_toward_target():
    p = ppo_config("ppo.kl_controller=adaptive", "ppo.kl_target=6.0", "ppo.kl_horizon=1000",
                   "ppo.rollout_batch_size=100").ppo
    assert ppo.next_kl_coef(0.1, 12.0, p) > 0.1          # KL above target: penalize more
    assert ppo.next_kl_coef(0.1, 1.0, p) < 0.1           # below: penalize less
    assert ppo.next_kl_coef(0.1, 6.0, p) == pytest.approx(0.1)
    # Proportional error clipped to +-0.2: 0.1 * (1 + 0.2 * 100 / 1000).
    assert ppo.next_kl_coef(0.1, 600.0, p) == pytest.approx(0.1 * 1.02)
    assert ppo.next_kl_coef(0.1, 0.0, p) == pytest.approx(0.1 * 0.98)
    # Closed loop with KL ~ 0.5 / beta: beta converges toward the value that gives the target.
    beta = 0.01
    for _ in range(300):
        beta = ppo.next_kl_coef(beta, 0.5 / beta, p)
    assert 0.5 / beta == pytest.approx(6.0, rel=0.05)
    fixed = ppo_config("ppo.kl_controller=fixed").ppo
    assert ppo.next_kl_coef(0.02, 100.0, fixed) == 0.02
    with pytest.raises(ValueError):
        ppo.next_kl_coef(0.02, 1.0, ppo_config("ppo.kl_controller=pid").ppo)


# --- the loop: toy task, no recompilation, sharded == unsharded ------------------------------------

def test_marker_reward_model_is_monotone(toy_dirs):
    texts = ["say w1 w2 : w3 w4", "say w1 w2 : good w4", "say w1 w2 : good good",
             "say w1 w2 : good good good good", "say w1 : good good good good good good good"]
    raw = toy_dirs["raw_scores"](toy_dirs["rm_params"], texts)
    scores = np.asarray(normalize(jnp.asarray(raw), toy_dirs["norm"])).tolist()
    assert scores[0] == pytest.approx(0.0, abs=1e-5)
    assert scores == sorted(scores) and scores[-1] - scores[0] > 3.0, scores
    assert scores[1] - scores[0] > 1.0                   # one marker is worth > 1 normalized unit


TOY_ITERATIONS = 20


@pytest.fixture(scope="module")
def toy_run(toy_dirs):
    cfg = ppo_config(*toy_overrides(
        toy_dirs, f"ppo.iterations={TOY_ITERATIONS}", "ppo.rollout_batch_size=32",
        "ppo.minibatch_size=8", "ppo.lr=3e-3", "ppo.value_lr=3e-3",
        # Adaptive beta: kl_coef changes every iteration, which must not recompile anything.
        "ppo.kl_controller=adaptive", "ppo.kl_target=6.0", "ppo.kl_horizon=200"))
    workdir = toy_dirs["root"] / "ppo"
    final, compiles = run_train(cfg, workdir)
    metrics = read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl"))
    return dict(cfg=cfg, workdir=workdir, final=final, compiles=compiles, metrics=metrics)


TRL_NAMES = ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
             "objective/entropy", "policy/clipfrac_avg", "policy/approxkl_avg",
             "policy/entropy_avg", "loss/policy_avg", "loss/value_avg", "val/var_explained",
             "time/rollout_s", "time/update_s", "tokens/s", "objective/kl_coef", "episodes")


def test_toy_task_ppo_raises_reward(toy_run, toy_dirs):
    metrics = toy_run["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, TOY_ITERATIONS + 1))
    for m in metrics:
        for name in TRL_NAMES:
            assert name in m and math.isfinite(m[name]), name
        assert "ptx/loss" not in m
    scores = np.array([m["objective/scores"] for m in metrics])
    kls = np.array([m["objective/kl"] for m in metrics])
    betas = np.array([m["objective/kl_coef"] for m in metrics])
    seconds = [m["time/rollout_s"] + m["time/experience_s"] + m["time/update_s"] for m in metrics]
    before, after = scores[0], scores[-3:].mean()
    print(f"toy PPO: mean RM score before {before:.3f}, after {after:.3f} (last 3 iterations); "
          f"KL first/last {kls[0]:.3f}/{kls[-1]:.3f}, max {kls.max():.3f}; "
          f"beta {betas[0]:.4f} -> {betas[-1]:.4f}; "
          f"s/iteration after the first {np.mean(seconds[1:]):.3f} (first {seconds[0]:.1f})")
    # Iteration 1 samples and scores with the initial policy, which equals the reference: KL 0.
    assert abs(kls[0]) < 1e-6
    assert after - before > 1.0, scores
    # KL is reported, finite and bounded: per token log pi - log pi_ref <= -log pi_ref, and the
    # near-uniform reference gives every token about log(28) ~ 3.3 nats.
    assert np.all(np.isfinite(kls)) and kls.max() < TOY_RESPONSE_LEN * 4.0
    assert kls[-1] > 0.1                                 # the policy did move away from the ref
    rlhf = np.array([m["objective/rlhf_reward"] for m in metrics])
    np.testing.assert_allclose(rlhf, scores - betas * kls, rtol=1e-5, atol=1e-5)
    # The adaptive controller ran between iterations (checked against next_kl_coef).
    for i in range(len(metrics) - 1):
        assert betas[i + 1] == pytest.approx(ppo.next_kl_coef(betas[i], kls[i], toy_run["cfg"].ppo))
    assert len(set(betas.tolist())) > 1


def test_toy_task_outputs(toy_run, toy_dirs):
    workdir = toy_run["workdir"]
    samples = read_jsonl_metrics(os.path.join(workdir, "samples.jsonl"))
    assert {s["step"] for s in samples} == {1, 10, 20}
    assert {"prompt", "response", "score", "kl"} <= set(samples[0])
    late = [s for s in samples if s["step"] == 20]
    assert np.mean([s["response"].split().count(MARKER) for s in late]) > 1.0
    # The saved policy is the trained one and prefers the marker more than the SFT policy did.
    model, params, tok, extra = model_io.load_model(os.path.join(workdir, "model"), None)
    assert tok is not None and extra["iterations"] == TOY_ITERATIONS and extra["ptx_coef"] == 0.0
    prompt = jnp.asarray([tok("say w3 w5 :")["input_ids"]])
    next_token_probs = jax.jit(lambda prm: jax.nn.softmax(
        model.apply({"params": prm}, prompt)[0, -1].astype(jnp.float32)))
    p_marker = lambda prm: float(next_token_probs(prm)[toy_dirs["marker"]])
    assert p_marker(params) > p_marker(toy_dirs["policy_params"]) + 0.1


def test_no_recompilation_across_iterations(toy_run):
    """Iterations 2.. compile nothing: all jitted steps (and eager helpers) are cache hits."""
    compiles = toy_run["compiles"]
    assert len(compiles) == TOY_ITERATIONS
    assert compiles[0] > 0                               # the listener does see compiles
    assert compiles[1:] == [compiles[0]] * (TOY_ITERATIONS - 1), compiles


# --- 6. sharded == unsharded ------------------------------------------------------------------------

COMPARED = ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg",
            "policy/approxkl_avg", "val/var_explained", "ptx/loss", "response/length_mean")


@pytest.fixture(scope="module")
def mesh_run(toy_dirs):
    """shape -> one iteration of PPO-ptx (gamma = 1) on that mesh; each shape runs once, lazily
    (so deselecting the slow (8,1,1) case skips its run)."""
    out = {}

    def get(shape):
        if shape not in out:
            out[shape] = _mesh_run(toy_dirs, shape)
        return out[shape]
    return get


def _mesh_run(toy_dirs, shape):
    name = "x".join(map(str, shape))
    cfg = ppo_config(*toy_overrides(
        toy_dirs, f"mesh.shape={shape}", "ppo.iterations=1", "ppo.rollout_batch_size=16",
        "ppo.minibatch_size=8", "ppo.epochs=2", "ppo.ptx_coef=1.0", "ppo.lr=3e-3"))
    workdir = toy_dirs["root"] / f"mesh_{name}"
    run_train(cfg, workdir)
    metrics = read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl"))
    _, params, _, _ = model_io.load_model(os.path.join(workdir, "model"), None)
    samples = read_jsonl_metrics(os.path.join(workdir, "samples.jsonl"))
    return dict(metrics=metrics[-1], params=jax.device_get(params), samples=samples)


@pytest.mark.slow     # the quick tier's PPO-ptx runs: tests/e2e/test_gcs.py, the ptx objective tests
def test_ptx_run_reports_ptx_loss(mesh_run):
    m = mesh_run((2, 2, 2))["metrics"]
    assert math.isfinite(m["ptx/loss"]) and 2.0 < m["ptx/loss"] < 6.0
    for name in TRL_NAMES:
        assert math.isfinite(m[name]), name


# (8,1,1) is slow-marked: pure data parallelism is already what the toy run uses (mesh (-1,1,1)).
# The quick tier's sharded == unsharded checks: tests/unit/test_sharding.py (forward and gradient
# on several meshes) and the sampler layout's (tests/integration/test_sampler.py).
@pytest.mark.parametrize("shape", [pytest.param((8, 1, 1), marks=pytest.mark.slow),
                                   pytest.param((2, 2, 2), marks=pytest.mark.heavy)])
def test_sharded_iteration_equals_single_device(mesh_run, shape):
    ref, got = mesh_run((1, 1, 1)), mesh_run(shape)
    # Same seed -> same samples on any mesh (sharding-invariant PRNG).
    assert [(s["prompt"], s["response"]) for s in got["samples"]] == \
        [(s["prompt"], s["response"]) for s in ref["samples"]]
    for name in COMPARED:
        np.testing.assert_allclose(got["metrics"][name], ref["metrics"][name], rtol=1e-4,
                                   atol=1e-4, err_msg=name)
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(ref["params"])):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # The iteration did train: params moved away from the SFT policy.
    assert got["metrics"]["policy/approxkl_avg"] > 0


def test_side_thread_runs_jobs_inline_or_beside_with_the_same_results():
    job = lambda x: float(jnp.sum(jnp.arange(x) ** 2))
    with runtime.SideThread(enabled=False) as inline, runtime.SideThread(enabled=True) as beside:
        assert inline.submit(job, 5).result() == beside.submit(job, 5).result() == 30.0
        failing = beside.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result()
