"""The pure pieces of one PPO iteration: rollout, experience, and the minibatch updates.

Every function here is jitted by ``program.build`` with named shardings; each takes a role's
trainable tree and its frozen base, and ``Roles`` merges them (``roles.py``), so full
fine-tuning, LoRA and value LoRA run the same code.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import objectives as obj
from rlhf_jax import scoring
from rlhf_jax.optim import ema_update
from rlhf_jax.sampling import SamplingConfig, generate
from rlhf_jax.stages.ppo.estimators import ESTIMATORS, POLICY_LOSSES
from rlhf_jax.stages.ppo.roles import Frozen, Roles
from rlhf_jax.train_state import TrainState

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class Rollout:
    """Sampled episodes: prompt (left-padded) + response (right-padded), [B, P+N] / [B, N]."""
    sequences: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array
    has_eos: jax.Array        # [B] bool: the response ended with EOS (not cut at N tokens)
    logprobs: jax.Array | None = None   # [B, N] f32: the sampler's log-prob of each sampled
                                        # token under the distribution it sampled from


@flax.struct.dataclass
class Experience:
    """Everything the update needs, computed once per rollout; float32 except the token arrays."""
    sequences: jax.Array       # [B, P+N] int32
    attention_mask: jax.Array  # [B, P+N] int32
    response_mask: jax.Array   # [B, N]
    old_logprobs: jax.Array    # [B, N] log pi_old (sampling temperature), 0 off the mask
    ref_logprobs: jax.Array    # [B, N] log pi_ref
    old_values: jax.Array      # [B, N] V_old(s_t) (0 without a value network)
    rewards: jax.Array         # [B, N] -beta * KL_t (+ score at the last token)
    kl: jax.Array              # [B, N] log pi_old - log pi_ref
    scores: jax.Array          # [B] normalized RM score (or the missing-EOS penalty)
    advantages: jax.Array      # [B, N] GAE (whitened if configured); [B] per sequence for
                               #   grpo / rloo (group-major: prompt b owns rows b*G .. b*G+G-1)
    returns: jax.Array         # [B, N] advantages + values (before whitening); 0 for grpo/rloo
    sampler_gap: jax.Array     # [B, N] |log p_sampler - log p_trainer| of the sampled tokens
                               #   (the training-inference mismatch; 0 off the mask)


# --- 1. rollout --------------------------------------------------------------------------------

def sync_step(policy_params: Any, base: Any, *, roles: Roles, shardings: Any = None) -> Any:
    """The sampler's copy of the current policy: merged, cast to the sampler's dtype where the
    weights are (``shardings``: the training layout, so what moves is already bfloat16), then
    resharded into the sampler's layout by the step's output shardings, once per rollout."""
    weights = roles.sampler.weights(roles.policy.merge(policy_params, base))
    return weights if shardings is None else jax.lax.with_sharding_constraint(weights, shardings)


def rollout_step(sampler_params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                 rng: jax.Array, *, roles: Roles, sampling: SamplingConfig,
                 mesh: Mesh) -> Rollout:
    """Sample one response per prompt row from the sampler's copy, flag the responses that
    ended with EOS, keep the sampler's log-probs of the sampled tokens."""
    out = generate(roles.sampler.model, sampler_params, prompt_ids, prompt_mask, rng, sampling,
                   mesh=mesh)
    mask = out["response_mask"]
    if sampling.eos_token_id is None:
        has_eos = jnp.ones(mask.shape[:1], bool)
    else:
        has_eos = jnp.any((out["response_ids"] == sampling.eos_token_id) & (mask > 0), axis=-1)
    return Rollout(out["sequences"], out["attention_mask"], mask, has_eos,
                   out["sampling_logprobs"].astype(jnp.float32))


def decode_step(params: Any, tokens: jax.Array, slot_mask: jax.Array, cache: dict,
                cache_index: jax.Array, *, model: Any) -> tuple[jax.Array, dict]:
    """One token of the rollout's decode loop (compiled on its own to count the loop's FLOPs)."""
    logits, cache = model.apply({"params": params}, tokens, attention_mask=slot_mask, cache=cache,
                                cache_index=cache_index)
    return logits[:, 0].astype(jnp.float32), cache


# --- 2. experience -----------------------------------------------------------------------------

def make_experience(policy_params: Any, value_params: Any, frozen: Frozen, rollout: Rollout,
                    kl_coef: jax.Array, *, roles: Roles, prompt_len: int, cfg: Any) -> Experience:
    """Everything the update needs, computed once per rollout batch, without gradients, in f32:
    log-probs of the policy and the reference, values, RM scores, rewards and advantages."""
    seqs, attn = rollout.sequences, rollout.attention_mask
    mask = rollout.response_mask.astype(jnp.float32)
    logprobs_of = lambda params: scoring.response_logprobs(
        roles.policy.model, params, seqs, attn, prompt_len, temperature=cfg.temperature,
        chunk=cfg.logprob_chunk)["logprobs"]
    logprobs = logprobs_of(roles.policy_params(policy_params, frozen))
    ref_logprobs = logprobs_of(roles.reference.base(frozen))
    values = roles.values(value_params, frozen, seqs, attn, prompt_len, mask)
    scores = final_scores(roles, frozen, rollout, cfg)
    adv = ESTIMATORS[cfg.advantage].advantages(scores, logprobs, ref_logprobs, values, mask,
                                               kl_coef, cfg)
    gap = (jnp.zeros_like(mask) if rollout.logprobs is None
           else jnp.abs(rollout.logprobs - logprobs) * mask)
    return Experience(sequences=seqs, attention_mask=attn, response_mask=mask,
                      old_logprobs=logprobs * mask, ref_logprobs=ref_logprobs * mask,
                      old_values=values, rewards=adv.rewards, kl=adv.kl, scores=scores,
                      advantages=adv.advantages, returns=adv.returns, sampler_gap=gap)


def final_scores(roles: Roles, frozen: Frozen, rollout: Rollout, cfg: Any) -> jax.Array:
    """[B] normalized RM score of each episode (or the missing-EOS penalty)."""
    scores = scoring.rm_scores(roles.reward.model, roles.reward.base(frozen), frozen.reward_norm,
                               rollout.sequences, rollout.attention_mask)
    if cfg.missing_eos_penalty is not None:
        # A response cut at max_new_tokens without EOS gets a fixed low score instead.
        scores = jnp.where(rollout.has_eos, scores, jnp.float32(cfg.missing_eos_penalty))
    return scores


# --- 3. update ---------------------------------------------------------------------------------

def policy_objective(params: Any, roles: Roles, mb: Experience, *, prompt_len: int,
                     cfg: Any) -> tuple[jax.Array, dict]:
    """The estimator's policy loss (clipped PPO, minus the entropy bonus) on one minibatch;
    ``params`` are the policy's whole weights."""
    out = scoring.response_logprobs(roles.policy.model, params, mb.sequences, mb.attention_mask,
                                    prompt_len, temperature=cfg.temperature,
                                    chunk=cfg.logprob_chunk, entropy=True)
    return POLICY_LOSSES[ESTIMATORS[cfg.advantage].policy_loss](out, mb, cfg)


def ptx_objective(params: Any, roles: Roles, ptx: Batch, chunk: int = 0) -> jax.Array:
    """Pretraining term: token-mean NLL (= -E[log pi(x)]) of a pretraining minibatch."""
    return scoring.sequence_nll(roles.policy.model, params, ptx, chunk=chunk)[0]


def policy_gradient(trainable: Any, base: Any, roles: Roles, mb: Experience, ptx: Batch | None,
                    *, prompt_len: int, cfg: Any) -> tuple[Any, dict]:
    """grad(policy loss + gamma_ptx * ptx NLL) with respect to the policy's trainable tree: one
    gradient for one optimizer step.

    One backward pass over the summed objective, so only one parameter-sized gradient tree
    exists (at 8B parameters a second one is 32 GB); gamma_ptx = 0 skips the ptx pass entirely.
    """
    use_ptx = ptx is not None and cfg.ptx_coef > 0

    def objective(t):
        params = roles.policy.merge(t, base)
        loss, stats = policy_objective(params, roles, mb, prompt_len=prompt_len, cfg=cfg)
        if use_ptx:
            ptx_loss = ptx_objective(params, roles, ptx, cfg.logprob_chunk)
            loss, stats = loss + cfg.ptx_coef * ptx_loss, dict(stats, ptx_loss=ptx_loss)
        return loss, stats

    (_, stats), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
    return grads, stats


def value_objective(params: Any, roles: Roles, mb: Experience, *, prompt_len: int,
                    cfg: Any) -> tuple[jax.Array, dict]:
    """Clipped value loss; ``params`` are the value network's whole weights."""
    values = scoring.response_values(roles.value.model, params, mb.sequences, mb.attention_mask,
                                     prompt_len)
    loss, stats = obj.value_loss(values, mb.old_values, mb.returns, mb.response_mask,
                                 cfg.value_clip if cfg.value_clip > 0 else None)
    stats = dict(stats, explained_variance=obj.explained_variance(
        values, mb.returns, mb.response_mask))
    return loss, stats


def policy_update_step(policy: TrainState, ema_params: Any, experience: Experience,
                       indices: jax.Array, ptx: Batch | None, base: Any, *, roles: Roles,
                       policy_opt: optax.GradientTransformation, prompt_len: int, cfg: Any):
    """One minibatch update of the policy: PPO + gamma_ptx x ptx in one gradient, then the EMA
    (of the trainable tree)."""
    mb = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), experience)
    grads, stats = policy_gradient(policy.params, base, roles, mb, ptx, prompt_len=prompt_len,
                                   cfg=cfg)
    updates, opt_state = policy_opt.update(grads, policy.opt_state, policy.params)
    policy = TrainState(policy.step + 1, optax.apply_updates(policy.params, updates), opt_state)
    if cfg.ema_decay > 0:
        ema_params = ema_update(ema_params, policy.params, cfg.ema_decay)
    return policy, ema_params, dict(stats, policy_grad_norm=optax.global_norm(grads))


def value_update_step(value: TrainState, experience: Experience, indices: jax.Array, base: Any,
                      *, roles: Roles, value_opt: optax.GradientTransformation, prompt_len: int,
                      cfg: Any):
    """One minibatch update of the value network's trainable tree (clipped value loss)."""
    mb = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), experience)
    objective = lambda t: value_objective(roles.value.merge(t, base), roles, mb,
                                          prompt_len=prompt_len, cfg=cfg)
    (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(value.params)
    updates, opt_state = value_opt.update(grads, value.opt_state, value.params)
    value = TrainState(value.step + 1, optax.apply_updates(value.params, updates), opt_state)
    return value, dict(stats, value_loss=loss, value_grad_norm=optax.global_norm(grads))


def ptx_gradient(trainable: Any, ptx: Batch, base: Any, *, roles: Roles,
                 chunk: int) -> tuple[jax.Array, Any]:
    """The ptx pass alone (its share of the update, for profiling)."""
    return jax.value_and_grad(
        lambda t: ptx_objective(roles.policy.merge(t, base), roles, ptx, chunk))(trainable)
