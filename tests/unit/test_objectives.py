"""Golden tests for rlhf_jax.objectives against plain NumPy loops (float64 references)."""
from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import objectives as obj

RTOL = 1e-5
ATOL = 1e-5


# --------------------------------------------------------------------------------------
# Reference helpers (explicit loops, float64)
# --------------------------------------------------------------------------------------


def np_log_sigmoid(x: float) -> float:
    return -np.logaddexp(0.0, -x)


def np_log_softmax_row(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    top = row.max()
    return row - top - math.log(np.exp(row - top).sum())


def right_padded_mask(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """[B, T] float mask with varying lengths, including one empty row and one full row."""
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = 0
    lengths[-1] = length
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch):
        mask[b, : lengths[b]] = 1.0
    return mask


def np_masked_mean(x: np.ndarray, mask: np.ndarray) -> float:
    total, count = 0.0, 0.0
    for value, weight in zip(x.ravel(), mask.ravel()):
        if weight:
            total += float(value) * float(weight)
            count += float(weight)
    return total / max(count, 1.0)


def np_masked_var(x: np.ndarray, mask: np.ndarray, unbiased: bool) -> float:
    selected = [float(v) for v, m in zip(x.ravel(), mask.ravel()) if m]
    n = len(selected)
    mean = sum(selected) / max(n, 1)
    squares = sum((v - mean) ** 2 for v in selected)
    if unbiased:
        return squares / max(n - 1, 1)
    return squares / max(n, 1)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------
# Token log-probs, entropy, next-token loss
# --------------------------------------------------------------------------------------


def test_token_logprobs_matches_loop_and_is_float32_for_bf16():
    rng = np.random.default_rng(0)
    batch, length, vocab = 3, 5, 11
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 3
    targets = rng.integers(0, vocab, size=(batch, length))

    expected = np.zeros((batch, length))
    for b in range(batch):
        for t in range(length):
            expected[b, t] = np_log_softmax_row(logits[b, t])[targets[b, t]]

    result = obj.token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    assert result.dtype == jnp.float32
    assert_close(result, expected)

    bf16_result = obj.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert bf16_result.dtype == jnp.float32
    assert_close(bf16_result, expected, rtol=0.05, atol=0.1)


def test_token_entropy_matches_loop():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 7)).astype(np.float32) * 2
    expected = np.zeros((2, 4))
    for b in range(2):
        for t in range(4):
            log_p = np_log_softmax_row(logits[b, t])
            expected[b, t] = -sum(math.exp(lp) * lp for lp in log_p)
    result = obj.token_entropy(jnp.asarray(logits))
    assert result.dtype == jnp.float32
    assert_close(result, expected)
    assert np.all(np.asarray(result) <= math.log(7) + 1e-5)
    assert obj.token_entropy(jnp.asarray(logits, jnp.bfloat16)).dtype == jnp.float32


def test_next_token_loss_matches_loop():
    rng = np.random.default_rng(2)
    batch, length, vocab = 4, 6, 9
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, size=(batch, length))
    targets[1, :3] = np.argmax(logits[1, :3], axis=-1)  # guarantee some correct predictions
    mask = right_padded_mask(rng, batch, length)

    nll_total, correct, count = 0.0, 0.0, 0.0
    for b in range(batch):
        for t in range(length):
            if mask[b, t]:
                nll_total -= np_log_softmax_row(logits[b, t])[targets[b, t]]
                correct += float(np.argmax(logits[b, t]) == targets[b, t])
                count += 1

    loss, metrics = obj.next_token_loss(jnp.asarray(logits), jnp.asarray(targets), mask)
    assert_close(loss, nll_total / count)
    assert_close(metrics["accuracy"], correct / count)
    assert_close(metrics["n_tokens"], count)


# --------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------


def test_masked_reductions_match_loops():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    mask = right_padded_mask(rng, 5, 7)
    x_with_garbage = np.where(mask > 0, x, np.nan).astype(np.float32)

    assert_close(obj.masked_sum(x_with_garbage, mask), float((x * mask).sum()))
    assert_close(obj.masked_mean(x_with_garbage, mask), np_masked_mean(x, mask))
    assert_close(obj.masked_var(x_with_garbage, mask), np_masked_var(x, mask, unbiased=True))
    assert_close(
        obj.masked_var(x_with_garbage, mask.astype(bool), unbiased=False),
        np_masked_var(x, mask, unbiased=False),
    )

    row_means = obj.masked_mean(x, mask, axis=1)
    expected_rows = [np_masked_mean(x[b], mask[b]) for b in range(5)]
    assert_close(row_means, expected_rows)
    assert float(row_means[0]) == 0.0  # empty row -> 0, not NaN


def test_masked_mean_of_empty_mask_is_zero():
    x = jnp.ones((2, 3))
    assert float(obj.masked_mean(x, jnp.zeros((2, 3)))) == 0.0
    assert float(obj.masked_var(x, jnp.zeros((2, 3)))) == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(shift_mean: bool):
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(4, 6)) * 3 + 2).astype(np.float32)
    mask = right_padded_mask(rng, 4, 6)
    mean = np_masked_mean(x, mask)
    var = np_masked_var(x, mask, unbiased=True)

    expected = np.zeros_like(x, dtype=np.float64)
    for b in range(4):
        for t in range(6):
            if mask[b, t]:
                value = (x[b, t] - mean) / math.sqrt(var + 1e-8)
                expected[b, t] = value if shift_mean else value + mean

    result = obj.masked_whiten(x, mask, shift_mean=shift_mean)
    assert_close(result, expected)
    if shift_mean:
        assert_close(obj.masked_mean(result, mask), 0.0)
        assert_close(obj.masked_var(result, mask), 1.0, rtol=1e-4)


# --------------------------------------------------------------------------------------
# K-way ranking loss
# --------------------------------------------------------------------------------------


def np_kway_reference(rewards, ranks, valid):
    """Loop version of Eq. 1 plus the metrics; returns (loss, metrics, pair lists)."""
    prompt_losses, all_pairs = [], []
    pair_correct, margin_total, reward_total, reward_count = 0, 0.0, 0.0, 0
    per_prompt_pairs = []
    for b in range(rewards.shape[0]):
        members = [k for k in range(rewards.shape[1]) if valid[b, k]]
        for k in members:
            reward_total += float(rewards[b, k])
            reward_count += 1
        n_members = len(members)
        n_comparisons = n_members * (n_members - 1) / 2
        pairs = [(w, l) for w in members for l in members if ranks[b, w] < ranks[b, l]]
        per_prompt_pairs.append((pairs, n_comparisons))
        if not pairs:
            continue
        total = 0.0
        for w, l in pairs:
            margin = float(rewards[b, w]) - float(rewards[b, l])
            total += np_log_sigmoid(margin)
            pair_correct += int(margin > 0)
            margin_total += margin
            all_pairs.append((b, w, l))
        prompt_losses.append(-total / n_comparisons)
    n_pairs = len(all_pairs)
    metrics = {
        "pair_accuracy": pair_correct / max(n_pairs, 1),
        "n_pairs": n_pairs,
        "mean_reward": reward_total / max(reward_count, 1),
        "reward_margin": margin_total / max(n_pairs, 1),
    }
    loss = sum(prompt_losses) / max(len(prompt_losses), 1)
    return loss, metrics, per_prompt_pairs


def random_ranking_batch(rng: np.random.Generator, batch: int, k_max: int):
    """Variable K_b in [2, k_max] (one prompt with a single valid completion, one all tied),
    ranks with ties, and garbage ranks (-1, i.e. 'best') in the padded slots."""
    rewards = rng.normal(size=(batch, k_max)).astype(np.float32) * 2
    ranks = np.full((batch, k_max), -1, np.int32)
    valid = np.zeros((batch, k_max), bool)
    for b in range(batch):
        k_b = int(rng.integers(2, k_max + 1))
        if b == 0:
            k_b = 1
        valid[b, :k_b] = True
        ranks[b, :k_b] = rng.integers(0, k_b, size=k_b)  # repeated levels are ties
        if b == 1:
            ranks[b, :k_b] = 0
        elif b >= 2:  # guarantee at least one strict pair in the remaining prompts
            ranks[b, 0], ranks[b, 1] = 0, k_b
    order = rng.permutation(k_max)  # valid slots need not be a prefix
    return rewards[:, order], ranks[:, order], valid[:, order]


@pytest.mark.parametrize("k_max", list(range(2, 10)))
def test_kway_ranking_loss_matches_loop(k_max: int):
    rng = np.random.default_rng(100 + k_max)
    rewards, ranks, valid = random_ranking_batch(rng, batch=5, k_max=k_max)
    expected_loss, expected_metrics, _ = np_kway_reference(rewards, ranks, valid)

    loss, metrics = obj.kway_ranking_loss(jnp.asarray(rewards), jnp.asarray(ranks), valid)
    assert loss.dtype == jnp.float32
    assert_close(loss, expected_loss)
    for name, value in expected_metrics.items():
        assert_close(metrics[name], value)


def test_kway_ranking_loss_hand_computed_golden():
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    rewards = jnp.array([[1.0, 0.0, -1.0]])
    ranks = jnp.array([[0, 1, 2]])
    valid = jnp.ones((1, 3), bool)
    loss, metrics = obj.kway_ranking_loss(rewards, ranks, valid)
    # Pairs (0,1), (0,2), (1,2) have margins 1, 2, 1; C(3,2) = 3.
    expected = (softplus(-1.0) + softplus(-2.0) + softplus(-1.0)) / 3
    assert_close(loss, expected)
    assert_close(metrics["pair_accuracy"], 1.0)
    assert_close(metrics["n_pairs"], 3)
    assert_close(metrics["reward_margin"], 4.0 / 3.0)
    assert_close(metrics["mean_reward"], 0.0)


def test_kway_ranking_loss_tie_is_dropped_but_normaliser_stays_c_k_2():
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    # Completions 1 and 2 tie: only pairs (0,1) and (0,2) remain, still divided by C(3,2)=3.
    rewards = jnp.array([[0.5, 1.0, -1.0]])
    ranks = jnp.array([[0, 1, 1]])
    loss, metrics = obj.kway_ranking_loss(rewards, ranks, jnp.ones((1, 3), bool))
    expected = (softplus(0.5) + softplus(-1.5)) / 3
    assert_close(loss, expected)
    assert_close(metrics["n_pairs"], 2)
    assert_close(metrics["pair_accuracy"], 0.5)


def test_kway_ranking_loss_all_tied_batch_is_zero_not_nan():
    loss, metrics = obj.kway_ranking_loss(
        jnp.array([[1.0, 2.0]]), jnp.array([[0, 0]]), jnp.ones((1, 2), bool)
    )
    assert float(loss) == 0.0
    assert float(metrics["n_pairs"]) == 0.0


def test_kway_gradient_equals_scaled_sum_of_pair_gradients():
    rng = np.random.default_rng(7)
    rewards, ranks, valid = random_ranking_batch(rng, batch=6, k_max=6)
    _, _, per_prompt_pairs = np_kway_reference(rewards, ranks, valid)
    n_prompts_with_pairs = sum(1 for pairs, _ in per_prompt_pairs if pairs)

    def pair_loss(r_w, r_l):
        return -jax.nn.log_sigmoid(r_w - r_l)

    pair_grad = jax.grad(pair_loss, argnums=(0, 1))
    expected = np.zeros(rewards.shape, np.float64)
    for b, (pairs, n_comparisons) in enumerate(per_prompt_pairs):
        if not pairs:  # prompts without a strict pair contribute no gradient
            continue
        scale = 1.0 / n_comparisons / n_prompts_with_pairs
        for w, l in pairs:
            grad_w, grad_l = pair_grad(jnp.float32(rewards[b, w]), jnp.float32(rewards[b, l]))
            expected[b, w] += scale * float(grad_w)
            expected[b, l] += scale * float(grad_l)

    def loss_of_rewards(r):
        return obj.kway_ranking_loss(r, jnp.asarray(ranks), valid)[0]

    grads = jax.grad(loss_of_rewards)(jnp.asarray(rewards))
    assert_close(grads, expected, atol=1e-6)
    assert np.all(np.asarray(grads)[~valid] == 0.0)


# --------------------------------------------------------------------------------------
# Per-token rewards and GAE
# --------------------------------------------------------------------------------------


def test_per_token_rewards_matches_loop():
    rng = np.random.default_rng(9)
    batch, length, beta = 4, 7, 0.05
    logprobs = rng.normal(size=(batch, length)).astype(np.float32)
    ref_logprobs = rng.normal(size=(batch, length)).astype(np.float32)
    scores = rng.normal(size=batch).astype(np.float32)
    mask = right_padded_mask(rng, batch, length)

    expected_rewards = np.zeros((batch, length))
    expected_kl = np.zeros((batch, length))
    for b in range(batch):
        last = -1
        for t in range(length):
            if mask[b, t]:
                expected_kl[b, t] = float(logprobs[b, t]) - float(ref_logprobs[b, t])
                expected_rewards[b, t] = -beta * expected_kl[b, t]
                last = t
        if last >= 0:
            expected_rewards[b, last] += float(scores[b])

    rewards, kl = obj.per_token_rewards(logprobs, ref_logprobs, scores, mask, beta)
    assert_close(rewards, expected_rewards)
    assert_close(kl, expected_kl)
    assert np.all(np.asarray(rewards)[0] == 0.0)  # empty row: no score, no penalty


def test_per_token_rewards_float32_from_bf16_keeps_fractional_scores():
    logprobs = jnp.zeros((2, 4), jnp.bfloat16)
    ref_logprobs = jnp.zeros((2, 4), jnp.bfloat16)
    scores = jnp.array([0.37, -1.25], jnp.float32)
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.int32)  # int mask must not leak in
    rewards, kl = obj.per_token_rewards(logprobs, ref_logprobs, scores, mask, 0.02)
    chex.assert_type([rewards, kl], jnp.float32)
    assert float(rewards[0, 1]) == pytest.approx(0.37, abs=1e-7)
    assert float(rewards[1, 3]) == pytest.approx(-1.25, abs=1e-7)
    assert float(jnp.abs(rewards).sum()) == pytest.approx(0.37 + 1.25, abs=1e-6)


def np_gae(rewards, values, mask, gamma, lam):
    batch, length = rewards.shape
    advantages = np.zeros((batch, length))
    returns = np.zeros((batch, length))
    for b in range(batch):
        next_advantage, next_value, next_mask = 0.0, 0.0, 0.0
        for t in reversed(range(length)):
            delta = rewards[b, t] + gamma * next_value * next_mask - values[b, t]
            advantage = delta + gamma * lam * next_mask * next_advantage
            if mask[b, t]:
                advantages[b, t] = advantage
                returns[b, t] = advantage + values[b, t]
            next_advantage, next_value, next_mask = advantage, values[b, t], mask[b, t]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_loop_under_jit(gamma: float, lam: float):
    rng = np.random.default_rng(10)
    rewards = rng.normal(size=(4, 8)).astype(np.float32)
    values = rng.normal(size=(4, 8)).astype(np.float32)
    mask = right_padded_mask(rng, 4, 8)
    expected_adv, expected_ret = np_gae(
        rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam
    )
    gae = jax.jit(obj.gae_advantages, static_argnames=("gamma", "lam"))
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    chex.assert_type([advantages, returns], jnp.float32)
    assert_close(advantages, expected_adv)
    assert_close(returns, expected_ret)


def test_gae_single_terminal_reward_gamma_one_lambda_one_gives_return_minus_value():
    # With gamma = lam = 1 the advantage is (sum of future rewards) - V_t.
    rewards = jnp.array([[0.0, 0.0, 2.0, 9.0]])
    values = jnp.array([[0.5, 1.0, 1.5, 7.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = obj.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(advantages, [[1.5, 1.0, 0.5, 0.0]])
    assert_close(returns, [[2.0, 2.0, 2.0, 0.0]])


# --------------------------------------------------------------------------------------
# PPO losses
# --------------------------------------------------------------------------------------


def test_ppo_policy_loss_matches_loop():
    rng = np.random.default_rng(11)
    batch, length, eps = 4, 6, 0.2
    old = rng.normal(size=(batch, length)).astype(np.float32)
    new = (old + rng.normal(size=(batch, length)) * 0.3).astype(np.float32)
    advantages = rng.normal(size=(batch, length)).astype(np.float32)
    mask = right_padded_mask(rng, batch, length)
    new_with_garbage = np.where(mask > 0, new, 1e4).astype(np.float32)

    losses, clipped_flags, sq_log_ratios, ratios = [], [], [], []
    for b in range(batch):
        for t in range(length):
            if not mask[b, t]:
                continue
            ratio = math.exp(float(new[b, t]) - float(old[b, t]))
            a = float(advantages[b, t])
            unclipped = -a * ratio
            clipped = -a * min(max(ratio, 1 - eps), 1 + eps)
            losses.append(max(unclipped, clipped))
            clipped_flags.append(float(clipped > unclipped))
            sq_log_ratios.append((float(new[b, t]) - float(old[b, t])) ** 2)
            ratios.append(ratio)

    loss, metrics = obj.ppo_policy_loss(new_with_garbage, old, advantages, mask, eps)
    assert_close(loss, np.mean(losses))
    assert_close(metrics["clipfrac"], np.mean(clipped_flags))
    assert 0.0 < float(metrics["clipfrac"]) < 1.0
    assert_close(metrics["approxkl"], 0.5 * np.mean(sq_log_ratios))
    assert_close(metrics["ratio_mean"], np.mean(ratios))
    assert_close(metrics["ratio_max"], np.max(ratios))

    grads = jax.grad(lambda lp: obj.ppo_policy_loss(lp, old, advantages, mask, eps)[0])(
        jnp.asarray(new_with_garbage)
    )
    assert np.all(np.isfinite(np.asarray(grads)))


def test_ppo_policy_loss_at_old_policy():
    rng = np.random.default_rng(12)
    logprobs = rng.normal(size=(3, 5)).astype(np.float32)
    advantages = rng.normal(size=(3, 5)).astype(np.float32)
    mask = right_padded_mask(rng, 3, 5)
    loss, metrics = obj.ppo_policy_loss(logprobs, logprobs, advantages, mask)
    assert_close(metrics["ratio_mean"], 1.0)
    assert_close(metrics["ratio_max"], 1.0)
    assert float(metrics["clipfrac"]) == 0.0
    assert float(metrics["approxkl"]) == 0.0
    assert_close(loss, -float(obj.masked_mean(advantages, mask)))


@pytest.mark.parametrize("clip_range", [0.2, None])
def test_value_loss_matches_loop(clip_range):
    rng = np.random.default_rng(13)
    old_values = rng.normal(size=(3, 6)).astype(np.float32)
    values = (old_values + rng.normal(size=(3, 6)) * 0.4).astype(np.float32)
    returns = rng.normal(size=(3, 6)).astype(np.float32)
    mask = right_padded_mask(rng, 3, 6)

    terms, flags = [], []
    for b in range(3):
        for t in range(6):
            if not mask[b, t]:
                continue
            v, old, ret = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            unclipped = (v - ret) ** 2
            if clip_range is None:
                terms.append(unclipped)
                flags.append(0.0)
                continue
            v_clipped = old + min(max(v - old, -clip_range), clip_range)
            clipped = (v_clipped - ret) ** 2
            terms.append(max(unclipped, clipped))
            flags.append(float(clipped > unclipped))

    loss, metrics = obj.value_loss(values, old_values, returns, mask, clip_range=clip_range)
    assert_close(loss, 0.5 * np.mean(terms))
    assert_close(metrics["vf_clipfrac"], np.mean(flags))
    if clip_range is not None:
        assert float(metrics["vf_clipfrac"]) > 0.0


def test_explained_variance_matches_loop():
    rng = np.random.default_rng(14)
    returns = rng.normal(size=(4, 5)).astype(np.float32)
    values = (returns + rng.normal(size=(4, 5)) * 0.5).astype(np.float32)
    mask = right_padded_mask(rng, 4, 5)
    residual = returns.astype(np.float64) - values.astype(np.float64)
    expected = 1.0 - np_masked_var(residual, mask, False) / np_masked_var(returns, mask, False)
    assert_close(obj.explained_variance(values, returns, mask), expected)
    assert_close(obj.explained_variance(returns, returns, mask), 1.0)
    constant = jnp.ones((2, 3))
    assert float(obj.explained_variance(constant, constant, jnp.ones((2, 3)))) == 0.0


# --------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------


def test_fixed_kl_update_keeps_coefficient():
    assert obj.fixed_kl_update(0.02, kl=12.0, n_steps=512) == 0.02


def test_adaptive_kl_update_golden_values():
    # kl above target by 10%: e = 0.1 -> coef * (1 + 0.1 * 512 / 10000).
    assert obj.adaptive_kl_update(0.1, 6.6, 512, 6.0, 10000) == pytest.approx(
        0.1 * (1 + 0.1 * 0.0512)
    )
    # Far above target: error clipped at +0.2; far below: clipped at -0.2.
    assert obj.adaptive_kl_update(0.1, 60.0, 512, 6.0, 10000) == pytest.approx(
        0.1 * (1 + 0.2 * 0.0512)
    )
    low = obj.adaptive_kl_update(0.1, 0.0, 512, 6.0, 10000)
    assert isinstance(low, float)
    assert low == pytest.approx(0.1 * (1 - 0.2 * 0.0512))

    jitted = jax.jit(obj.adaptive_kl_update, static_argnames=("target", "horizon"))
    traced = jitted(jnp.float32(0.1), jnp.float32(6.6), jnp.float32(512), target=6.0,
                    horizon=10000.0)
    assert float(traced) == pytest.approx(0.1 * (1 + 0.1 * 0.0512), rel=1e-6)


def test_value_at_last_token_golden():
    from rlhf_jax.objectives import value_at_last_token
    values = np.arange(12, dtype=np.float32).reshape(3, 4) + 0.25
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    expected = []
    for row in range(3):
        last = [t for t in range(4) if mask[row, t]]
        expected.append(values[row, last[-1]] if last else 0.0)
    out = value_at_last_token(jnp.asarray(values, jnp.bfloat16).astype(jnp.float32), mask)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6)


def test_objectives_refuse_mismatched_shapes_at_trace_time():
    """A flat [B*K] reward vector or a [B] mask would broadcast into a wrong number silently;
    chex stops it when the function is traced (inside jit as well)."""
    rewards, ranks = jnp.zeros((2, 4)), jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(AssertionError):
        obj.kway_ranking_loss(rewards.reshape(8), ranks.reshape(8), jnp.ones((8,), bool))
    with pytest.raises(AssertionError):
        jax.jit(obj.kway_ranking_loss)(rewards, ranks, jnp.ones((2, 3), bool))
    with pytest.raises(AssertionError):
        obj.per_token_rewards(jnp.zeros((2, 5)), jnp.zeros((2, 5)), jnp.zeros((3,)), jnp.ones((2, 5)), 0.1)
    with pytest.raises(AssertionError):
        obj.gae_advantages(jnp.zeros((2, 5)), jnp.zeros((2, 5)), jnp.ones((2,)))
    with pytest.raises(AssertionError):
        obj.ppo_policy_loss(jnp.zeros((2, 5)), jnp.zeros((2, 5)), jnp.zeros((2, 4)), jnp.ones((2, 5)))
