"""Golden tests for the beyond-InstructGPT objectives (DPO, GRPO, RLOO, k3 KL) against plain
NumPy loops in float64."""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import objectives as obj

RTOL = 1e-5
ATOL = 1e-6


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def np_log_sigmoid(x: float) -> float:
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x: float) -> float:
    return math.exp(np_log_sigmoid(x))


def right_padded_mask(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """[B, T] float mask with varying lengths, including one empty row and one full row."""
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = 0
    lengths[-1] = length
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch):
        mask[b, : lengths[b]] = 1.0
    return mask


# --------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------


def ranked_batch(rng: np.random.Generator, batch: int, k_max: int):
    """Sequence log-probs of B prompts x K_max slots with rankings and edge cases.

    Prompt 0 has no valid completion (all masked), prompt 1 a single one, prompt 2 only ties;
    the others have K_b in [2, K_max] with random (tied) ranks and at least one strict pair.
    Invalid slots hold NaN log-probs and garbage ranks, and valid slots are not a prefix.
    """
    policy = (rng.normal(size=(batch, k_max)) * 5 - 30).astype(np.float32)
    ref = (policy + rng.normal(size=(batch, k_max)) * 2).astype(np.float32)
    ranks = np.full((batch, k_max), -1, np.int32)
    valid = np.zeros((batch, k_max), bool)
    for b in range(batch):
        k_b = {0: 0, 1: 1}.get(b, int(rng.integers(2, k_max + 1)))
        valid[b, :k_b] = True
        ranks[b, :k_b] = rng.integers(0, k_b, size=k_b) if k_b else []
        if b == 2:
            ranks[b, :k_b] = 3
        elif b > 2:
            ranks[b, 0], ranks[b, 1] = 0, k_b
        order = rng.permutation(k_max)
        for array in (policy, ref, ranks, valid):
            array[b] = array[b, order]
    policy[~valid] = np.nan
    ref[~valid] = np.nan
    return policy, ref, ranks, valid


def np_dpo_reference(policy, ref, ranks, valid, beta):
    """Loop over prompts and over every strict pair; returns (loss, metrics, grad wrt policy)."""
    batch, k_max = policy.shape
    prompt_losses, prompt_terms = [], []
    n_pairs, correct, chosen_sum, rejected_sum = 0, 0, 0.0, 0.0
    for b in range(batch):
        members = [k for k in range(k_max) if valid[b, k]]
        n_comparisons = len(members) * (len(members) - 1) / 2
        total, terms = 0.0, []
        for i in members:
            for j in members:
                if not ranks[b, i] < ranks[b, j]:  # ties and reversed pairs are skipped
                    continue
                r_i = beta * (float(policy[b, i]) - float(ref[b, i]))
                r_j = beta * (float(policy[b, j]) - float(ref[b, j]))
                total += -np_log_sigmoid(r_i - r_j)
                terms.append((i, j, r_i - r_j))
                n_pairs += 1
                correct += int(r_i > r_j)
                chosen_sum += r_i
                rejected_sum += r_j
        if terms:
            prompt_losses.append(total / n_comparisons)
            prompt_terms.append((b, terms, n_comparisons))
    loss = sum(prompt_losses) / max(len(prompt_losses), 1)
    grad = np.zeros((batch, k_max))
    for b, terms, n_comparisons in prompt_terms:
        scale = 1.0 / n_comparisons / len(prompt_terms)
        for i, j, margin in terms:  # d/dm of -log sigmoid(m) = -sigmoid(-m); dm/dpi_i = beta
            grad[b, i] += scale * -beta * np_sigmoid(-margin)
            grad[b, j] += scale * beta * np_sigmoid(-margin)
    metrics = {
        "pair_accuracy": correct / max(n_pairs, 1),
        "n_pairs": n_pairs,
        "chosen_reward": chosen_sum / max(n_pairs, 1),
        "rejected_reward": rejected_sum / max(n_pairs, 1),
        "reward_margin": (chosen_sum - rejected_sum) / max(n_pairs, 1),
    }
    return loss, metrics, grad


@pytest.mark.parametrize("k_max,beta", [(2, 0.1), (3, 0.5), (4, 0.1), (6, 1.0)])
def test_dpo_loss_matches_loop(k_max: int, beta: float):
    rng = np.random.default_rng(200 + k_max)
    policy, ref, ranks, valid = ranked_batch(rng, batch=7, k_max=k_max)
    expected_loss, expected_metrics, expected_grad = np_dpo_reference(
        policy, ref, ranks, valid, beta)

    def loss_fn(p):
        return obj.dpo_loss(p, jnp.asarray(ref), jnp.asarray(ranks), valid, beta)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(policy)
    assert loss.dtype == jnp.float32
    assert_close(loss, expected_loss)
    for name, value in expected_metrics.items():
        assert_close(metrics[name], value, atol=1e-5)
    assert_close(grad, expected_grad)
    assert np.all(np.asarray(grad)[~valid] == 0.0)  # NaN garbage in padded slots stays out


def test_dpo_loss_pairwise_hand_computed_golden():
    # One pair: pi_w - ref_w = 2, pi_l - ref_l = -1, beta = 0.5 -> margin 1.5.
    policy = jnp.array([[-10.0, -14.0]])
    ref = jnp.array([[-12.0, -13.0]])
    loss, metrics = obj.dpo_loss(policy, ref, jnp.array([[0, 1]]), jnp.ones((1, 2), bool), 0.5)
    assert_close(loss, math.log1p(math.exp(-1.5)))
    assert_close(metrics["chosen_reward"], 1.0)
    assert_close(metrics["rejected_reward"], -0.5)
    assert_close(metrics["reward_margin"], 1.5)
    assert_close(metrics["pair_accuracy"], 1.0)
    assert_close(metrics["n_pairs"], 1)


def test_dpo_loss_at_reference_is_log_two_and_accuracy_zero():
    rng = np.random.default_rng(21)
    logps = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32) - 20)
    ranks = jnp.array([[0, 1, 2, 3]] * 3)
    loss, metrics = obj.dpo_loss(logps, logps, ranks, jnp.ones((3, 4), bool))
    assert_close(loss, math.log(2.0))  # all 6 pairs of each prompt: -log sigmoid(0), / C(4,2)
    assert float(metrics["pair_accuracy"]) == 0.0  # strict ordering: ties at 0 are not correct
    assert float(metrics["reward_margin"]) == 0.0


def test_dpo_loss_no_pairs_is_zero_not_nan():
    policy = jnp.array([[1.0, 2.0], [jnp.nan, jnp.nan]])
    valid = jnp.array([[True, True], [False, False]])
    ranks = jnp.array([[1, 1], [0, 1]])  # row 0 tied, row 1 all masked
    loss, metrics = obj.dpo_loss(policy, jnp.zeros((2, 2)), ranks, valid)
    assert float(loss) == 0.0
    assert float(metrics["n_pairs"]) == 0.0
    grad = jax.jit(jax.grad(lambda p: obj.dpo_loss(p, jnp.zeros((2, 2)), ranks, valid)[0]))(policy)
    assert np.all(np.asarray(grad) == 0.0)


def test_dpo_gradient_pushes_chosen_up_and_ignores_reference():
    rng = np.random.default_rng(22)
    policy = jnp.asarray(rng.normal(size=(4, 3)).astype(np.float32) - 20)
    ref = jnp.asarray(rng.normal(size=(4, 3)).astype(np.float32) - 20)
    ranks = jnp.array([[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1]])
    valid = jnp.ones((4, 3), bool)
    loss_fn = lambda p, r: obj.dpo_loss(p, r, ranks, valid, 0.1)[0]  # noqa: E731
    grad_policy, grad_ref = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(policy, ref)
    grad_policy = np.asarray(grad_policy)
    best, worst = np.asarray(ranks) == 0, np.asarray(ranks) == 2
    assert np.all(grad_policy[best] < 0)   # descending the loss raises the best completion
    assert np.all(grad_policy[worst] > 0)  # and lowers the worst
    assert np.all(np.asarray(grad_ref) == 0.0)  # the reference is a constant

    # One gradient step widens the implicit-reward margin.
    _, before = obj.dpo_loss(policy, ref, ranks, valid, 0.1)
    _, after = obj.dpo_loss(policy - 10.0 * grad_policy, ref, ranks, valid, 0.1)
    assert float(after["reward_margin"]) > float(before["reward_margin"])


# --------------------------------------------------------------------------------------
# GRPO / RLOO advantages
# --------------------------------------------------------------------------------------


def np_grpo(rewards: np.ndarray, group_size: int, eps: float, scale_by_std: bool, unbiased: bool):
    flat = rewards.astype(np.float64).ravel()
    out = np.zeros_like(flat)
    for start in range(0, flat.size, group_size):
        group = [float(r) for r in flat[start:start + group_size]]
        mean = sum(group) / group_size
        squares = sum((r - mean) ** 2 for r in group)
        std = math.sqrt(squares / (max(group_size - 1, 1) if unbiased else group_size))
        for i, r in enumerate(group):
            out[start + i] = (r - mean) / (std + eps) if scale_by_std else r - mean
    return out.reshape(rewards.shape)


def np_rloo(rewards: np.ndarray, group_size: int):
    flat = rewards.astype(np.float64).ravel()
    out = np.zeros_like(flat)
    for start in range(0, flat.size, group_size):
        for i in range(group_size):
            others = [float(flat[start + j]) for j in range(group_size) if j != i]
            out[start + i] = float(flat[start + i]) - sum(others) / len(others)
    return out.reshape(rewards.shape)


def group_rewards(rng: np.random.Generator, n_groups: int, group_size: int) -> np.ndarray:
    """[B * G] rewards; group 0 is constant (no signal), group 1 is 0/1 correctness."""
    rewards = (rng.normal(size=(n_groups, group_size)) * 2 + 1).astype(np.float32)
    rewards[0] = 0.7
    rewards[1] = rng.integers(0, 2, size=group_size)
    rewards[1, 0] = 1.0 - rewards[1, 1]  # at least one right and one wrong answer
    return rewards.ravel()


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 4, 7])
def test_grpo_advantages_match_loop(group_size, scale_by_std, unbiased):
    rng = np.random.default_rng(300 + group_size)
    rewards = group_rewards(rng, 5, group_size)
    expected = np_grpo(rewards, group_size, 1e-6, scale_by_std, unbiased)
    flat = obj.grpo_advantages(jnp.asarray(rewards), group_size, 1e-6, scale_by_std, unbiased)
    chex.assert_shape(flat, rewards.shape)
    chex.assert_type(flat, jnp.float32)
    assert_close(flat, expected)
    grid = obj.grpo_advantages(jnp.asarray(rewards.reshape(5, group_size)), group_size, 1e-6,
                               scale_by_std, unbiased)
    chex.assert_shape(grid, (5, group_size))
    assert_close(grid, expected.reshape(5, group_size))
    assert np.all(np.asarray(grid)[0] == 0.0)  # a constant group has no signal, and no NaN


def test_grpo_advantages_group_of_one_and_bad_shapes():
    assert np.all(np.asarray(obj.grpo_advantages(jnp.array([3.0, -1.0]), 1)) == 0.0)
    with pytest.raises(ValueError, match="groups of 4"):
        obj.grpo_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="groups of 4"):
        obj.grpo_advantages(jnp.zeros((2, 3)), 4)


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_rloo_advantages_match_loop(group_size):
    rng = np.random.default_rng(400 + group_size)
    rewards = group_rewards(rng, 4, group_size)
    expected = np_rloo(rewards, group_size)
    flat = obj.rloo_advantages(jnp.asarray(rewards), group_size)
    assert flat.dtype == jnp.float32
    assert_close(flat, expected)
    grid = obj.rloo_advantages(jnp.asarray(rewards.reshape(4, group_size)), group_size)
    assert_close(grid, expected.reshape(4, group_size))
    assert_close(np.asarray(grid).sum(axis=-1), np.zeros(4), atol=1e-5)  # f32 rounding
    # RLOO is the centred reward rescaled by G / (G - 1).
    centred = obj.grpo_advantages(jnp.asarray(rewards), group_size, scale_by_std=False)
    assert_close(flat, np.asarray(centred, np.float64) * group_size / (group_size - 1))


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="group_size >= 2"):
        obj.rloo_advantages(jnp.zeros(4), 1)


# --------------------------------------------------------------------------------------
# k3 KL and the GRPO policy loss
# --------------------------------------------------------------------------------------


def np_k3_mean(logp, ref_logp, mask):
    total, count = 0.0, 0.0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t]:
                x = float(ref_logp[b, t]) - float(logp[b, t])
                total += math.expm1(x) - x
                count += 1
    return total / max(count, 1.0)


def test_k3_kl_matches_loop_with_garbage_off_mask():
    rng = np.random.default_rng(30)
    logp = (rng.normal(size=(5, 9)) - 2).astype(np.float32)
    ref_logp = (logp + rng.normal(size=(5, 9)) * 0.5).astype(np.float32)
    mask = right_padded_mask(rng, 5, 9)
    logp_garbage = np.where(mask > 0, logp, -1e30).astype(np.float32)
    ref_garbage = np.where(mask > 0, ref_logp, np.nan).astype(np.float32)

    kl = obj.k3_kl(jnp.asarray(logp_garbage), jnp.asarray(ref_garbage), mask)
    assert kl.dtype == jnp.float32
    assert_close(kl, np_k3_mean(logp, ref_logp, mask))
    assert float(kl) > 0.0

    grad = jax.grad(lambda lp: obj.k3_kl(lp, ref_garbage, mask))(jnp.asarray(logp_garbage))
    expected_grad = np.where(mask > 0, 1.0 - np.exp(ref_logp.astype(np.float64) - logp), 0.0)
    assert_close(grad, expected_grad / mask.sum())


def test_k3_kl_edge_cases():
    logp = jnp.array([[-1.0, -2.0, -3.0]])
    assert float(obj.k3_kl(logp, logp, jnp.ones((1, 3)))) == 0.0
    assert float(obj.k3_kl(logp, logp + 1.0, jnp.zeros((1, 3)))) == 0.0  # empty mask
    # Tiny differences keep their value (expm1(x) - x, not exp(x) - x - 1, whose float32
    # rounding error ~1e-7 would swamp k3 ~ x^2 / 2 = 5e-9); expm1 leaves ~1e-3 relative.
    shifted = logp + 1e-4
    x = np.asarray(shifted, np.float64) - np.asarray(logp, np.float64)  # the float32 gaps
    tiny = obj.k3_kl(logp, shifted, jnp.ones((1, 3)))
    assert_close(tiny, np.mean([math.expm1(v) - v for v in x[0]]), rtol=5e-3, atol=0.0)


def test_k3_kl_expectation_under_policy_is_exact_kl():
    # Weighting every token of a categorical by pi(x) gives E_pi[k3] = KL(pi || ref).
    rng = np.random.default_rng(31)
    logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(1, 6)).astype(np.float32)))
    ref_logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(1, 6)).astype(np.float32)))
    lp, lr = np.asarray(logp, np.float64), np.asarray(ref_logp, np.float64)
    exact_kl = float((np.exp(lp) * (lp - lr)).sum())
    assert_close(obj.k3_kl(logp, ref_logp, jnp.exp(logp)), exact_kl, rtol=1e-5)


def grpo_inputs(rng: np.random.Generator, batch: int = 6, length: int = 7):
    old = (rng.normal(size=(batch, length)) - 2).astype(np.float32)
    new = (old + rng.normal(size=(batch, length)) * 0.3).astype(np.float32)
    ref = (old + rng.normal(size=(batch, length)) * 0.3).astype(np.float32)
    advantages = rng.normal(size=batch).astype(np.float32)
    mask = right_padded_mask(rng, batch, length)
    return new, old, ref, advantages, mask


def np_grpo_policy_loss(new, old, ref, advantages, mask, eps, kl_coef):
    surrogate, k3, clipped_flags = [], [], []
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(float(new[b, t]) - float(old[b, t]))
            a = float(advantages[b])  # one advantage for every token of sequence b
            unclipped = -a * ratio
            clipped = -a * min(max(ratio, 1 - eps), 1 + eps)
            surrogate.append(max(unclipped, clipped))
            clipped_flags.append(float(clipped > unclipped))
            x = float(ref[b, t]) - float(new[b, t])
            k3.append(math.exp(x) - x - 1)
    policy_loss, kl = np.mean(surrogate), np.mean(k3)
    return policy_loss + kl_coef * kl, policy_loss, kl, np.mean(clipped_flags)


@pytest.mark.parametrize("kl_coef", [0.0, 0.04, 1.0])
def test_grpo_policy_loss_matches_loop(kl_coef):
    rng = np.random.default_rng(32)
    new, old, ref, advantages, mask = grpo_inputs(rng)
    eps = 0.2
    new_garbage = np.where(mask > 0, new, 1e4).astype(np.float32)
    expected, expected_pg, expected_kl, expected_clipfrac = np_grpo_policy_loss(
        new, old, ref, advantages, mask, eps, kl_coef)

    def loss_fn(lp):
        return obj.grpo_policy_loss(lp, old, ref, advantages, mask, eps, kl_coef)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(new_garbage)
    assert loss.dtype == jnp.float32
    assert_close(loss, expected)
    assert_close(metrics["policy_loss"], expected_pg)
    assert_close(metrics["kl"], expected_kl)
    assert_close(metrics["clipfrac"], expected_clipfrac)
    assert 0.0 < float(metrics["clipfrac"]) < 1.0
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)

    # The surrogate is ppo_policy_loss with the sequence advantage on each token.
    ppo_loss, _ = obj.ppo_policy_loss(new, old, np.broadcast_to(advantages[:, None], new.shape),
                                      mask, eps)
    assert_close(metrics["policy_loss"], float(ppo_loss))


def test_grpo_policy_loss_at_old_and_reference_policy():
    rng = np.random.default_rng(33)
    new, _, _, advantages, mask = grpo_inputs(rng)
    loss, metrics = obj.grpo_policy_loss(new, new, new, advantages, mask)
    weighted = sum(float(advantages[b]) * mask[b].sum() for b in range(len(advantages)))
    assert_close(loss, -weighted / mask.sum())  # -token mean of A, no KL
    assert float(metrics["kl"]) == 0.0
    assert float(metrics["clipfrac"]) == 0.0
    empty, _ = obj.grpo_policy_loss(new, new, new, advantages, np.zeros_like(mask))
    assert float(empty) == 0.0


# --------------------------------------------------------------------------------------
# jit
# --------------------------------------------------------------------------------------


def test_jit_gives_the_same_values():
    rng = np.random.default_rng(34)
    policy, ref, ranks, valid = ranked_batch(rng, batch=5, k_max=4)
    rewards = group_rewards(rng, 3, 4)
    new, old, ref_tok, advantages, mask = grpo_inputs(rng)

    calls = [
        (obj.dpo_loss, (policy, ref, ranks, valid, 0.3), {}),
        (obj.grpo_advantages, (rewards,), {"group_size": 4}),
        (obj.rloo_advantages, (rewards,), {"group_size": 4}),
        (obj.k3_kl, (new, ref_tok, mask), {}),
        (obj.grpo_policy_loss, (new, old, ref_tok, advantages, mask, 0.2, 0.04), {}),
    ]
    for fn, args, static in calls:
        eager = fn(*args, **static)
        jitted = jax.jit(fn, static_argnames=tuple(static))(*args, **static)
        chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)
