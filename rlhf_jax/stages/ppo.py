"""Stage 3: PPO and PPO-ptx (InstructGPT Eq. 2).

Networks: the policy starts from the (PPO-init) SFT model; a frozen copy of it is the KL
reference; the reward model is frozen and scores with its demonstration normalization; the value
network is a separate copy of the reward model, trained.

One iteration, as the loop below reads:
  1. rollout     sample responses for a batch of prompts (jitted KV-cache sampler)
  2. experience  one jitted, gradient-free pass, float32 throughout: policy and reference
                 log-probs, values, RM scores, per-token rewards -beta*(log pi - log pi_ref) plus
                 the score at the last token, GAE advantages and returns
  3. update      ppo_epochs x minibatches jitted steps over that frozen experience; each policy
                 step sums the clipped-PPO gradient and gamma_ptx x the pretraining-NLL gradient
                 into ONE optimizer update (one backward pass over the summed objective); the
                 value network takes its own steps (a second program, on a second core on CPU)
  4. log / KL controller / checkpoint

``ppo.advantage`` picks the advantage estimator. ``"gae"`` (the default, InstructGPT's): a value
network, per-token KL rewards and GAE. ``"grpo"`` / ``"rloo"``: no value network at all (none is
loaded, run or trained); the rollout samples ``ppo.group_size`` (G) responses for each of
rollout_batch_size / G prompts, and each response's sequence reward (the RM score) is judged
against its own group: GRPO (Shao et al. 2024) standardizes it within the group and puts the
KL to the reference into the loss as a k3 term (``kl_coef``), RLOO (Ahmadian et al. 2024)
folds the per-token KL into the sequence reward and subtracts the mean of the other G - 1. The
clipped policy loss and the ptx term are one update in every case.

``build(cfg, mesh)`` makes those jitted steps (and the abstract state they take) from shapes
alone, so ``rlhf-jax compile`` and ``rlhf-jax profile`` use exactly what ``train`` runs. Memory
plan for pod-size models: the reference and RM can be held in bfloat16 (``ppo.frozen_dtype``), the
LM head only runs over response positions and, with ``ppo.logprob_chunk``, a block of positions at
a time (``scoring.py``), and ``model_runtime.remat`` recomputes each layer in the backward pass.

LoRA (``ppo.lora.rank`` > 0, ``models/lora.py``): the policy's trainable state (``state.policy``,
its optimizer state, the EMA, the checkpoints) is only the adapters, replicated on every device
(they are tiny). The base weights are frozen: they are ``frozen.reference`` (the KL reference
is the base with the adapters off, so no second copy exists; held in the policy's own dtype,
``ppo.frozen_dtype`` then only applies to the RM), passed to the rollout and update steps as a
last, non-donated argument, and every policy forward runs on ``apply_lora(base, adapters)``.
At the end ``model/`` (and ``model_ema/``) is the merged policy, base + scale * A @ B, in the
usual format; ``lora/`` holds the adapters alone (``adapters/`` + ``lora.json``).

Value LoRA (``ppo.value_lora.rank`` > 0, GAE only): the value network starts from the RM, so
its frozen base IS ``frozen.reward`` (the same arrays, no copy); ``state.value`` trains
``{"adapters", "score_head"}`` (the scalar head in full: it is [D, 1] and, with the RM's
normalization folded in, starts on the returns' scale). The value steps take ``frozen.reward``
as a last, non-donated argument.

    rlhf-jax ppo --config experiments/tiny_ppo.py --workdir runs/ppo
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import objectives as obj
from rlhf_jax import scoring
from rlhf_jax.convert import save_our_checkpoint
from rlhf_jax.data import BatchIterator, tokenize_pretrain, tokenize_prompts
from rlhf_jax.data.sources import read_source
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import MetricsWriter, ProgressBar, StepTimer
from rlhf_jax.models.lora import LoRA, apply_lora, init_lora, lora_param_count
from rlhf_jax.models.params import abstract_params, cache_sharding, init_params
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.optim import current_lr, ema_update, make_lr_schedule, make_optimizer
from rlhf_jax.program import Program, Step, abstract_batch, abstract_key, abstract_like, random_batch
from rlhf_jax.sampling import SamplingConfig, generate
from rlhf_jax.sharding import (as_auto_mesh, batch_sharding, check_batch_size, replicated,
                               shard_batch)
from rlhf_jax.stages import common
from rlhf_jax.train_state import TrainState, abstract_train_state, batch_shardings, shardings_of

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class PPOState:
    """What the update trains: policy and value with their optimizer states, and the policy EMA."""
    policy: TrainState
    value: TrainState
    ema_params: Any          # EMA of the policy weights ({} when disabled)


@flax.struct.dataclass
class Frozen:
    """The networks PPO does not train: the KL reference (the initial policy) and the RM, with
    the RM's demonstration normalization as ``[mean, std]`` (an argument, so another RM does not
    recompile). Held in ``ppo.frozen_dtype`` (bfloat16 halves their memory)."""
    reference: Any
    reward: Any
    reward_norm: jax.Array


@flax.struct.dataclass
class Rollout:
    """Sampled episodes: prompt (left-padded) + response (right-padded), [B, P+N] / [B, N]."""
    sequences: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array
    has_eos: jax.Array        # [B] bool: the response ended with EOS (not cut at N tokens)


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


@flax.struct.dataclass
class Models:
    """The networks' definitions (static: closed over by the jitted steps). The reference uses
    the policy's definition with the frozen params' dtype."""
    policy: Transformer = flax.struct.field(pytree_node=False)
    value: Transformer | None = flax.struct.field(pytree_node=False)   # None for grpo / rloo
    reward: Transformer = flax.struct.field(pytree_node=False)


GROUP_ADVANTAGES = ("grpo", "rloo")


def advantage_kind(cfg: Any) -> str:
    """``ppo.advantage`` ("gae" for configs from before it existed)."""
    return cfg.get("advantage", "gae")


def uses_value_network(cfg: Any) -> bool:
    """Only GAE needs V(s_t); the group estimators take their baseline from the group."""
    return advantage_kind(cfg) not in GROUP_ADVANTAGES


def _section_rank(cfg: Any, section: str) -> int:
    lora = cfg.get(section)
    return int(lora.get("rank", 0) or 0) if lora is not None else 0


def lora_rank(cfg: Any) -> int:
    """``ppo.lora.rank`` (0, LoRA off, for configs without the field)."""
    return _section_rank(cfg, "lora")


def value_lora_rank(cfg: Any) -> int:
    """``ppo.value_lora.rank`` (0 when off, for configs without it, and for grpo / rloo)."""
    return _section_rank(cfg, "value_lora") if uses_value_network(cfg) else 0


def section_lora(params: Any, rng: jax.Array, p: Any, section: str) -> LoRA:
    """Fresh adapters on ``params`` as ``ppo.<section>`` (lora / value_lora) configures them;
    ``params`` may be ShapeDtypeStructs (``build``'s abstract state)."""
    c = p[section]
    return init_lora(params, rng, _section_rank(p, section), c.alpha, tuple(c.targets))


def lora_merge(base: Any, scale: float, shardings: Any = None):
    """adapters -> the policy's parameters ``apply_lora(base, adapters)`` (``shardings``: the
    base's, so each A @ B is formed in its kernel's sharding)."""
    return lambda adapters: apply_lora(base, LoRA(adapters, scale), shardings=shardings)


def value_lora_merge(base: Any, scale: float, shardings: Any = None):
    """``{"adapters", "score_head"}`` -> the value network's parameters: the frozen RM's trunk
    with the adapters merged in, and the trained head."""
    return lambda trainable: {**apply_lora(base, LoRA(trainable["adapters"], scale),
                                           shardings=shardings),
                              "score_head": trainable["score_head"]}


# --- pure pieces -------------------------------------------------------------------------------

def make_experience(models: Models, policy_params: Any, value_params: Any, frozen: Frozen,
                    rollout: Rollout, kl_coef: jax.Array, *, prompt_len: int, cfg: Any,
                    value_lora_scale: float = 0.0, value_lora_shardings: Any = None) -> Experience:
    """Everything the update needs, computed once per rollout batch, without gradients, in f32.

    ``value_lora_scale`` > 0: ``value_params`` are the value LoRA's trainables on ``frozen.reward``."""
    if value_lora_scale:
        value_params = value_lora_merge(frozen.reward, value_lora_scale,
                                        value_lora_shardings)(value_params)
    seqs, attn = rollout.sequences, rollout.attention_mask
    mask = rollout.response_mask.astype(jnp.float32)
    logprobs_of = lambda params: scoring.response_logprobs(
        models.policy, params, seqs, attn, prompt_len, temperature=cfg.temperature,
        chunk=cfg.logprob_chunk)["logprobs"]
    logprobs, ref_logprobs = logprobs_of(policy_params), logprobs_of(frozen.reference)
    if not uses_value_network(cfg):
        return group_experience(models, frozen, rollout, logprobs, ref_logprobs, kl_coef,
                                cfg=cfg)
    values = scoring.response_values(models.value, value_params, seqs, attn, prompt_len) * mask
    scores = final_scores(models, frozen, rollout, cfg)
    rewards, kl = obj.per_token_rewards(logprobs, ref_logprobs, scores, mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = obj.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = obj.gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = obj.masked_whiten(advantages, mask)
    return Experience(sequences=seqs, attention_mask=attn, response_mask=mask,
                      old_logprobs=logprobs * mask, ref_logprobs=ref_logprobs * mask,
                      old_values=values, rewards=rewards, kl=kl, scores=scores,
                      advantages=advantages, returns=returns)


def final_scores(models: Models, frozen: Frozen, rollout: Rollout, cfg: Any) -> jax.Array:
    """[B] normalized RM score of each episode (or the missing-EOS penalty)."""
    scores = scoring.rm_scores(models.reward, frozen.reward, frozen.reward_norm,
                               rollout.sequences, rollout.attention_mask)
    if cfg.missing_eos_penalty is not None:
        # A response cut at max_new_tokens without EOS gets a fixed low score instead.
        scores = jnp.where(rollout.has_eos, scores, jnp.float32(cfg.missing_eos_penalty))
    return scores


def sequence_rewards(rewards: jax.Array) -> jax.Array:
    """[B, N] per-token rewards -> [B] float32 sequence rewards: the score, minus beta x the
    summed KL where it was folded in (rloo)."""
    return jnp.sum(rewards.astype(jnp.float32), axis=-1)


def group_experience(models: Models, frozen: Frozen, rollout: Rollout, logprobs: jax.Array,
                     ref_logprobs: jax.Array, kl_coef: jax.Array, *, cfg: Any) -> Experience:
    """GRPO / RLOO experience: one sequence reward per episode, its advantage against the other
    G - 1 samples of the same prompt; no values, so no value network runs.

    GRPO's reward is the score alone (its KL to the reference is a loss term, see
    ``ppo_objective``); RLOO's is score - beta x sum_t KL_t (the per-token KL folded in, as
    Ahmadian et al. do), with ``kl_coef`` the current beta.
    """
    mask = rollout.response_mask.astype(jnp.float32)
    scores = final_scores(models, frozen, rollout, cfg)
    beta = kl_coef if advantage_kind(cfg) == "rloo" else jnp.float32(0.0)
    rewards, kl = obj.per_token_rewards(logprobs, ref_logprobs, scores, mask, beta)
    totals = sequence_rewards(rewards)
    if advantage_kind(cfg) == "grpo":
        advantages = obj.grpo_advantages(totals, cfg.group_size)
    else:
        advantages = obj.rloo_advantages(totals, cfg.group_size)
    zeros = jnp.zeros_like(mask)
    return Experience(sequences=rollout.sequences, attention_mask=rollout.attention_mask,
                      response_mask=mask, old_logprobs=logprobs * mask,
                      ref_logprobs=ref_logprobs * mask, old_values=zeros, rewards=rewards, kl=kl,
                      scores=scores, advantages=advantages, returns=zeros)


def ppo_objective(params: Any, models: Models, mb: Experience, *, prompt_len: int,
                  cfg: Any) -> tuple[jax.Array, dict]:
    """Clipped PPO policy loss minus the entropy bonus, on one minibatch of experience."""
    out = scoring.response_logprobs(models.policy, params, mb.sequences, mb.attention_mask,
                                    prompt_len, temperature=cfg.temperature,
                                    chunk=cfg.logprob_chunk, entropy=True)
    if not uses_value_network(cfg):
        return group_objective(out, mb, cfg)
    pg_loss, stats = obj.ppo_policy_loss(out["logprobs"], mb.old_logprobs, mb.advantages,
                                         mb.response_mask, cfg.clip_eps)
    entropy = obj.masked_mean(out["entropy"], mb.response_mask)
    loss = pg_loss - cfg.entropy_coef * entropy
    return loss, dict(stats, policy_loss=pg_loss, entropy=entropy)


def group_objective(out: dict[str, jax.Array], mb: Experience, cfg: Any) -> tuple[jax.Array, dict]:
    """GRPO / RLOO policy loss on per-sequence advantages: the clipped surrogate, plus (GRPO
    only) ``ppo.kl_coef`` x the k3 KL to the reference, minus the entropy bonus.

    ``policy_loss`` reports the clipped surrogate, ``k3_kl`` the KL estimate (also for RLOO,
    where it only measures: its KL is in the reward), ``loss`` the whole objective.
    """
    kl_coef = cfg.kl_coef if advantage_kind(cfg) == "grpo" else 0.0
    loss, stats = obj.grpo_policy_loss(out["logprobs"], mb.old_logprobs, mb.ref_logprobs,
                                       mb.advantages, mb.response_mask, cfg.clip_eps, kl_coef)
    entropy = obj.masked_mean(out["entropy"], mb.response_mask)
    loss = loss - cfg.entropy_coef * entropy
    stats = {("k3_kl" if k == "kl" else k): v for k, v in stats.items()}
    return loss, dict(stats, entropy=entropy, loss=loss)


def ptx_objective(params: Any, models: Models, ptx: Batch, chunk: int = 0) -> jax.Array:
    """Pretraining term: token-mean NLL (= -E[log pi(x)]) of a pretraining minibatch."""
    return scoring.sequence_nll(models.policy, params, ptx, chunk=chunk)[0]


def policy_gradient(params: Any, models: Models, mb: Experience, ptx: Batch | None, *,
                    prompt_len: int, cfg: Any, merge: Any = None) -> tuple[Any, dict]:
    """grad(PPO loss + gamma_ptx * ptx NLL): one gradient for one optimizer step.

    One backward pass over the summed objective, so only one parameter-sized gradient tree
    exists (at 8B parameters a second one is 32 GB); gamma_ptx = 0 skips the ptx pass entirely.
    ``merge`` (LoRA): ``params`` are adapters and ``merge(params)`` the policy's weights; the
    gradient is the adapters'.
    """
    use_ptx = ptx is not None and cfg.ptx_coef > 0

    def objective(p):
        if merge is not None:
            p = merge(p)
        loss, stats = ppo_objective(p, models, mb, prompt_len=prompt_len, cfg=cfg)
        if use_ptx:
            ptx_loss = ptx_objective(p, models, ptx, cfg.logprob_chunk)
            loss, stats = loss + cfg.ptx_coef * ptx_loss, dict(stats, ptx_loss=ptx_loss)
        return loss, stats

    (_, stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, stats


def value_objective(params: Any, models: Models, mb: Experience, *, prompt_len: int,
                    cfg: Any) -> tuple[jax.Array, dict]:
    values = scoring.response_values(models.value, params, mb.sequences, mb.attention_mask,
                                     prompt_len)
    loss, stats = obj.value_loss(values, mb.old_values, mb.returns, mb.response_mask,
                                 cfg.value_clip if cfg.value_clip > 0 else None)
    stats = dict(stats, explained_variance=obj.explained_variance(
        values, mb.returns, mb.response_mask))
    return loss, stats


def policy_update_step(policy: TrainState, ema_params: Any, experience: Experience,
                       indices: jax.Array, ptx: Batch | None, base: Any = None, *, models: Models,
                       policy_opt: optax.GradientTransformation, prompt_len: int, cfg: Any,
                       lora_scale: float = 1.0, lora_shardings: Any = None):
    """One minibatch update of the policy: PPO + gamma_ptx x ptx in one gradient, then the EMA.

    With LoRA, ``policy.params`` (and the EMA) are the adapters and ``base`` the frozen weights."""
    mb = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), experience)
    merge = None if base is None else lora_merge(base, lora_scale, lora_shardings)
    grads, stats = policy_gradient(policy.params, models, mb, ptx, prompt_len=prompt_len, cfg=cfg,
                                   merge=merge)
    updates, opt_state = policy_opt.update(grads, policy.opt_state, policy.params)
    policy = TrainState(policy.step + 1, optax.apply_updates(policy.params, updates), opt_state)
    if cfg.ema_decay > 0:
        ema_params = ema_update(ema_params, policy.params, cfg.ema_decay)
    return policy, ema_params, dict(stats, policy_grad_norm=optax.global_norm(grads))


def value_update_step(value: TrainState, experience: Experience, indices: jax.Array,
                      base: Any = None, *, models: Models, value_opt: optax.GradientTransformation,
                      prompt_len: int, cfg: Any, lora_scale: float = 1.0,
                      lora_shardings: Any = None):
    """One minibatch update of the value network (clipped value loss).

    With value LoRA, ``value.params`` are ``{"adapters", "score_head"}`` and ``base`` the frozen RM."""
    mb = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), experience)
    objective = functools.partial(value_objective, models=models, mb=mb, prompt_len=prompt_len,
                                  cfg=cfg)
    if base is not None:
        merge = value_lora_merge(base, lora_scale, lora_shardings)
        objective = lambda trainable, f=objective: f(merge(trainable))
    (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(value.params)
    updates, opt_state = value_opt.update(grads, value.opt_state, value.params)
    value = TrainState(value.step + 1, optax.apply_updates(value.params, updates), opt_state)
    return value, dict(stats, value_loss=loss, value_grad_norm=optax.global_norm(grads))


def update_step(state: PPOState, experience: Experience, indices: jax.Array, ptx: Batch | None, *,
                models: Models, policy_opt: optax.GradientTransformation,
                value_opt: optax.GradientTransformation, prompt_len: int, cfg: Any):
    """Both halves of one minibatch update. ``train`` runs them as two programs (``update`` and
    ``value_update``): neither reads what the other writes, so on a CPU they run side by side."""
    policy, ema, pstats = policy_update_step(state.policy, state.ema_params, experience, indices,
                                             ptx, models=models, policy_opt=policy_opt,
                                             prompt_len=prompt_len, cfg=cfg)
    value, vstats = value_update_step(state.value, experience, indices, models=models,
                                      value_opt=value_opt, prompt_len=prompt_len, cfg=cfg)
    return PPOState(policy, value, ema), pstats | vstats


def rollout_step(params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
                 model: Transformer, sampling: SamplingConfig, mesh: Mesh) -> Rollout:
    """Sample one response per prompt and flag the responses that ended with EOS."""
    out = generate(model, params, prompt_ids, prompt_mask, rng, sampling, mesh=mesh)
    mask = out["response_mask"]
    if sampling.eos_token_id is None:
        has_eos = jnp.ones(mask.shape[:1], bool)
    else:
        has_eos = jnp.any((out["response_ids"] == sampling.eos_token_id) & (mask > 0), axis=-1)
    return Rollout(out["sequences"], out["attention_mask"], mask, has_eos)


def lora_rollout_step(adapters: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
                      rng: jax.Array, base: Any, *, scale: float, shardings: Any = None,
                      **kwargs) -> Rollout:
    """``rollout_step`` of the LoRA policy (adapters merged into the frozen base)."""
    return rollout_step(lora_merge(base, scale, shardings)(adapters), prompt_ids, prompt_mask,
                        rng, **kwargs)


def lora_make_experience(models: Models, adapters: Any, value_params: Any, frozen: Frozen,
                         rollout: Rollout, kl_coef: jax.Array, *, scale: float,
                         shardings: Any = None, **kwargs) -> Experience:
    """``make_experience`` of the LoRA policy: its base is ``frozen.reference`` (adapters off)."""
    return make_experience(models, lora_merge(frozen.reference, scale, shardings)(adapters),
                           value_params, frozen, rollout, kl_coef, **kwargs)


def lora_ptx_gradient(adapters: Any, ptx: Batch, base: Any, *, models: Models, chunk: int,
                      scale: float, shardings: Any = None) -> tuple[jax.Array, Any]:
    """``ptx_gradient`` with respect to the adapters."""
    merge = lora_merge(base, scale, shardings)
    return jax.value_and_grad(lambda a: ptx_objective(merge(a), models, ptx, chunk))(adapters)


def decode_step(params: Any, tokens: jax.Array, slot_mask: jax.Array, cache: dict,
                cache_index: jax.Array, *, model: Transformer) -> tuple[jax.Array, dict]:
    """One token of the rollout's decode loop (compiled on its own to count the loop's FLOPs)."""
    logits, cache = model.apply({"params": params}, tokens, attention_mask=slot_mask, cache=cache,
                                cache_index=cache_index)
    return logits[:, 0].astype(jnp.float32), cache


def ptx_gradient(params: Any, ptx: Batch, *, models: Models, chunk: int) -> tuple[jax.Array, Any]:
    """The ptx pass alone (its share of the update, for profiling)."""
    return jax.value_and_grad(ptx_objective)(params, models, ptx, chunk)


# --- the compiled steps, without weights or data ------------------------------------------------

def build(cfg: Any, mesh: Mesh, *, models: Models | None = None, eos_token_id: int | None = None,
          pad_token_id: int | None = None, model_overrides: dict | None = None) -> Program:
    """PPO's rollout, experience, update and ptx steps for ``cfg`` on ``mesh``, from shapes alone.

    Architectures come from ``models`` (loaded checkpoints'), else ``cfg.policy_model`` /
    ``reward_model`` / ``value_model`` or the configs stored in ``policy_from`` / ``reward_from``
    / ``value_from``. Token ids default to the policy config's. With ``ppo.advantage`` grpo /
    rloo there is no value network: no value state, no ``value_update`` step.
    """
    mesh = as_auto_mesh(mesh)
    p = cfg.ppo
    check_advantage_config(p)
    with_value = uses_value_network(p)
    overrides = {**common.runtime_overrides(cfg), **(model_overrides or {})}
    given = models or Models(None, None, None)
    policy = common.stage_model(given.policy, cfg.get("policy_model"), cfg.get("policy_from", ""),
                                mesh, overrides)
    reward = common.stage_model(given.reward, cfg.get("reward_model"), cfg.get("reward_from", ""),
                                mesh, dict(overrides, head="scalar"))
    value = common.stage_model(
        given.value, cfg.get("value_model") or cfg.get("reward_model"),
        cfg.get("value_from") or cfg.get("reward_from", ""), mesh,
        dict(overrides, head="scalar")) if with_value else None
    models = Models(policy, value, reward)
    if p.rollout_batch_size % p.minibatch_size:
        raise ValueError(f"ppo.rollout_batch_size={p.rollout_batch_size} must be a multiple of "
                         f"ppo.minibatch_size={p.minibatch_size}")
    check_batch_size("ppo.rollout_batch_size", p.rollout_batch_size, mesh)
    ptx_rows = p.ptx_per_episode * p.minibatch_size
    if p.ptx_coef > 0:
        check_batch_size("ppo.ptx_per_episode x ppo.minibatch_size", ptx_rows, mesh)

    # Optimizers: policy lr constant after warmup from 0.1x (paper); value lr fixed.
    n_iterations = p.iterations or math.ceil(p.total_episodes / p.rollout_batch_size)
    updates_per_iteration = p.epochs * (p.rollout_batch_size // p.minibatch_size)
    policy_schedule = make_lr_schedule(p.lr, n_iterations * updates_per_iteration,
                                       warmup_steps=p.warmup_iterations * updates_per_iteration,
                                       decay="constant", warmup_start_fraction=0.1)
    clip = p.grad_clip_norm or None
    policy_opt = make_optimizer(policy_schedule, b1=p.b1, b2=p.b2, grad_clip_norm=clip)
    value_opt = make_optimizer(p.value_lr, b1=p.b1, b2=p.b2, grad_clip_norm=clip)

    # State and frozen networks, abstract, in the shardings the rules table gives. With LoRA
    # the policy state is the adapters (replicated: rank x (in + out) per kernel is tiny) and
    # the reference (= the frozen base) keeps the policy's dtype.
    rank, vrank = lora_rank(p), value_lora_rank(p)
    rep = replicated(mesh)
    lora_scale, value_lora_scale = 1.0, 0.0
    if rank:
        lora_shape = jax.eval_shape(
            lambda k: section_lora(abstract_params(policy, mesh), k, p, "lora"), abstract_key(rep))
        lora_scale = lora_shape.scale
        policy_state = replicated_train_state(lora_shape.adapters, policy_opt, rep)
    else:
        policy_state = abstract_train_state(policy, policy_opt, mesh)
    if vrank:
        check_value_lora(cfg, value, reward)
        value_shapes = abstract_params(value, mesh)
        value_lora_shape = jax.eval_shape(
            lambda k: section_lora(value_shapes, k, p, "value_lora"), abstract_key(rep))
        value_lora_scale = value_lora_shape.scale
        value_state = replicated_train_state({"adapters": value_lora_shape.adapters,
                                              "score_head": value_shapes["score_head"]},
                                             value_opt, rep)
    else:
        value_state = abstract_train_state(value, value_opt, mesh) if with_value else {}
    state = PPOState(policy_state, value_state, policy_state.params if p.ema_decay > 0 else {})
    value_params = state.value.params if with_value else {}
    frozen_dtype = jnp.dtype(p.frozen_dtype)
    as_frozen = lambda m: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, frozen_dtype if jnp.issubdtype(a.dtype, jnp.floating)
                                       else a.dtype, sharding=a.sharding), abstract_params(m, mesh))
    frozen = Frozen(abstract_params(policy, mesh) if rank else as_frozen(policy), as_frozen(reward),
                    jax.ShapeDtypeStruct((2,), jnp.float32, sharding=rep))
    # The LoRA bases' shardings: each A @ B is formed in its kernel's sharding, not replicated.
    base_shardings = shardings_of(frozen.reference) if rank else None
    value_base_shardings = shardings_of(frozen.reward) if vrank else None

    # Batch shapes.
    b, mb_size = p.rollout_batch_size, p.minibatch_size
    prompt_len, n_new = cfg.data.max_prompt_len, cfg.data.max_response_len
    t = prompt_len + n_new
    shard = functools.partial(batch_sharding, mesh)
    prompts = abstract_batch({"input_ids": ((b, prompt_len), jnp.int32),
                              "attention_mask": ((b, prompt_len), jnp.int32)}, shard)
    rollout = Rollout(*(jax.ShapeDtypeStruct(shape, dtype, sharding=shard(len(shape))) for shape, dtype in
                        (((b, t), jnp.int32), ((b, t), jnp.int32), ((b, n_new), jnp.int32),
                         ((b,), jnp.bool_))))
    value_kw = ({"value_lora_scale": value_lora_scale,
                 "value_lora_shardings": value_base_shardings} if vrank else {})
    experience_step = (functools.partial(lora_make_experience, models, scale=lora_scale,
                                         shardings=base_shardings, prompt_len=prompt_len, cfg=p,
                                         **value_kw) if rank else
                       functools.partial(make_experience, models, prompt_len=prompt_len, cfg=p,
                                         **value_kw))
    experience = jax.eval_shape(experience_step, state.policy.params, value_params, frozen,
                                rollout, jnp.float32(0))
    experience = abstract_like(experience, batch_shardings(experience, mesh))
    ptx = (abstract_batch({k: ((ptx_rows, cfg.data.ptx_seq_len),
                               jnp.float32 if k == "loss_mask" else jnp.int32)
                           for k in PTX_KEYS}, shard) if p.ptx_coef > 0 else None)
    indices = jax.ShapeDtypeStruct((mb_size,), jnp.int32, sharding=rep)
    key = abstract_key(rep)

    # The jitted steps, every input and output sharding named.
    sampling = SamplingConfig(
        max_new_tokens=n_new, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
        greedy=False, eos_token_id=policy.config.eos_token_id if eos_token_id is None else eos_token_id,
        pad_token_id=policy.config.pad_token_id if pad_token_id is None else pad_token_id)
    state_sh, frozen_sh = shardings_of(state), shardings_of(frozen)
    p_sh, v_sh = state_sh.policy.params, shardings_of(value_params)
    # LoRA: the rollout, update (and ptx) steps take the frozen base as a last argument,
    # never donated; without LoRA they take exactly the arguments they always did.
    base_sh, base_arg = ((frozen_sh.reference,), (frozen.reference,)) if rank else ((), ())
    rollout_fn = jax.jit(
        functools.partial(lora_rollout_step, scale=lora_scale, shardings=base_shardings,
                          model=policy, sampling=sampling, mesh=mesh) if rank else
        functools.partial(rollout_step, model=policy, sampling=sampling, mesh=mesh),
        in_shardings=(p_sh, shard(2), shard(2), rep, *base_sh),
        out_shardings=shardings_of(rollout))
    experience_fn = jax.jit(experience_step,
                            in_shardings=(p_sh, v_sh, frozen_sh, shardings_of(rollout), rep),
                            out_shardings=shardings_of(experience))
    update_fn = jax.jit(
        functools.partial(policy_update_step, models=models, policy_opt=policy_opt,
                          prompt_len=prompt_len, cfg=p,
                          **({"lora_scale": lora_scale, "lora_shardings": base_shardings}
                             if rank else {})),
        in_shardings=(state_sh.policy, state_sh.ema_params, shardings_of(experience), rep,
                      None if ptx is None else shardings_of(ptx), *base_sh),
        out_shardings=(state_sh.policy, state_sh.ema_params, rep), donate_argnums=(0, 1))
    kl = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    decode_params = (frozen_sh.reference, frozen.reference) if rank else (p_sh, state.policy.params)
    steps = {
        "rollout": Step("rollout", rollout_fn, (state.policy.params, prompts["input_ids"],
                                                prompts["attention_mask"], key, *base_arg),
                        tokens=b * n_new, loop_trips=n_new,
                        loop_body=_decode_body(policy, *decode_params, b, t, mesh)),
        "experience": Step("experience", experience_fn, (state.policy.params, value_params,
                                                         frozen, rollout, kl), tokens=b * t),
        "update": Step("update", update_fn, (state.policy, state.ema_params, experience, indices,
                                             ptx, *base_arg),
                       tokens=mb_size * t + (ptx_rows * cfg.data.ptx_seq_len if ptx else 0)),
    }
    if with_value:
        # Value LoRA: the frozen RM is the value's base, a last, non-donated argument.
        value_base_sh, value_base_arg = ((frozen_sh.reward,), (frozen.reward,)) if vrank else ((), ())
        value_update_fn = jax.jit(
            functools.partial(value_update_step, models=models, value_opt=value_opt,
                              prompt_len=prompt_len, cfg=p,
                              **({"lora_scale": value_lora_scale,
                                  "lora_shardings": value_base_shardings} if vrank else {})),
            in_shardings=(state_sh.value, shardings_of(experience), rep, *value_base_sh),
            out_shardings=(state_sh.value, rep), donate_argnums=0)
        steps["value_update"] = Step("value_update", value_update_fn,
                                     (state.value, experience, indices, *value_base_arg),
                                     tokens=mb_size * t)
    if ptx is not None:
        ptx_fn = jax.jit(
            functools.partial(lora_ptx_gradient, models=models, chunk=p.logprob_chunk,
                              scale=lora_scale, shardings=base_shardings) if rank else
            functools.partial(ptx_gradient, models=models, chunk=p.logprob_chunk),
            in_shardings=(p_sh, shardings_of(ptx), *base_sh), out_shardings=(rep, p_sh))
        steps["ptx"] = Step("ptx", ptx_fn, (state.policy.params, ptx, *base_arg),
                            tokens=ptx_rows * cfg.data.ptx_seq_len)

    def init_state(rng):
        """Random policy and value; the reference is the policy, as at the start of PPO."""
        k_policy, k_value = jax.random.split(rng)
        policy_params = init_params(policy, k_policy, mesh)
        value_init = init_params(value, k_value, mesh) if with_value else None
        reward_params = init_params(reward, jax.random.fold_in(rng, 2), mesh)
        trained = (init_policy_lora(policy_params, jax.random.fold_in(rng, 3), p) if rank
                   else policy_params)
        if vrank:
            value_init = init_value_lora(reward_params, value_init, jax.random.fold_in(rng, 4), p)
        return (init_ppo_state(state, policy_opt, value_opt, trained, value_init),
                make_frozen(frozen, policy_params, reward_params, {}))

    def random_args(name, state_, frozen_, rng):
        seed = int(jax.random.randint(rng, (), 0, 2**30))
        base = (frozen_.reference,) if rank else ()
        vocab = policy.config.vocab_size
        if name == "rollout":
            data = random_batch(prompts, vocab, seed)
            return (state_.policy.params, data["input_ids"], data["attention_mask"], rng, *base)
        if name == "experience":
            return (state_.policy.params, state_.value.params if with_value else {}, frozen_,
                    random_batch(rollout, vocab, seed), jnp.float32(p.kl_coef))
        if name in ("update", "value_update"):
            exp_, idx = (random_batch(experience, vocab, seed),
                         jax.device_put(np.arange(mb_size, dtype=np.int32), rep))
            if name == "value_update":
                return (state_.value, exp_, idx, *((frozen_.reward,) if vrank else ()))
            return (state_.policy, state_.ema_params, exp_, idx,
                    None if ptx is None else random_batch(ptx, vocab, seed + 1), *base)
        if name == "ptx":
            return state_.policy.params, random_batch(ptx, vocab, seed), *base
        raise KeyError(f"PPO has no step {name!r}; steps: {sorted(steps)}")

    networks = {"policy": policy, "value": value, "reward": reward}
    calls = {"rollout": 1, "experience": 1, "update": updates_per_iteration,
             "value_update": updates_per_iteration, "ptx": updates_per_iteration}
    if not with_value:
        del networks["value"], calls["value_update"]
    return Program("ppo", mesh, networks, state, frozen,
                   steps, init_state, random_args,
                   {"models": models, "policy_opt": policy_opt, "value_opt": value_opt,
                    "policy_schedule": policy_schedule, "sampling": sampling,
                    "prompt_len": prompt_len, "n_iterations": n_iterations,
                    "n_minibatches": b // mb_size, "ptx_rows": ptx_rows,
                    "group_size": group_size(p), "prompts_per_rollout": b // group_size(p),
                    "lora_rank": rank, "lora_scale": lora_scale,
                    "value_lora_rank": vrank, "value_lora_scale": value_lora_scale,
                    # as train() runs them; the ptx pass is part of each update
                    "calls_per_iteration": calls})


def replicated_train_state(params: Any, opt: optax.GradientTransformation, rep: Any) -> TrainState:
    """Abstract TrainState of small trainables (LoRA adapters, a head), replicated everywhere."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
        jax.eval_shape(lambda a: TrainState(jnp.zeros((), jnp.int32), a, opt.init(a)), params))


def check_value_lora(cfg: Any, value: Transformer, reward: Transformer) -> None:
    """Value LoRA's base is the frozen RM: the value network must be the RM's architecture,
    started from the RM's checkpoint."""
    value_from = cfg.get("value_from", "")
    if value_from and value_from != cfg.get("reward_from", ""):
        raise ConfigError(f"value_from={value_from!r}: expected empty or reward_from with "
                          "ppo.value_lora.rank > 0 (the value's frozen base is the RM)")
    if value.config != reward.config:
        raise ConfigError("ppo.value_lora.rank > 0: expected the value network to have the RM's "
                          "architecture (value_model empty): its frozen base is the RM")


def group_size(p: Any) -> int:
    """G: samples per prompt in one rollout (1 for configs from before it existed)."""
    return int(p.get("group_size", 1))


def check_advantage_config(p: Any) -> None:
    """The advantage estimator's fields, in one-line ConfigErrors (``validate`` says the same
    before any model loads; this guards ``build`` called directly)."""
    kind, g = advantage_kind(p), group_size(p)
    if kind not in ("gae", *GROUP_ADVANTAGES):
        raise ConfigError(f"ppo.advantage={kind!r}: expected 'gae', 'grpo' or 'rloo'")
    if g < 1 or p.rollout_batch_size % g:
        raise ConfigError(f"ppo.group_size={g}: expected a positive divisor of "
                          f"ppo.rollout_batch_size={p.rollout_batch_size} (whole groups per rollout)")
    if kind in GROUP_ADVANTAGES and g < 2:
        raise ConfigError(f"ppo.group_size={g}: expected >= 2 with ppo.advantage={kind!r} (the "
                          "other samples of a prompt are each sample's baseline)")
    if kind == "grpo" and p.kl_controller != "fixed":
        raise ConfigError(f"ppo.kl_controller={p.kl_controller!r}: expected 'fixed' with "
                          "ppo.advantage='grpo' (its KL is a loss term weighted by ppo.kl_coef)")


PTX_KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask")


def _decode_body(policy: Transformer, p_sh: Any, params: Any, batch: int, slots: int,
                 mesh: Mesh) -> Step:
    cache_shape = (policy.config.n_layers, batch, slots, policy.config.kv_heads,
                   policy.config.dims_per_head)
    c_sh = cache_sharding(policy, mesh, cache_shape)
    cache = {k: jax.ShapeDtypeStruct(cache_shape, policy.config.compute_dtype, sharding=c_sh)
             for k in ("k", "v")}
    shard = functools.partial(batch_sharding, mesh)
    rep = replicated(mesh)
    fn = jax.jit(functools.partial(decode_step, model=policy),
                 in_shardings=(p_sh, shard(2), shard(2), {"k": c_sh, "v": c_sh}, rep),
                 out_shardings=(shard(2), {"k": c_sh, "v": c_sh}), donate_argnums=3)
    args = (params, jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=shard(2)),
            jax.ShapeDtypeStruct((batch, slots), jnp.int32, sharding=shard(2)), cache,
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    return Step("decode", fn, args, tokens=batch)


def init_policy_lora(policy_params: Any, rng: jax.Array, p: Any) -> dict:
    """Fresh adapters (A random, B zero: the merged policy starts equal to the base)."""
    return section_lora(policy_params, rng, p, "lora").adapters


def init_value_lora(reward_params: Any, value_params: Any, rng: jax.Array, p: Any) -> dict:
    """The value LoRA's trainables: fresh adapters on the RM (B zero: the value starts as
    ``value_params``' trunk, the RM's) and ``value_params``' score head."""
    return {"adapters": section_lora(reward_params, rng, p, "value_lora").adapters,
            "score_head": value_params["score_head"]}


def lora_rng(seed: int) -> jax.Array:
    """The adapters' init key (apart from every iteration's ``common.step_rng``)."""
    return jax.random.fold_in(jax.random.key(seed), 0x10_4A)


def save_lora(lora_dir: str, adapters: Any, p: Any, scale: float, policy_from: str) -> None:
    """``<workdir>/lora``: ``adapters/`` (orbax pytree of A and B) and ``lora.json``."""
    ckpt_lib.save_pytree(os.path.join(lora_dir, "adapters"), adapters, overwrite=True)
    if jax.process_index() == 0:
        ckpt_lib.atomic_write_json(os.path.join(lora_dir, "lora.json"), {
            "rank": lora_rank(p), "alpha": float(p.lora.alpha), "scale": float(scale),
            "targets": list(p.lora.targets), "base": policy_from,
            "n_params": lora_param_count(LoRA(adapters, scale))}, indent=1)


def init_ppo_state(state: PPOState, policy_opt, value_opt, policy_params, value_params) -> PPOState:
    """Fresh optimizer states (and EMA) around loaded or random weights, in ``state``'s shardings.
    ``value_params`` None: no value network (grpo / rloo), ``state.value`` is ``{}``."""
    ema = bool(jax.tree.leaves(state.ema_params))
    if value_params is None:
        return jax.jit(lambda pp: PPOState(
            TrainState(jnp.zeros((), jnp.int32), pp, policy_opt.init(pp)), {},
            jax.tree.map(jnp.copy, pp) if ema else {}),
            out_shardings=shardings_of(state))(policy_params)
    return jax.jit(lambda pp, vp: PPOState(
        TrainState(jnp.zeros((), jnp.int32), pp, policy_opt.init(pp)),
        TrainState(jnp.zeros((), jnp.int32), vp, value_opt.init(vp)),
        jax.tree.map(jnp.copy, pp) if ema else {}),
        out_shardings=shardings_of(state))(policy_params, value_params)


def make_frozen(frozen: Frozen, reference_params, reward_params, reward_norm: dict) -> Frozen:
    """Copies of the reference and RM weights cast to the frozen dtype, in their shardings."""
    sh = shardings_of(frozen)
    cast = lambda tree, like: jax.tree.map(lambda x, a: x.astype(a.dtype), tree, like)
    return jax.jit(lambda r, w, n: Frozen(cast(r, frozen.reference), cast(w, frozen.reward), n),
                   out_shardings=sh)(reference_params, reward_params, scoring.norm_array(reward_norm))


# --- data --------------------------------------------------------------------------------------

def load_data(cfg: Any, tokenizer: Any) -> tuple[dict, dict | None, list[dict]]:
    """(prompt arrays, ptx arrays or None, prompt rows for sample tables)."""
    data = cfg.data
    rows = read_source(data.prompts, "prompts", data_dir=data.get("tfds_data_dir"),
                       field_map=data.get("field_map"))
    arrays, stats = tokenize_prompts(rows, tokenizer, data.max_prompt_len, data.overlong)
    log.info("prompts %s", stats)
    prompts = {"input_ids": arrays["input_ids"], "attention_mask": arrays["attention_mask"],
               "row_index": arrays["row_index"]}
    ptx = None
    if cfg.ppo.ptx_coef > 0:
        ptx_rows = read_source(data.pretrain, "pretrain", data_dir=data.get("tfds_data_dir"))
        ptx_arrays, stats = tokenize_pretrain(ptx_rows, tokenizer, data.ptx_seq_len, "chunk")
        log.info("ptx %s", stats)
        ptx = {k: ptx_arrays[k] for k in ("input_ids", "attention_mask", "position_ids", "loss_mask")}
    return prompts, ptx, rows


# --- the loop ----------------------------------------------------------------------------------

def train(cfg: Any, workdir: str) -> dict[str, float]:
    """Run PPO / PPO-ptx; returns the last iteration's metrics.

    SIGTERM / SIGINT finish the current iteration, save a checkpoint and raise Preempted; a
    NaN / Inf loss, gradient norm or parameter raises NonFiniteError (see ``stages.common``).
    """
    import contextlib

    from rlhf_jax.errors import Preempted

    workdir = os.path.abspath(workdir)
    p = cfg.ppo
    name = cfg.get("name", "ppo")
    rank, vrank = lora_rank(p), value_lora_rank(p)
    outputs = (["checkpoints", "model"] + (["model_ema"] if p.ema_decay > 0 else [])
               + (["lora"] if rank else []))
    common.check_writable(workdir, *(os.path.join(workdir, out) for out in outputs))
    # Left in reverse order on any exit: the bar is closed, pending checkpoint saves are
    # committed (never left as *-tmp), the previous signal handlers come back.
    with contextlib.ExitStack() as stack:
        preemption = stack.enter_context(common.Preemption())
        mesh = common.setup_mesh(cfg)
        overrides = common.runtime_overrides(cfg)

        # Networks: policy (trained) and its frozen reference share one definition; the value
        # network only for GAE (grpo / rloo take their baseline from the group).
        check_advantage_config(p)
        with_value = uses_value_network(p)
        policy, policy_params, tokenizer, _ = common.load_model(cfg.policy_from, mesh, **overrides)
        reward, reward_params, _, reward_extra = common.load_model(cfg.reward_from, mesh, **overrides)
        value, value_params, value_extra = None, None, {}
        if vrank:    # the value's base is the RM: its weights, not a second load of them
            value, value_params, value_extra = reward, reward_params, reward_extra
        elif with_value:
            value, value_params, _, value_extra = common.load_model(
                cfg.value_from or cfg.reward_from, mesh, **overrides)
        if reward.config.head != "scalar" or (with_value and value.config.head != "scalar"):
            raise ValueError(f"reward_from={cfg.reward_from!r} must be a reward model (scalar head)")
        if tokenizer is None:
            raise FileNotFoundError(f"policy_from={cfg.policy_from!r}: no tokenizer saved beside it")
        reward_norm = reward_extra.get("reward_norm") or {}
        log.info("reward normalization: %s", reward_norm or "none")
        if cfg.get("value_init_normalized", True) and value_extra.get("reward_norm"):
            # Returns are built from the normalized score: a value head left raw starts off by the
            # demonstrations' mean, a bias GAE turns into length-dependent advantage errors.
            value_params = scoring.fold_normalization(value_params, value_extra["reward_norm"])
        common.log_params(policy_params)

        # The compiled steps, then the state in their shardings.
        program = build(cfg, mesh, models=Models(policy, value, reward),
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        info = program.info
        phases = ("rollout", "experience", "update") + (("value_update",) if with_value else ())
        executables = common.compile_ahead(program, phases)   # while the rest is set up
        frozen = make_frozen(program.frozen, policy_params, reward_params, reward_norm)
        if rank:     # the policy trains adapters only; its base is frozen.reference
            policy_params = init_policy_lora(policy_params, lora_rng(cfg.seed), p)
            log.info("LoRA rank %d on %s: %d trainable parameters", rank, tuple(p.lora.targets),
                     lora_param_count(LoRA(policy_params, info["lora_scale"])))
        if vrank:    # the value trains adapters on frozen.reward and its own score head
            value_params = init_value_lora(reward_params, value_params,
                                           jax.random.fold_in(lora_rng(cfg.seed), 1), p)
            log.info("value LoRA rank %d on %s: %d trainable parameters", vrank,
                     tuple(p.value_lora.targets),
                     sum(math.prod(x.shape) for x in jax.tree.leaves(value_params)))
        base_arg = (frozen.reference,) if rank else ()
        value_base_arg = (frozen.reward,) if vrank else ()
        state = init_ppo_state(program.state, info["policy_opt"], info["value_opt"], policy_params,
                               value_params)
        del policy_params, value_params, reward_params

        prompts, ptx_arrays, prompt_rows = load_data(cfg, tokenizer)
        if prompts["input_ids"].shape[1] != info["prompt_len"]:
            raise ValueError(f"prompts tokenized to {prompts['input_ids'].shape[1]} tokens; expected "
                             f"data.max_prompt_len={info['prompt_len']}")
        n_groups, n_samples = info["prompts_per_rollout"], info["group_size"]
        iterators = {"prompts": BatchIterator(prompts, n_groups, seed=cfg.seed)}
        if ptx_arrays is not None:
            iterators["ptx"] = BatchIterator(ptx_arrays, info["ptx_rows"], seed=cfg.seed + 1)
        n_iterations, n_minibatches = info["n_iterations"], info["n_minibatches"]

        checkpointer = stack.enter_context(ckpt_lib.Checkpointer(
            os.path.join(workdir, "checkpoints"), max_to_keep=2))
        state, start_iteration, meta = common.resume(checkpointer, state, iterators, cfg)
        kl_coef = float(meta.get("kl_coef", p.kl_coef))
        guard = common.FiniteGuard(name, checkpointer=checkpointer)
        checkpoint_meta = lambda: common.checkpoint_meta(cfg, iterators, kl_coef=kl_coef)
        writer = stack.enter_context(MetricsWriter(workdir))
        writer.discard_after(start_iteration, tables=("samples",))
        timer = StepTimer()
        bar = stack.enter_context(ProgressBar(n_iterations, desc=name, initial=start_iteration))
        log.info("PPO: %d iterations x %d episodes (%d prompts x %d), %d epochs x %d minibatches "
                 "of %d, advantage %s, ptx_coef %g", n_iterations, p.rollout_batch_size, n_groups,
                 n_samples, p.epochs, n_minibatches, p.minibatch_size, advantage_kind(p), p.ptx_coef)
        if preemption.requested():
            raise Preempted(preemption.signum)    # nothing done since the last checkpoint

        side = stack.enter_context(common.SideThread())
        rollout_fn, experience_fn, update_fn = (executables[k].result() for k in phases[:3])
        value_update_fn = executables["value_update"].result() if with_value else None

        metrics: dict[str, float] = {}
        for it in range(start_iteration, n_iterations):
            it_rng = common.step_rng(cfg.seed, it)

            # 1. Rollout: sample G responses per prompt (G = 1 for GAE) with the current policy.
            prompt_batch = repeat_prompts(next(iterators["prompts"]), n_samples)
            with timer("rollout"):
                device_prompts = shard_batch({k: prompt_batch[k] for k in ("input_ids", "attention_mask")}, mesh)
                rollout = rollout_fn(state.policy.params, device_prompts["input_ids"],
                                     device_prompts["attention_mask"], it_rng, *base_arg)
                jax.block_until_ready(rollout)

            # 2. Experience: log-probs, reference log-probs, values, scores, rewards, GAE (or the
            #    group advantages), once.
            with timer("experience"):
                experience = experience_fn(state.policy.params,
                                           state.value.params if with_value else {}, frozen,
                                           rollout, jnp.float32(kl_coef))
                jax.block_until_ready(experience)

            # 3. Update: epochs x minibatches over the frozen experience. Each policy step sums
            #    the PPO and gamma_ptx x pretraining gradients into one update. The value steps
            #    read nothing the policy steps write, so on a CPU they run on a second core
            #    (grpo / rloo have none).
            with timer("update"):
                order_rng = np.random.default_rng([cfg.seed, it])
                minibatches = [jnp.asarray(order[i:i + p.minibatch_size])
                               for order in (order_rng.permutation(p.rollout_batch_size)
                                             for _ in range(p.epochs))
                               for i in range(0, p.rollout_batch_size, p.minibatch_size)]
                value_job = side.submit(run_value_updates, value_update_fn, state.value,
                                        experience, minibatches,
                                        *value_base_arg) if with_value else None
                policy_state, ema_params, policy_stats = state.policy, state.ema_params, []
                for indices in minibatches:
                    ptx_batch = (shard_batch(next(iterators["ptx"]), mesh)
                                 if ptx_arrays is not None else None)
                    policy_state, ema_params, stats = update_fn(policy_state, ema_params,
                                                                experience, indices, ptx_batch,
                                                                *base_arg)
                    policy_stats.append(stats)
                value_state, value_stats = (value_job.result() if with_value
                                            else (state.value, [{}] * len(minibatches)))
                state = PPOState(policy_state, value_state, ema_params)
                update_stats = [a | b for a, b in zip(*jax.device_get((policy_stats, value_stats)))]

            # 4. Log, adapt the KL coefficient, checkpoint.
            summary = summarize(experience, update_stats, kl_coef)
            n_tokens = float(summary.pop("_n_tokens"))
            times = timer.pop()
            metrics = summary | times | {
                "objective/kl_coef": kl_coef,
                "policy/lr": current_lr(info["policy_schedule"], int(state.policy.step)),
                "tokens/s": n_tokens / max(sum(times.values()), 1e-9),
                "episodes": (it + 1) * p.rollout_batch_size}
            writer.write(it + 1, metrics)
            # Every minibatch's losses and gradient norms, already on the host.
            guard.check_values(it + 1, {
                key: [s[key] for s in update_stats] for key in
                ("policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm", "ptx_loss")
                if key in update_stats[0]})
            if p.sample_every and ((it + 1) % p.sample_every == 0 or it == start_iteration):
                writer.write_table(it + 1, "samples", sample_table(
                    tokenizer, experience, info["prompt_len"], p.n_samples_logged))
            kl_coef = next_kl_coef(kl_coef, summary["objective/kl"], p)
            bar.update(tokens=int(n_tokens), score=summary["objective/scores"], kl=summary["objective/kl"])
            if p.checkpoint_every and (it + 1) % p.checkpoint_every == 0 and it + 1 < n_iterations:
                common.save_checkpoint(checkpointer, it + 1, state, checkpoint_meta(), guard)
            common.stop_if_preempted(preemption, checkpointer, it + 1, state, checkpoint_meta, guard)
        bar.close()
        guard.check_tree(n_iterations, state.policy.params, "policy")
        if p.ema_decay > 0:
            guard.check_tree(n_iterations, state.ema_params, "ema")
        checkpointer.wait()
        final_policy = policy.clone(config=policy.config.replace(dropout=0.0))
        final_params, ema_final = state.policy.params, state.ema_params
        if rank:     # model/ (and model_ema/) are the merged policy; lora/ the adapters alone
            merge = jax.jit(lambda base, a: apply_lora(base, LoRA(a, info["lora_scale"])),
                            out_shardings=shardings_of(program.frozen.reference))
            save_lora(os.path.join(workdir, "lora"), state.policy.params, p, info["lora_scale"],
                      cfg.policy_from)
            final_params = merge(frozen.reference, state.policy.params)
            if p.ema_decay > 0:
                ema_final = merge(frozen.reference, state.ema_params)
        save_our_checkpoint(os.path.join(workdir, "model"), final_policy, final_params,
                            tokenizer, extra={"stage": name, "ptx_coef": p.ptx_coef,
                                              "iterations": n_iterations, **group_facts(p),
                                              **lora_facts(p)},
                            overwrite=True)
        if p.ema_decay > 0:
            save_our_checkpoint(os.path.join(workdir, "model_ema"), final_policy, ema_final,
                                tokenizer, extra={"stage": name, "ema_decay": p.ema_decay},
                                overwrite=True)
    return metrics


def repeat_prompts(batch: dict[str, np.ndarray], g: int) -> dict[str, np.ndarray]:
    """Each prompt G times in a row (group-major: prompt b owns rows b*G .. b*G + G-1), as the
    group advantages expect; G = 1 is the batch itself."""
    return batch if g == 1 else {k: np.repeat(v, g, axis=0) for k, v in batch.items()}


def group_facts(p: Any) -> dict[str, Any]:
    """What a grpo / rloo policy's extra.json records beside PPO's facts ({} for GAE)."""
    if uses_value_network(p):
        return {}
    return {"advantage": advantage_kind(p), "group_size": group_size(p)}


def lora_facts(p: Any) -> dict[str, Any]:
    """What a LoRA-trained policy's extra.json records ({} without LoRA)."""
    facts = {}
    if lora_rank(p):
        facts |= {"lora_rank": lora_rank(p), "lora_alpha": float(p.lora.alpha),
                  "lora_targets": list(p.lora.targets), "lora_merged": True}
    if value_lora_rank(p):
        facts |= {"value_lora_rank": value_lora_rank(p),
                  "value_lora_targets": list(p.value_lora.targets)}
    return facts


def run_value_updates(value_update_fn: Any, value: TrainState, experience: Experience,
                      minibatches: list[jax.Array], *base: Any) -> tuple[TrainState, list[dict]]:
    """The value network's steps of one iteration, in the policy's minibatch order (``base``:
    the frozen RM, with value LoRA)."""
    stats = []
    for indices in minibatches:
        value, step_stats = value_update_fn(value, experience, indices, *base)
        stats.append(step_stats)
    return value, stats


def next_kl_coef(kl_coef: float, kl: float, p: Any) -> float:
    if p.kl_controller == "adaptive":
        return float(obj.adaptive_kl_update(kl_coef, kl, p.rollout_batch_size, p.kl_target,
                                            p.kl_horizon))
    if p.kl_controller != "fixed":
        raise ValueError(f"ppo.kl_controller={p.kl_controller!r}; expected 'fixed' or 'adaptive'")
    return float(obj.fixed_kl_update(kl_coef, kl, p.rollout_batch_size))


def _host_values(experience: Any, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Full values of some experience fields on every process (a collective across processes:
    the experience is batch-sharded over every host's devices)."""
    from rlhf_jax.distributed import fetch
    return fetch({k: getattr(experience, k) for k in keys})


def summarize(experience: Batch, update_stats: list[dict], kl_coef: float) -> dict[str, float]:
    """TRL-compatible metric names, from the experience and the minibatch statistics.

    Every process calls this (the KL controller needs the summary everywhere) and gets the
    same numbers."""
    exp = _host_values(experience, ("kl", "scores", "response_mask"))
    kl_per_seq = exp["kl"].sum(-1)
    scores = exp["scores"]
    mean = lambda key: float(np.mean([float(s[key]) for s in update_stats]))
    out = {
        "objective/kl": float(kl_per_seq.mean()),
        "objective/scores": float(scores.mean()),
        "objective/non_score_reward": float((-kl_coef * kl_per_seq).mean()),
        "objective/rlhf_reward": float((scores - kl_coef * kl_per_seq).mean()),
        "objective/entropy": mean("entropy"),
        "policy/clipfrac_avg": mean("clipfrac"),
        "policy/approxkl_avg": mean("approxkl"),
        "policy/entropy_avg": mean("entropy"),
        "policy/ratio_max": float(max(float(s["ratio_max"]) for s in update_stats)),
        "policy/first_ratio_mean": float(update_stats[0]["ratio_mean"]),
        "policy/grad_norm": mean("policy_grad_norm"),
        "loss/policy_avg": mean("policy_loss"),
    }
    if "value_loss" in update_stats[0]:           # GAE; grpo / rloo train no value network
        out |= {"loss/value_avg": mean("value_loss"),
                "val/var_explained": mean("explained_variance"),
                "val/clipfrac_avg": mean("vf_clipfrac")}
    out |= {"response/length_mean": float(exp["response_mask"].sum(-1).mean()),
            "_n_tokens": float(exp["response_mask"].sum())}
    if "k3_kl" in update_stats[0]:
        out["policy/k3_kl_avg"] = mean("k3_kl")
    if "ptx_loss" in update_stats[0]:
        out["ptx/loss"] = mean("ptx_loss")
    return out


def sample_table(tokenizer: Any, experience: Batch, prompt_len: int, n: int) -> list[dict]:
    """A few (prompt, response, score, KL) rows for the samples table; call it on every process
    (gathering the rows is collective), though only process 0's writer stores them."""
    exp = _host_values(experience, ("sequences", "attention_mask", "response_mask", "scores",
                                    "kl"))
    rows = []
    for i in range(min(n, len(exp["scores"]))):
        prompt_ids = exp["sequences"][i, :prompt_len][exp["attention_mask"][i, :prompt_len] > 0]
        response_ids = exp["sequences"][i, prompt_len:][exp["response_mask"][i] > 0]
        rows.append({"prompt": tokenizer.decode(prompt_ids.tolist()),
                     "response": tokenizer.decode(response_ids.tolist()),
                     "score": float(exp["scores"][i]), "kl": float(exp["kl"][i].sum())})
    return rows
