"""Loss functions and RL quantities for SFT, the K-way reward model and PPO-ptx.

Every function here is a pure ``jnp`` function: static shapes, no Python control flow on
array values, safe under ``jax.jit``. Everything that is a log-prob, reward, value or
advantage comes back as float32, whatever the dtype of the logits (bf16 included).

Alignment convention: inputs are already aligned. For next-token prediction the caller
passes ``logits[:, :-1]`` together with ``ids[:, 1:]``; nothing in this module shifts.

Masks are bool or float arrays broadcastable to the values they weight. They are treated as
float32 weights; the "safe" denominators (``max(sum(mask), 1)``) assume 0/1 masks, so a
fractional weight vector summing to less than one is not renormalised.
"""
from __future__ import annotations

from typing import Optional, Union

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
Scalar = Union[float, Array]

# --------------------------------------------------------------------------------------
# Token-level log-probabilities
# --------------------------------------------------------------------------------------


def token_logprobs(logits: Array, targets: Array) -> Array:
    """Log-probability of each target token under ``logits``.

    Args:
      logits: [B, T, V] any float dtype (bf16 is upcast before the softmax).
      targets: [B, T] int token ids aligned with ``logits``. Ids outside ``[0, V)`` (such as
        -100 "ignore" labels) are clipped into range; mask those positions out downstream.

    Returns:
      [B, T] float32 log p(target).
    """
    logits32 = logits.astype(jnp.float32)
    vocab_size = logits.shape[-1]
    safe_targets = jnp.clip(targets, 0, vocab_size - 1).astype(jnp.int32)
    # logit[target] - logsumexp(logits) avoids materialising a second [B, T, V] buffer.
    target_logits = jnp.take_along_axis(logits32, safe_targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits32, axis=-1)


def token_entropy(logits: Array) -> Array:
    """Entropy of the next-token distribution at each position.

    Args:
      logits: [B, T, V] any float dtype.

    Returns:
      [B, T] float32 entropy in nats.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


# --------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------


def _as_weights(mask: Array) -> Array:
    return jnp.asarray(mask).astype(jnp.float32)


def masked_sum(x: Array, mask: Array, axis: Optional[Union[int, tuple]] = None) -> Array:
    """Sum of ``x * mask`` over ``axis`` (all axes when None), in float32.

    Positions outside the mask contribute exactly 0 even if ``x`` holds inf/NaN there
    (padded positions often carry garbage), hence ``where`` instead of a bare product.
    """
    weights = _as_weights(mask)
    x32 = jnp.asarray(x).astype(jnp.float32)
    weighted = jnp.where(weights != 0, x32 * weights, 0.0)
    return jnp.sum(weighted, axis=axis)


def masked_mean(x: Array, mask: Array, axis: Optional[Union[int, tuple]] = None) -> Array:
    """Mean of ``x`` over the masked positions; 0 for an empty mask.

    Denominator is ``max(sum(mask), 1)`` so an all-zero mask yields 0 rather than NaN.
    Shapes: ``x`` and ``mask`` broadcast together; result has ``axis`` reduced. float32.
    """
    weights = jnp.broadcast_to(_as_weights(mask), jnp.shape(x))
    count = jnp.sum(weights, axis=axis)
    return masked_sum(x, weights, axis=axis) / jnp.maximum(count, 1.0)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance of ``x`` over all masked positions (a scalar, float32).

    With ``unbiased`` the Bessel factor n/(n-1) is applied, guarded so n <= 1 gives the
    biased value instead of a division by zero.
    """
    weights = jnp.broadcast_to(_as_weights(mask), jnp.shape(x))
    mean = masked_mean(x, weights)
    biased = masked_mean(jnp.square(jnp.asarray(x).astype(jnp.float32) - mean), weights)
    if not unbiased:
        return biased
    count = jnp.sum(weights)
    return biased * count / jnp.maximum(count - 1.0, 1.0)


def masked_whiten(
    x: Array,
    mask: Array,
    shift_mean: bool = True,
    eps: float = 1e-8,
    unbiased: bool = True,
) -> Array:
    """Normalise ``x`` to unit variance over the masked positions.

    ``(x - mean) * rsqrt(var + eps)``; with ``shift_mean=False`` the mean is added back
    (lm-human-preferences whitens rewards that way, keeping their sign). Positions outside
    the mask are set to 0. Returns float32 with the shape of ``x``.
    """
    weights = jnp.broadcast_to(_as_weights(mask), jnp.shape(x))
    x32 = jnp.asarray(x).astype(jnp.float32)
    mean = masked_mean(x32, weights)
    var = masked_var(x32, weights, unbiased=unbiased)
    whitened = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(weights != 0, whitened, 0.0)


# --------------------------------------------------------------------------------------
# Supervised losses
# --------------------------------------------------------------------------------------


def next_token_loss(logits: Array, targets: Array, loss_mask: Array) -> tuple[Array, dict]:
    """Token-mean negative log-likelihood over the mask (SFT, pretraining and ptx term).

    Args:
      logits: [B, T, V] aligned with ``targets``.
      targets: [B, T] int.
      loss_mask: [B, T] bool/float, 1 where the token counts (e.g. response tokens only).

    Returns:
      (loss scalar f32, {"accuracy": masked mean of argmax == target, "n_tokens": sum(mask)}).
    """
    nll = -token_logprobs(logits, targets)
    loss = masked_mean(nll, loss_mask)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        "accuracy": masked_mean(correct, loss_mask),
        "n_tokens": jnp.sum(_as_weights(loss_mask)),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------
# Reward-model losses
# --------------------------------------------------------------------------------------


def _strict_pair_mask(ranks: Array, valid: Array) -> Array:
    """[B, K, K] float32: 1 where completion i is strictly better than j (rank 0 = best)."""
    valid = jnp.asarray(valid).astype(bool)
    both_valid = valid[:, :, None] & valid[:, None, :]
    strictly_better = ranks[:, :, None] < ranks[:, None, :]  # equal ranks (ties) drop out
    return (both_valid & strictly_better).astype(jnp.float32)


def kway_ranking_loss(rewards: Array, ranks: Array, valid: Array) -> tuple[Array, dict]:
    """InstructGPT Eq. 1: all C(K, 2) comparisons of a prompt form one batch element.

    For prompt b with K_b valid completions,
      loss_b = -1/C(K_b, 2) * sum_{(w, l): rank_w < rank_l} log sigmoid(r_w - r_l),
    summed over ordered pairs with both completions valid; ties are dropped but the
    normaliser stays C(K_b, 2) as written in the paper. The batch loss is the mean of
    loss_b over the prompts that have at least one strict pair.

    Args:
      rewards: [B, K] RM scores (upcast to float32).
      ranks: [B, K] int, 0 = best; equal values are ties. Ignored where not valid.
      valid: [B, K] bool, which of the K_max slots hold a real completion.

    Returns:
      (loss scalar f32, metrics) with "pair_accuracy" (fraction of strict pairs with
      r_w > r_l), "n_pairs", "mean_reward" (over valid completions) and "reward_margin"
      (mean r_w - r_l over strict pairs).
    """
    # Shapes are checked at trace time (free under jit): a [B*K] reward vector or ranks of another
    # prompt count would otherwise broadcast into a wrong loss silently.
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, ranks, valid])
    rewards32 = rewards.astype(jnp.float32)
    pair_mask = _strict_pair_mask(ranks, valid)
    margins = rewards32[:, :, None] - rewards32[:, None, :]  # [B, K, K]: r_i - r_j

    n_valid = jnp.sum(jnp.asarray(valid).astype(jnp.float32), axis=-1)
    n_comparisons = jnp.maximum(n_valid * (n_valid - 1.0) / 2.0, 1.0)  # C(K_b, 2)
    per_prompt_loss = -masked_sum(jax.nn.log_sigmoid(margins), pair_mask, axis=(1, 2))
    per_prompt_loss = per_prompt_loss / n_comparisons

    pairs_per_prompt = jnp.sum(pair_mask, axis=(1, 2))
    has_pairs = (pairs_per_prompt > 0).astype(jnp.float32)
    loss = masked_mean(per_prompt_loss, has_pairs)

    n_pairs = jnp.sum(pairs_per_prompt)
    metrics = {
        "pair_accuracy": masked_mean((margins > 0).astype(jnp.float32), pair_mask),
        "n_pairs": n_pairs,
        "mean_reward": masked_mean(rewards32, valid),
        "reward_margin": masked_mean(margins, pair_mask),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------
# PPO: rewards, advantages, losses
# --------------------------------------------------------------------------------------


def _last_valid_one_hot(mask: Array) -> Array:
    """[B, T] float32 one-hot of the last position where mask != 0 (all zeros if none)."""
    positions = jnp.arange(mask.shape[-1])
    last_index = jnp.max(jnp.where(mask != 0, positions, -1), axis=-1)  # -1 for empty rows
    return (positions[None, :] == last_index[:, None]).astype(jnp.float32)


def value_at_last_token(values: Array, mask: Array) -> Array:
    """[B, T] per-position values -> [B] float32 value at each row's last real token.

    The reward model's score for prompt+response is read here (the last token of the response,
    wherever padding puts it); rows with an empty mask give 0.
    """
    return jnp.sum(values.astype(jnp.float32) * _last_valid_one_hot(mask), axis=-1)


def per_token_rewards(
    logprobs: Array,
    ref_logprobs: Array,
    scores: Array,
    response_mask: Array,
    kl_coef: Scalar,
) -> tuple[Array, Array]:
    """KL-penalised per-token reward, with the RM score on the last response token.

    r_t = -kl_coef * (logp_t - ref_logp_t) + 1[t = last valid] * score
    (lm-human-preferences ``compute_rewards``, for right-padded responses).

    Args:
      logprobs, ref_logprobs: [B, T] policy and reference log-probs of the sampled tokens.
      scores: [B] RM score per episode (fractional values are kept exactly in float32).
      response_mask: [B, T] bool/float, 1 on response tokens. A row of zeros gets no score.
      kl_coef: Python float or jnp scalar beta.

    Returns:
      (rewards [B, T] f32, kl [B, T] f32), both zero outside the mask.
    """
    chex.assert_rank([logprobs, scores], [2, 1])
    chex.assert_equal_shape([logprobs, ref_logprobs, response_mask])
    chex.assert_equal_shape_prefix([logprobs, scores], 1)
    weights = _as_weights(response_mask)
    log_ratio = logprobs.astype(jnp.float32) - ref_logprobs.astype(jnp.float32)
    kl = jnp.where(weights != 0, log_ratio * weights, 0.0)
    beta = jnp.asarray(kl_coef, dtype=jnp.float32)
    score_at_end = scores.astype(jnp.float32)[:, None] * _last_valid_one_hot(weights)
    rewards = -beta * kl + score_at_end
    return rewards, kl


def gae_advantages(
    rewards: Array,
    values: Array,
    mask: Array,
    gamma: Scalar = 1.0,
    lam: Scalar = 0.95,
) -> tuple[Array, Array]:
    """Generalised advantage estimation as a reverse ``lax.scan`` over time.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    so nothing is bootstrapped past the last valid token.

    Args:
      rewards, values: [B, T] (upcast to float32).
      mask: [B, T] bool/float, 1 on response tokens.

    Returns:
      (advantages [B, T] f32, returns = advantages + values [B, T] f32), 0 outside mask.
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape([rewards, values, mask])
    weights = _as_weights(mask)
    rewards32 = rewards.astype(jnp.float32)
    values32 = values.astype(jnp.float32)

    def step(carry, inputs):
        next_value, next_advantage, next_mask = carry
        reward_t, value_t, mask_t = inputs
        delta = reward_t + gamma * next_value * next_mask - value_t
        advantage = delta + gamma * lam * next_mask * next_advantage
        return (value_t, advantage, mask_t), advantage

    batch = rewards.shape[0]
    zeros = jnp.zeros((batch,), jnp.float32)
    time_major = (rewards32.T, values32.T, weights.T)  # scan runs over the leading axis
    _, advantages_tm = jax.lax.scan(step, (zeros, zeros, zeros), time_major, reverse=True)
    advantages = advantages_tm.T
    advantages = jnp.where(weights != 0, advantages, 0.0)
    returns = jnp.where(weights != 0, advantages + values32, 0.0)
    return advantages, returns


def ppo_policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    clip_eps: Scalar = 0.2,
) -> tuple[Array, dict]:
    """Clipped PPO surrogate (Schulman et al. 2017), token mean over the mask.

    loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).

    Args:
      logprobs: [B, T] current policy log-probs (differentiable).
      old_logprobs, advantages: [B, T] from the rollout (treated as constants).
      mask: [B, T] bool/float.

    Returns:
      (loss f32, {"clipfrac", "approxkl" = 0.5 * mean(log_ratio^2), "ratio_mean",
      "ratio_max"}).
    """
    chex.assert_equal_shape([logprobs, old_logprobs, advantages, mask])
    weights = _as_weights(mask)
    # Zero the log-ratio off-mask before exp: padded positions may hold garbage that would
    # overflow to inf and poison the gradient through the masked reduction.
    log_ratio = logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32)
    log_ratio = jnp.where(weights != 0, log_ratio, 0.0)
    ratio = jnp.exp(log_ratio)
    advantages32 = advantages.astype(jnp.float32)

    unclipped = -advantages32 * ratio
    clipped = -advantages32 * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), weights)

    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), weights),
        "approxkl": 0.5 * masked_mean(jnp.square(log_ratio), weights),
        "ratio_mean": masked_mean(ratio, weights),
        # ratio > 0 everywhere, so 0 off-mask never wins the max (and an empty mask gives 0).
        "ratio_max": jnp.max(jnp.where(weights != 0, ratio, 0.0)),
    }
    return loss, metrics


def value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    clip_range: Optional[float] = 0.2,
) -> tuple[Array, dict]:
    """Value-function loss, optionally clipped around the rollout values.

    Clipped: 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2)) with
    v_clip = old + clip(v - old, -c, c). ``clip_range=None`` gives 0.5 * masked MSE.

    Args:
      values: [B, T] current value predictions (differentiable).
      old_values, returns: [B, T] from the rollout.
      mask: [B, T] bool/float.
      clip_range: static Python float or None.

    Returns:
      (loss f32, {"vf_clipfrac": fraction of tokens where the clipped branch is larger}).
    """
    weights = _as_weights(mask)
    values32 = values.astype(jnp.float32)
    returns32 = returns.astype(jnp.float32)
    unclipped_error = jnp.square(values32 - returns32)
    if clip_range is None:
        return 0.5 * masked_mean(unclipped_error, weights), {"vf_clipfrac": jnp.float32(0.0)}

    old32 = old_values.astype(jnp.float32)
    values_clipped = old32 + jnp.clip(values32 - old32, -clip_range, clip_range)
    clipped_error = jnp.square(values_clipped - returns32)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_error, clipped_error), weights)
    clipfrac = masked_mean((clipped_error > unclipped_error).astype(jnp.float32), weights)
    return loss, {"vf_clipfrac": clipfrac}


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    """1 - Var(returns - values) / Var(returns) over the masked positions (scalar f32).

    Returns 0 when the returns have zero variance, to keep logged metrics finite.
    """
    values32 = values.astype(jnp.float32)
    returns32 = returns.astype(jnp.float32)
    var_returns = masked_var(returns32, mask, unbiased=False)
    var_residual = masked_var(returns32 - values32, mask, unbiased=False)
    safe_var = jnp.where(var_returns > 0, var_returns, 1.0)
    return jnp.where(var_returns > 0, 1.0 - var_residual / safe_var, 0.0)


# --------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------


def _clip_scalar(x: Scalar, low: float, high: float) -> Scalar:
    """Clip that keeps Python floats as Python floats and handles jnp scalars/tracers."""
    if isinstance(x, (int, float)):
        return min(max(x, low), high)
    return jnp.clip(x, low, high)


def fixed_kl_update(coef: Scalar, kl: Scalar, n_steps: Scalar) -> Scalar:
    """Fixed KL coefficient (InstructGPT: beta = 0.02): the measured KL is ignored."""
    del kl, n_steps
    return coef


def adaptive_kl_update(
    coef: Scalar, kl: Scalar, n_steps: Scalar, target: Scalar, horizon: Scalar
) -> Scalar:
    """Ziegler et al. (2019) log-space proportional controller.

    e = clip(kl / target - 1, -0.2, 0.2); coef <- coef * (1 + e * n_steps / horizon),
    with ``n_steps`` the episodes in this batch and ``horizon`` e.g. 10,000 episodes.
    Accepts Python floats (returns a Python float) or jnp scalars (returns a jnp scalar).
    """
    proportional_error = _clip_scalar(kl / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + proportional_error * n_steps / horizon)


# --------------------------------------------------------------------------------------
# Beyond InstructGPT: DPO, GRPO / RLOO advantages, k3 KL
# --------------------------------------------------------------------------------------


def dpo_loss(
    policy_logps: Array,
    ref_logps: Array,
    ranks: Array,
    valid: Array,
    beta: Scalar = 0.1,
) -> tuple[Array, dict]:
    """Sigmoid DPO (Rafailov et al. 2023) over every strict pair of a K-way ranking.

    With the implicit reward r_i = beta * (log pi(y_i|x) - log ref(y_i|x)), DPO's pair loss
    -log sigmoid(r_w - r_l) is exactly the reward-model pair loss, so this is
    ``kway_ranking_loss`` on the implicit rewards: the same pairs (rank_w < rank_l, both
    valid, ties dropped), the same per-prompt normaliser C(K_b, 2) and the same mean over the
    prompts that have a strict pair. One K-way row thus gives C(K, 2) DPO pairs for the cost
    of K policy and K reference sequence log-probs; K = 2 is the usual pairwise DPO.

    Args:
      policy_logps: [B, K] summed response log-probs under the policy (differentiable), e.g.
        ``masked_sum(token_logprobs(...), response_mask, axis=-1)`` reshaped to [B, K].
      ref_logps: [B, K] the same under the frozen reference; a constant (stop_gradient).
      ranks: [B, K] int, 0 = best; equal values are ties. Ignored where not valid.
      valid: [B, K] bool, which slots hold a real completion. Invalid slots may hold garbage
        (inf/NaN): they are zeroed before any arithmetic so the gradient stays finite.
      beta: strength of the implicit KL constraint (Python float or jnp scalar).

    Returns:
      (loss f32, metrics) with "pair_accuracy" (fraction of strict pairs whose implicit
      rewards are ordered correctly, r_w > r_l strictly, so 0 at the reference), "n_pairs",
      "chosen_reward" / "rejected_reward" (mean r_w / r_l over strict pairs) and
      "reward_margin" (mean r_w - r_l, = chosen_reward - rejected_reward).
    """
    valid_bool = jnp.asarray(valid).astype(bool)
    log_ratio = policy_logps.astype(jnp.float32) - jax.lax.stop_gradient(
        ref_logps.astype(jnp.float32))
    log_ratio = jnp.where(valid_bool, log_ratio, 0.0)
    rewards = jnp.asarray(beta, jnp.float32) * log_ratio  # [B, K] implicit rewards

    loss, rm_metrics = kway_ranking_loss(rewards, ranks, valid_bool)

    pair_mask = _strict_pair_mask(ranks, valid_bool)
    chosen = jnp.broadcast_to(rewards[:, :, None], pair_mask.shape)    # r_i for pair (i, j)
    rejected = jnp.broadcast_to(rewards[:, None, :], pair_mask.shape)  # r_j for pair (i, j)
    metrics = {
        "pair_accuracy": rm_metrics["pair_accuracy"],
        "n_pairs": rm_metrics["n_pairs"],
        "chosen_reward": masked_mean(chosen, pair_mask),
        "rejected_reward": masked_mean(rejected, pair_mask),
        "reward_margin": rm_metrics["reward_margin"],
    }
    return loss, metrics


def _grouped(rewards: Array, group_size: int) -> Array:
    """[B * G] (group-major: prompt b owns rows b*G .. b*G + G-1) or [B, G] -> [B, G] f32."""
    shape = jnp.shape(rewards)
    fits = (len(shape) == 2 and shape[1] == group_size) or (
        len(shape) == 1 and group_size > 0 and shape[0] % group_size == 0)
    if not fits:
        raise ValueError(f"rewards of shape {shape} do not split into groups of {group_size}; "
                         f"expected [B * {group_size}] or [B, {group_size}]")
    return jnp.asarray(rewards).astype(jnp.float32).reshape(-1, group_size)


def grpo_advantages(
    rewards: Array,
    group_size: int,
    eps: float = 1e-6,
    scale_by_std: bool = True,
    unbiased: bool = True,
) -> Array:
    """GRPO (Shao et al. 2024) outcome advantages: each reward against its own prompt's group.

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps). The G samples of one prompt are the
    baseline for each other, so no value network is needed. ``unbiased`` uses the Bessel
    (G - 1) std as TRL and verl do (``torch.std``); ``scale_by_std=False`` keeps only the
    centring (Dr. GRPO, Liu et al. 2025: the std division over-weights easy/hard prompts). A
    group whose rewards are all equal gets advantage 0 (no learning signal), not NaN; a group
    of one likewise gets 0.

    Args:
      rewards: [B * G] group-major or [B, G] sequence rewards.
      group_size: G, a static Python int.

    Returns:
      float32 advantages with the shape of ``rewards``.
    """
    grouped = _grouped(rewards, group_size)
    centered = grouped - jnp.mean(grouped, axis=-1, keepdims=True)
    if scale_by_std:
        denominator = max(group_size - 1, 1) if unbiased else group_size
        std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=-1, keepdims=True) / denominator)
        centered = centered / (std + eps)
    return centered.reshape(jnp.shape(rewards))


def rloo_advantages(rewards: Array, group_size: int) -> Array:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024) advantages.

    A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_group(r)): the baseline for a
    sample excludes the sample itself, so it is independent of that sample's action and the
    policy gradient stays unbiased. Needs G >= 2.

    Args:
      rewards: [B * G] group-major or [B, G] sequence rewards.
      group_size: G, a static Python int >= 2.

    Returns:
      float32 advantages with the shape of ``rewards``; each group sums to 0.
    """
    if group_size < 2:
        raise ValueError(f"RLOO needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    grouped = _grouped(rewards, group_size)
    others_mean = (jnp.sum(grouped, axis=-1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(jnp.shape(rewards))


def k3_kl(logp: Array, ref_logp: Array, mask: Array) -> Array:
    """Schulman's k3 estimator of KL(pi || ref), token mean over the mask (GRPO's KL term).

    Per token, with x = ref_logp - logp (log of ref/pi at the sampled token):
      k3 = exp(x) - x - 1 >= 0,
    unbiased for KL(pi || ref) under samples from pi (E_pi[ref/pi] = 1) and, unlike the plain
    log-ratio, never negative. Computed as ``expm1(x) - x`` so near-identical policies (x ~ 1e-4)
    do not lose the whole value to cancellation against 1. Off-mask positions are zeroed before
    the exp (garbage there would overflow); an empty mask gives 0.

    Args:
      logp: [B, T] policy log-probs of the sampled tokens (differentiable).
      ref_logp: [B, T] reference log-probs of the same tokens.
      mask: [B, T] bool/float.

    Returns:
      scalar float32.
    """
    weights = _as_weights(mask)
    log_ratio = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
    log_ratio = jnp.where(weights != 0, log_ratio, 0.0)
    return masked_mean(jnp.expm1(log_ratio) - log_ratio, weights)


def grpo_policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    ref_logprobs: Array,
    advantages: Array,
    mask: Array,
    clip_eps: Scalar = 0.2,
    kl_coef: Scalar = 0.04,
) -> tuple[Array, dict]:
    """GRPO policy loss: the clipped PPO surrogate on sequence advantages, plus a k3 KL term.

    loss = ppo_policy_loss(logprobs, old, A_b broadcast over b's tokens, mask, clip_eps)
           + kl_coef * k3_kl(logprobs, ref_logprobs, mask).
    The KL to the reference is a loss term (GRPO) instead of a per-token reward penalty
    (InstructGPT's ``per_token_rewards``), so the advantages stay pure outcome advantages.
    Both terms are token means over the whole batch (as ``ppo_policy_loss``; DAPO's
    "token-level" loss), not the paper's mean over each sequence's tokens and then over
    sequences, which weights a short response's tokens more than a long one's.

    Args:
      logprobs: [B, T] current policy log-probs (differentiable).
      old_logprobs: [B, T] rollout log-probs (constants).
      ref_logprobs: [B, T] reference log-probs (constants).
      advantages: [B] per-sequence advantages (``grpo_advantages`` / ``rloo_advantages``
        of the group-major rollout).
      mask: [B, T] bool/float, 1 on response tokens.
      clip_eps, kl_coef: Python floats or jnp scalars (DeepSeekMath: 0.2 and 0.04).

    Returns:
      (loss f32, ``ppo_policy_loss``'s metrics plus "policy_loss" (the clipped surrogate)
      and "kl" (the k3 token mean)).
    """
    weights = _as_weights(mask)
    advantages32 = jnp.asarray(advantages).astype(jnp.float32)
    per_token_advantages = jnp.broadcast_to(advantages32[..., None], jnp.shape(logprobs))
    policy_loss, metrics = ppo_policy_loss(logprobs, old_logprobs, per_token_advantages,
                                           weights, clip_eps)
    kl = k3_kl(logprobs, ref_logprobs, weights)
    loss = policy_loss + jnp.asarray(kl_coef, jnp.float32) * kl
    return loss, dict(metrics, policy_loss=policy_loss, kl=kl)
