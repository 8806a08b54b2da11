"""GRPO and RLOO as advantage estimators on the PPO engine (``ppo.advantage``).

Pure pieces run on a hand-built group-major rollout (2 prompts x G = 4 samples): the experience's
sequence rewards and advantages against NumPy group computations, the update's loss against
``objectives``' functions on the same inputs, the ptx term folded into the same gradient. The
loop runs on test_ppo's toy task (a hand-set RM that rewards the marker token "good"): two
iterations sharded == unsharded, no recompilation, and a micro ``train()`` for each estimator
with no value network anywhere.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ppo_toys import (EOS, MARKER, PAD, VOCAB, log_softmax_np, make_tokenizer,
                      marker_reward_params, perturbed, ptx_batch, run_train, tiny_policy, toy_roles)
from ppo_toys import ppo_config as ppo_batch_config

from rlhf_jax import objectives as obj
from rlhf_jax import model_io, validate
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import read_jsonl_metrics
from rlhf_jax.model_io import save_our_checkpoint
from rlhf_jax.models.params import abstract_params
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.scoring import norm_array
from rlhf_jax.sharding import make_mesh
from rlhf_jax.stages import ppo

B, P, N, G = 8, 5, 6, 4        # episodes, prompt slots, response slots, samples per prompt
BETA = 0.1                     # the rollout's kl_coef (rloo folds it into the reward)
KL_COEF = 0.05                 # grpo's k3 loss weight (ppo.kl_coef)


def host_params(model: Transformer, seed: int, scale: float):
    """Weights filled on the host (a compiled random init costs seconds on a loaded CPU)."""
    gen = np.random.default_rng(seed)

    def fill(path, a):
        name = jax.tree_util.keystr(path)
        return ((1.0 if "scale" in name else 0.0) + gen.normal(0.0, scale, a.shape)).astype(a.dtype)
    return jax.tree_util.tree_map_with_path(fill, abstract_params(model))


def group_cfg(advantage: str, *overrides: str):
    return ppo_batch_config(f"ppo.advantage={advantage}", f"ppo.group_size={G}",
                            f"ppo.kl_coef={KL_COEF}", *overrides)


def group_rollout(seed: int = 0) -> ppo.Rollout:
    """2 prompts, each repeated G times (group-major), with G different responses of varied
    lengths, some ending with EOS, some cut at N."""
    rng = np.random.default_rng(seed)
    seqs = np.full((B, P + N), PAD, np.int32)
    attn = np.zeros((B, P + N), np.int32)
    resp_mask = np.zeros((B, N), np.int32)
    has_eos = np.zeros((B,), bool)
    prompts = [rng.integers(3, len(VOCAB), n) for n in (3, 5)]
    lengths = [N, 3, 1, 4, N, 2, 5, N]
    for b in range(B):
        prompt = prompts[b // G]
        seqs[b, P - len(prompt):P] = prompt
        attn[b, P - len(prompt):P] = 1
        n = lengths[b]
        response = rng.integers(3, len(VOCAB), n)
        if n < N:
            response[-1] = EOS
        seqs[b, P:P + n] = response
        attn[b, P:P + n] = 1
        resp_mask[b, :n] = 1
        has_eos[b] = n < N
    return ppo.Rollout(jnp.asarray(seqs), jnp.asarray(attn), jnp.asarray(resp_mask),
                       jnp.asarray(has_eos))


# --- fixtures: networks and experience ------------------------------------------------------------

@pytest.fixture(scope="module")
def nets():
    """Policy, a perturbed reference and an RM with a random head; no value network."""
    policy = tiny_policy()
    reward = Transformer(policy.config.replace(head="scalar"))
    policy_params = host_params(policy, 10, 0.3)
    ref_params = perturbed(policy_params, 11, 0.05)
    reward_params = host_params(reward, 13, 0.3)
    models = toy_roles(policy, None, reward, "ppo.advantage=grpo", "ppo.group_size=4")
    frozen = ppo.Frozen(ref_params, reward_params, norm_array({"mean": 0.3, "std": 2.0}))
    return dict(models=models, policy=policy_params, ref=ref_params, reward=reward_params,
                frozen=frozen)


def experience_of(nets, pcfg, rollout, kl_coef=BETA):
    fn = jax.jit(functools.partial(ppo.make_experience, roles=nets["models"], prompt_len=P, cfg=pcfg))
    return fn(nets["policy"], {}, nets["frozen"], rollout, jnp.float32(kl_coef))


@pytest.fixture(scope="module")
def numpy_view(nets):
    """Log-probs (policy, reference) and normalized RM scores of the rollout, in NumPy."""
    rollout = group_rollout()
    models = nets["models"]
    seqs, attn = np.asarray(rollout.sequences), np.asarray(rollout.attention_mask)
    mask = np.asarray(rollout.response_mask, np.float64)
    forward = jax.jit(lambda pp, rp, wp: (models.policy.model.apply({"params": pp}, seqs, attn),
                                          models.policy.model.apply({"params": rp}, seqs, attn),
                                          models.reward.model.apply({"params": wp}, seqs, attn)))
    logits, ref_logits, raw = (np.asarray(x) for x in forward(nets["policy"], nets["ref"],
                                                              nets["reward"]))
    take = lambda lg: np.take_along_axis(log_softmax_np(lg[:, P - 1:-1]), seqs[:, P:, None],
                                         -1)[..., 0] * mask
    last = attn.shape[1] - 1 - np.argmax(attn[:, ::-1], axis=1)
    return dict(rollout=rollout, mask=mask, logp=take(logits), ref_logp=take(ref_logits),
                scores=(raw[np.arange(B), last] - 0.3) / 2.0)


@pytest.fixture(scope="module")
def experiences(nets, numpy_view):
    rollout = numpy_view["rollout"]
    return {kind: jax.device_get(experience_of(nets, group_cfg(kind).ppo, rollout))
            for kind in ("grpo", "rloo")}


# --- 1. advantages against NumPy group computations -----------------------------------------------

def grpo_numpy(rewards: np.ndarray) -> np.ndarray:
    r = rewards.reshape(-1, G).astype(np.float64)
    std = r.std(axis=1, ddof=1, keepdims=True)            # TRL / verl: torch.std (Bessel)
    return ((r - r.mean(axis=1, keepdims=True)) / (std + 1e-6)).reshape(-1)


def rloo_numpy(rewards: np.ndarray) -> np.ndarray:
    r = rewards.reshape(-1, G).astype(np.float64)
    out = np.zeros_like(r)
    for g in range(r.shape[0]):
        for i in range(G):
            out[g, i] = r[g, i] - np.mean([r[g, j] for j in range(G) if j != i])
    return out.reshape(-1)


def test_grpo_experience_standardizes_scores_within_each_prompt_group(experiences, numpy_view):
    exp, v = experiences["grpo"], numpy_view
    np.testing.assert_allclose(exp.old_logprobs, v["logp"], atol=2e-5)
    np.testing.assert_allclose(exp.ref_logprobs, v["ref_logp"], atol=2e-5)
    np.testing.assert_allclose(exp.scores, v["scores"], atol=2e-5)
    np.testing.assert_allclose(exp.kl, v["logp"] - v["ref_logp"], atol=4e-5)
    assert np.abs(exp.kl).sum() > 0.1                      # the KL is there, just not rewarded
    # GRPO's reward is the score alone, at the last response token: no KL in the reward.
    last = v["mask"].sum(-1).astype(int) - 1
    expected_rewards = np.zeros((B, N))
    expected_rewards[np.arange(B), last] = v["scores"]
    np.testing.assert_allclose(exp.rewards, expected_rewards, atol=2e-5)
    assert exp.advantages.shape == (B,) and exp.advantages.dtype == np.float32
    np.testing.assert_allclose(exp.advantages, grpo_numpy(v["scores"]), rtol=1e-4, atol=1e-4)
    for g in range(B // G):                               # each group: mean 0, std 1
        group = exp.advantages[g * G:(g + 1) * G]
        assert abs(group.mean()) < 1e-5 and abs(group.std(ddof=1) - 1) < 1e-3
    # No value network: nothing value-shaped is estimated.
    assert not exp.old_values.any() and not exp.returns.any()


def test_rloo_experience_folds_kl_into_the_reward_and_leaves_one_out(experiences, numpy_view):
    exp, v = experiences["rloo"], numpy_view
    kl = v["logp"] - v["ref_logp"]
    last = v["mask"].sum(-1).astype(int) - 1
    expected_rewards = -BETA * kl
    expected_rewards[np.arange(B), last] += v["scores"]
    np.testing.assert_allclose(exp.rewards, expected_rewards, atol=4e-5)
    sequence_rewards = v["scores"] - BETA * kl.sum(-1)
    np.testing.assert_allclose(ppo.sequence_rewards(jnp.asarray(exp.rewards)), sequence_rewards,
                               atol=5e-5)
    np.testing.assert_allclose(exp.advantages, rloo_numpy(sequence_rewards), atol=1e-4)
    np.testing.assert_allclose(exp.advantages.reshape(-1, G).sum(-1), 0.0, atol=1e-5)
    # The KL changed the ordering signal: advantages differ from those of the bare scores.
    assert np.abs(exp.advantages - rloo_numpy(v["scores"])).max() > 1e-3


def test_missing_eos_penalty_enters_the_group_reward(nets, numpy_view):
    pcfg = group_cfg("grpo", "ppo.missing_eos_penalty=-3.0").ppo
    exp = jax.device_get(experience_of(nets, pcfg, numpy_view["rollout"]))
    has_eos = np.asarray(numpy_view["rollout"].has_eos)
    scores = np.where(has_eos, numpy_view["scores"], -3.0)
    np.testing.assert_allclose(exp.scores, scores, atol=2e-5)
    np.testing.assert_allclose(exp.advantages, grpo_numpy(scores), rtol=1e-4, atol=1e-4)


# --- 2. the update against objectives ---------------------------------------------------------------

def minibatch(exp, n=B):
    return jax.tree.map(lambda x: jnp.asarray(x[:n]), exp)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_update_loss_equals_objectives_on_the_same_inputs(nets, experiences, numpy_view, kind):
    pcfg = group_cfg(kind, "ppo.entropy_coef=0.01").ppo
    mb = minibatch(experiences[kind])
    # A policy a little away from the rollout's: ratios != 1, so clipping can engage.
    params = perturbed(nets["policy"], 20, 0.05)
    loss, stats = jax.device_get(jax.jit(functools.partial(
        ppo.policy_objective, roles=nets["models"], prompt_len=P, cfg=pcfg))(params, mb=mb))

    seqs, attn = np.asarray(mb.sequences), np.asarray(mb.attention_mask)
    logits = np.asarray(jax.jit(nets["models"].policy.model.apply)({"params": params}, seqs, attn))
    logp_all = log_softmax_np(logits[:, P - 1:-1])
    mask = numpy_view["mask"]
    logp = np.take_along_axis(logp_all, seqs[:, P:, None], -1)[..., 0] * mask
    entropy = (-(np.exp(logp_all) * logp_all).sum(-1) * mask).sum() / mask.sum()
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    if kind == "grpo":
        want, want_stats = obj.grpo_policy_loss(f32(logp), mb.old_logprobs, mb.ref_logprobs,
                                                mb.advantages, mb.response_mask, 0.2, KL_COEF)
        assert float(want_stats["kl"]) > 1e-4                       # the k3 term is exercised
        np.testing.assert_allclose(stats["k3_kl"], want_stats["kl"], rtol=1e-4)
    else:   # RLOO: the plain clipped surrogate on per-sequence advantages (its KL is rewarded)
        per_token = jnp.broadcast_to(mb.advantages[:, None], (B, N))
        want, want_stats = obj.ppo_policy_loss(f32(logp), mb.old_logprobs, per_token,
                                               mb.response_mask, 0.2)
    want = float(want) - 0.01 * entropy
    np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(stats["entropy"], entropy, rtol=1e-4)
    for key in ("clipfrac", "approxkl", "ratio_mean", "ratio_max"):
        np.testing.assert_allclose(stats[key], want_stats[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert float(stats["approxkl"]) > 1e-6


def test_first_update_has_ratio_one_and_ptx_folds_into_the_same_gradient(nets, experiences):
    """With the rollout's own params, the grpo loss is -mean(A) over tokens + kl_coef * k3;
    the policy gradient with ptx is grad(grpo loss) + gamma * grad(ptx NLL), one gradient."""
    gamma = 2.0
    pcfg = group_cfg("grpo", f"ppo.ptx_coef={gamma}").ppo
    models, params = nets["models"], nets["policy"]
    mb, ptx = minibatch(experiences["grpo"]), ptx_batch()

    @jax.jit
    def grads(params):
        combined, stats = ppo.policy_gradient(params, {}, models, mb, ptx, prompt_len=P, cfg=pcfg)
        g_policy = jax.grad(lambda p: ppo.policy_objective(p, models, mb, prompt_len=P,
                                                           cfg=pcfg)[0])(params)
        g_ptx = jax.grad(ppo.ptx_objective)(params, models, ptx)
        return combined, stats, g_policy, g_ptx

    combined, stats, g_policy, g_ptx = jax.device_get(grads(params))
    for got, a, b in zip(*(jax.tree.leaves(t) for t in (combined, g_policy, g_ptx))):
        np.testing.assert_allclose(got, a + gamma * b, rtol=1e-5, atol=1e-6)
    assert abs(float(stats["ratio_mean"]) - 1.0) < 1e-6 and float(stats["clipfrac"]) == 0.0
    mask = np.asarray(mb.response_mask)
    tokens_mean_adv = (np.asarray(mb.advantages)[:, None] * mask).sum() / mask.sum()
    np.testing.assert_allclose(stats["policy_loss"], -tokens_mean_adv, atol=1e-5)
    assert "ptx_loss" in stats and 2.0 < float(stats["ptx_loss"]) < 6.0


# --- 3. config ----------------------------------------------------------------------------------------

def test_group_advantage_config_errors_name_field_value_and_expectation():
    for overrides, message in [
            (("ppo.advantage=grpo", "ppo.group_size=1"), r"ppo.group_size=1: expected >= 2"),
            (("ppo.advantage=rloo", "ppo.group_size=3"), r"ppo.group_size=3: expected a .*divisor"),
            (("ppo.advantage=grpo", "ppo.group_size=2", "ppo.kl_controller=adaptive"),
             r"ppo.kl_controller='adaptive': expected 'fixed'")]:
        cfg = ppo_batch_config(*overrides)
        with pytest.raises(ConfigError, match=message):
            validate.check(cfg)
        with pytest.raises(ConfigError, match=message):
            ppo.estimators.check(cfg.ppo)
    with pytest.raises(ConfigError, match=r"ppo.advantage='vtrace'"):
        validate.check(ppo_batch_config("ppo.advantage=vtrace"))
    ppo.estimators.check(ppo_batch_config().ppo)                        # the GAE default
    assert ppo_batch_config().ppo.advantage == "gae" and ppo_batch_config().ppo.group_size == 1


# --- 4. the loop: micro train() per estimator, no recompilation, sharded == unsharded --------------

RESPONSE_LEN = 6


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """An SFT stand-in (small random weights), the marker RM, prompts and pretraining text."""
    root = tmp_path_factory.mktemp("grpo_toy")
    tok = make_tokenizer()
    policy = tiny_policy()
    rm = Transformer(policy.config.replace(head="scalar"))
    policy_params = host_params(policy, 0, 0.02)
    rm_params = marker_reward_params(host_params(rm, 1, 0.02), tok.convert_tokens_to_ids(MARKER))
    save_our_checkpoint(str(root / "sft"), policy, policy_params, tok, extra={"stage": "sft"})
    save_our_checkpoint(str(root / "rm"), rm, rm_params, tok, extra={"reward_norm": {}})
    r = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(32):
            f.write(json.dumps({"prompt": f"say {' '.join(r.choices(VOCAB[8:], k=2))} :"}) + "\n")
    with open(root / "pretrain.jsonl", "w") as f:
        for _ in range(32):
            f.write(json.dumps({"text": " ".join(r.choices(VOCAB[8:], k=10))}) + "\n")
    return root


def toy_cfg(root, advantage, *extra):
    # value_from points nowhere: grpo / rloo must never load (or build) a value network.
    return group_cfg(advantage, f"policy_from={root / 'sft'}", f"reward_from={root / 'rm'}",
                     f"value_from={root / 'no_such_value_model'}",
                     f"data.prompts={root / 'prompts.jsonl'}",
                     f"data.pretrain={root / 'pretrain.jsonl'}", "data.max_prompt_len=5",
                     f"data.max_response_len={RESPONSE_LEN}", "data.ptx_seq_len=8",
                     "ppo.warmup_iterations=0", "ppo.checkpoint_every=0", "ppo.sample_every=0",
                     "ppo.rollout_batch_size=16", "ppo.minibatch_size=8", "ppo.lr=1e-2", *extra)


ITERATIONS = 8


@pytest.fixture(scope="module")
def runs(toy):
    """``get(advantage)``: an ITERATIONS-iteration train() of that estimator, run once."""
    out = {}

    def get(advantage):
        if advantage not in out:
            workdir = toy / advantage
            cfg = toy_cfg(toy, advantage, f"ppo.iterations={ITERATIONS}")
            final, compiles = run_train(cfg, workdir)
            out[advantage] = dict(final=final, compiles=compiles, workdir=workdir,
                                  metrics=read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl")))
        return out[advantage]
    return get


@pytest.mark.parametrize("advantage", ["grpo", pytest.param("rloo", marks=pytest.mark.heavy)])
def test_micro_train_end_to_end(runs, advantage):
    run = runs(advantage)
    metrics = run["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, ITERATIONS + 1))
    for m in metrics:
        for name in ("objective/scores", "objective/kl", "loss/policy_avg", "policy/approxkl_avg",
                     "policy/clipfrac_avg", "policy/k3_kl_avg", "objective/entropy", "tokens/s"):
            assert math.isfinite(m[name]), name
        assert m["episodes"] == m["step"] * 16
        # No value network: no value loss, no value timing, no explained variance.
        assert not any(k.startswith(("val/", "loss/value")) for k in m), sorted(m)
    scores = np.array([m["objective/scores"] for m in metrics])
    print(f"{advantage}: mean RM score {scores[0]:.3f} -> {scores[-3:].mean():.3f} (last 3), "
          f"KL {metrics[-1]['objective/kl']:.3f}")
    assert abs(metrics[0]["objective/kl"]) < 1e-6       # iteration 1: policy == reference
    assert metrics[-1]["policy/approxkl_avg"] > 0 and metrics[-1]["objective/kl"] > 0
    assert scores[-3:].mean() > scores[0] + 0.3, scores
    model, _, tok, extra = model_io.load_model(os.path.join(run["workdir"], "model"), None)
    assert model.config.head == "lm" and tok is not None
    assert extra["advantage"] == advantage and extra["group_size"] == G
    assert extra["iterations"] == ITERATIONS


def test_no_recompilation_across_iterations(runs):
    compiles = runs("grpo")["compiles"]
    assert len(compiles) == ITERATIONS and compiles[0] > 0
    assert compiles[1:] == [compiles[0]] * (ITERATIONS - 1), compiles


def test_group_program_has_no_value_network(toy):
    program = ppo.build(toy_cfg(toy, "rloo"), make_mesh((2, 2, 2)))
    assert set(program.steps) == {"sync", "rollout", "experience", "update"}
    assert program.state.value == {} and "value" not in program.models
    assert program.plan.prompts_per_rollout == 16 // G and program.plan.group_size == G
    assert "value_update" not in program.calls_per_iteration
    assert program.steps["experience"].args[1] == {}


@pytest.fixture(scope="module")
def mesh_runs(toy):
    """``get(advantage, shape)``: a short grpo / rloo PPO-ptx train() on that mesh, run once."""
    out = {}

    def get(advantage, shape):
        if (advantage, shape) not in out:
            out[advantage, shape] = _mesh_run(toy, advantage, shape)
        return out[advantage, shape]
    return get


MESH_ITERATIONS = 2


def _mesh_run(toy, advantage, shape):
    # Two iterations: the first rollout samples the reference itself (KL 0), so only the second
    # puts a nonzero KL into rloo's sequence rewards and advantages, sampled by a policy the
    # sharded update trained.
    name = "x".join(map(str, shape))
    cfg = toy_cfg(toy, advantage, f"mesh.shape={shape}", f"ppo.iterations={MESH_ITERATIONS}",
                  "ppo.epochs=2", "ppo.ptx_coef=1.0", "ppo.sample_every=1")
    workdir = toy / f"mesh_{advantage}_{name}"
    run_train(cfg, workdir)
    _, params, _, _ = model_io.load_model(os.path.join(workdir, "model"), None)
    return dict(metrics=read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl")),
                params=jax.device_get(params),
                samples=read_jsonl_metrics(os.path.join(workdir, "samples.jsonl")))


# (8,1,1) is slow-marked as in test_ppo: (2,2,2) already splits the batch and the weights.
@pytest.mark.parametrize("shape", [pytest.param((8, 1, 1), marks=pytest.mark.slow), (2, 2, 2)],
                         ids=lambda shape: "x".join(map(str, shape)))
# The estimators are pinned against NumPy and the sharded PPO iteration is in the quick tier;
# the group methods' sharded runs are the slow tier's.
@pytest.mark.parametrize("advantage", [pytest.param("grpo", marks=pytest.mark.slow),
                                       pytest.param("rloo", marks=pytest.mark.slow)])
def test_sharded_iteration_equals_single_device(mesh_runs, advantage, shape):
    ref, got = mesh_runs(advantage, (1, 1, 1)), mesh_runs(advantage, shape)
    assert [(s["step"], s["prompt"], s["response"]) for s in got["samples"]] == \
        [(s["step"], s["prompt"], s["response"]) for s in ref["samples"]]
    assert {s["step"] for s in ref["samples"]} == set(range(1, MESH_ITERATIONS + 1))
    # Groups: each prompt of the sample table appears G times in a row.
    prompts = [s["prompt"] for s in ref["samples"]]
    assert prompts[:G] == [prompts[0]] * G and prompts[G] != prompts[0]
    assert len(got["metrics"]) == len(ref["metrics"]) == MESH_ITERATIONS
    for got_m, ref_m in zip(got["metrics"], ref["metrics"]):
        for key in ("objective/scores", "objective/kl", "objective/non_score_reward",
                    "loss/policy_avg", "policy/approxkl_avg", "policy/k3_kl_avg", "ptx/loss",
                    "response/length_mean"):
            np.testing.assert_allclose(got_m[key], ref_m[key], rtol=1e-4, atol=1e-4,
                                       err_msg=f"step {ref_m['step']}: {key}")
    # Key biases excepted: softmax is invariant to them, so their exact gradient is 0 and what
    # Adam (which rescales any gradient to ~lr) makes of the rounding noise differs by mesh.
    compared = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got["params"]),
                            jax.tree.leaves(ref["params"])):
        name = jax.tree_util.keystr(path)
        if "['k']['bias']" not in name:
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)
            compared += 1
    assert compared == len(jax.tree.leaves(ref["params"])) - 2       # one key bias per layer
    last = ref["metrics"][-1]
    assert last["policy/approxkl_avg"] > 0
    # Not vacuous for rloo: the last rollout's KL was nonzero and, folded in, moved the reward
    # (non_score_reward = -beta * KL per sequence).
    assert last["objective/kl"] > 1e-3
    if advantage == "rloo":
        assert last["objective/non_score_reward"] < -1e-4
