"""Advantage estimators and policy losses, registered by name (``ppo.advantage``).

An estimator turns one rollout's scores, log-probs and values into per-token rewards,
advantages and returns; it names the policy loss its advantages are meant for. Both are pure
functions of arrays, float32 throughout:

* ``gae`` (InstructGPT): per-token reward -beta * (log pi - log pi_ref) plus the RM score at
  the last token, GAE over a value network's V(s_t); the clipped PPO loss.
* ``grpo`` (Shao et al. 2024): the score standardized within each prompt's G samples; the KL to
  the reference is a k3 term of the loss, weighted by ``ppo.kl_coef``.
* ``rloo`` (Ahmadian et al. 2024): score - beta * sum_t KL_t, minus the mean of the other
  G - 1 samples of the prompt; the same sequence-level loss with no KL term.

Group estimators need whole groups in a rollout: prompt b owns rows b*G .. b*G + G - 1.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import objectives as obj
from rlhf_jax.errors import ConfigError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Advantages:
    rewards: Array      # [B, N] per-token rewards
    kl: Array           # [B, N] log pi_old - log pi_ref
    advantages: Array   # [B, N] (gae) or [B] per sequence (group estimators)
    returns: Array      # [B, N] value targets (zeros without a value network)


@dataclasses.dataclass(frozen=True)
class Estimator:
    name: str
    needs_value: bool                  # runs and trains a value network
    kl_in_reward: bool                 # beta x KL is part of the reward (else of the loss, or none)
    policy_loss: str                   # a key of POLICY_LOSSES
    advantages: Callable[..., Advantages]
    grouped: bool = False              # G samples per prompt, judged against each other


def gae(scores, logprobs, ref_logprobs, values, mask, kl_coef, cfg) -> Advantages:
    rewards, kl = obj.per_token_rewards(logprobs, ref_logprobs, scores, mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = obj.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = obj.gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = obj.masked_whiten(advantages, mask)
    return Advantages(rewards, kl, advantages, returns)


def sequence_rewards(rewards: Array) -> Array:
    """[B, N] per-token rewards -> [B] float32 sequence rewards: the score, minus beta x the
    summed KL where it was folded in (rloo)."""
    return jnp.sum(rewards.astype(jnp.float32), axis=-1)


def _grouped(group_advantages: Callable[[Array, int], Array], kl_in_reward: bool):
    def estimate(scores, logprobs, ref_logprobs, values, mask, kl_coef, cfg) -> Advantages:
        beta = kl_coef if kl_in_reward else jnp.float32(0.0)
        rewards, kl = obj.per_token_rewards(logprobs, ref_logprobs, scores, mask, beta)
        advantages = group_advantages(sequence_rewards(rewards), cfg.group_size)
        return Advantages(rewards, kl, advantages, jnp.zeros_like(mask))
    return estimate


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator("gae", needs_value=True, kl_in_reward=True, policy_loss="clipped",
                     advantages=gae),
    "grpo": Estimator("grpo", needs_value=False, kl_in_reward=False, policy_loss="clipped_k3",
                      advantages=_grouped(obj.grpo_advantages, kl_in_reward=False), grouped=True),
    "rloo": Estimator("rloo", needs_value=False, kl_in_reward=True, policy_loss="clipped_k3",
                      advantages=_grouped(obj.rloo_advantages, kl_in_reward=True), grouped=True),
}


def estimator(p: Any) -> Estimator:
    """The estimator ``ppo.advantage`` names (a one-line ConfigError for any other)."""
    try:
        return ESTIMATORS[p.advantage]
    except KeyError:
        raise ConfigError(f"ppo.advantage={p.advantage!r}: expected one of "
                          + ", ".join(repr(k) for k in ESTIMATORS)) from None


# --- policy losses: (log-probs and entropy of the minibatch's tokens, the minibatch, cfg) ------

def clipped(out: dict[str, Array], mb: Any, cfg: Any) -> tuple[Array, dict]:
    """Clipped PPO on per-token advantages, minus the entropy bonus."""
    pg_loss, stats = obj.ppo_policy_loss(out["logprobs"], mb.old_logprobs, mb.advantages,
                                         mb.response_mask, cfg.clip_eps)
    entropy = obj.masked_mean(out["entropy"], mb.response_mask)
    loss = pg_loss - cfg.entropy_coef * entropy
    return loss, dict(stats, policy_loss=pg_loss, entropy=entropy)


def clipped_k3(out: dict[str, Array], mb: Any, cfg: Any) -> tuple[Array, dict]:
    """The clipped surrogate on per-sequence advantages, plus ``ppo.kl_coef`` x the k3 KL to the
    reference where the estimator keeps its KL out of the reward (grpo), minus the entropy bonus.

    ``policy_loss`` reports the clipped surrogate, ``k3_kl`` the KL estimate (also for rloo,
    where it only measures), ``loss`` the whole objective.
    """
    kl_coef = 0.0 if ESTIMATORS[cfg.advantage].kl_in_reward else cfg.kl_coef
    loss, stats = obj.grpo_policy_loss(out["logprobs"], mb.old_logprobs, mb.ref_logprobs,
                                       mb.advantages, mb.response_mask, cfg.clip_eps, kl_coef)
    entropy = obj.masked_mean(out["entropy"], mb.response_mask)
    loss = loss - cfg.entropy_coef * entropy
    stats = {("k3_kl" if k == "kl" else k): v for k, v in stats.items()}
    return loss, dict(stats, entropy=entropy, loss=loss)


POLICY_LOSSES: dict[str, Callable[..., tuple[Array, dict]]] = {
    "clipped": clipped, "clipped_k3": clipped_k3}


def check(p: Any) -> None:
    """The estimator's fields, in one-line ConfigErrors (``validate`` says the same before any
    model loads; this guards ``build`` called directly)."""
    est, g = estimator(p), p.group_size
    if g < 1 or p.rollout_batch_size % g:
        raise ConfigError(f"ppo.group_size={g}: expected a positive divisor of "
                          f"ppo.rollout_batch_size={p.rollout_batch_size} (whole groups per rollout)")
    if est.grouped and g < 2:
        raise ConfigError(f"ppo.group_size={g}: expected >= 2 with ppo.advantage={est.name!r} (the "
                          "other samples of a prompt are each sample's baseline)")
    if not est.kl_in_reward and p.kl_controller != "fixed":
        raise ConfigError(f"ppo.kl_controller={p.kl_controller!r}: expected 'fixed' with "
                          f"ppo.advantage={est.name!r} (its KL is a loss term weighted by "
                          "ppo.kl_coef)")
