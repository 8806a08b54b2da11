"""PPO's compiled steps, built from shapes alone: ``build(cfg, mesh) -> Program``.

``train`` runs exactly these steps; ``rlhf-jax compile`` lowers them for a TPU topology and
``rlhf-jax profile`` times them with random weights. Memory plan for pod-size models: the
reference and RM can be held in bfloat16 (``ppo.frozen_dtype``), the LM head only runs over
response positions and, with ``ppo.logprob_chunk``, a block of positions at a time
(``scoring.py``), and ``model_runtime.remat`` recomputes each layer in the backward pass.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from rlhf_jax import model_io
from rlhf_jax.errors import ConfigError
from rlhf_jax.models.params import cache_shardings
from rlhf_jax.models.transformer import Transformer, cache_shapes
from rlhf_jax.optim import make_lr_schedule, make_optimizer
from rlhf_jax.program import Program, Step, abstract_batch, abstract_key, abstract_like, random_batch
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.sharding import as_auto_mesh, batch_sharding, check_batch_size, replicated
from rlhf_jax.stages.ppo import estimators
from rlhf_jax.stages.ppo.experience import (Rollout, decode_step, make_experience,
                                                policy_update_step, ptx_gradient, rollout_step,
                                                sync_step, value_update_step)
from rlhf_jax.stages.ppo.roles import PPOState, Roles, make_roles, network_models, random_state
from rlhf_jax.train_state import batch_shardings, shardings_of

PTX_KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask")


@dataclasses.dataclass(frozen=True)
class PPOPlan:
    """What ``build`` decided, which the loop reads."""
    roles: Roles
    policy_opt: optax.GradientTransformation
    value_opt: optax.GradientTransformation
    policy_schedule: Any
    sampling: SamplingConfig
    prompt_len: int
    n_iterations: int
    n_minibatches: int
    ptx_rows: int                 # pretraining rows per policy update (0: no ptx)
    group_size: int               # G samples per prompt (1 for gae)
    prompts_per_rollout: int


def build(cfg: Any, mesh: Mesh, *, models: dict[str, Transformer | None] | None = None,
          eos_token_id: int | None = None, pad_token_id: int | None = None,
          model_overrides: dict | None = None) -> Program:
    """PPO's rollout, experience, update, value-update and ptx steps for ``cfg`` on ``mesh``.

    Architectures come from ``models`` (``{"policy", "reward", "value"}``: loaded checkpoints'),
    else the config (``roles.network_models``). Token ids default to the policy config's. Every
    step takes the policy's (value's) trainable tree and, last and never donated, its frozen base.
    """
    mesh, p = as_auto_mesh(mesh), cfg.ppo
    estimators.check(p)
    nets = network_models(cfg, mesh, models or {},
                          {**model_io.runtime_overrides(cfg), **(model_overrides or {})})
    roles, frozen = make_roles(p, nets["policy"], nets["reward"], nets["value"], mesh)
    policy = roles.policy.model
    b, mb_size, g = p.rollout_batch_size, p.minibatch_size, p.group_size
    ptx_rows = check_batches(p, mesh)
    n_iterations = p.iterations or math.ceil(p.total_episodes / b)
    updates = p.epochs * (b // mb_size)
    policy_schedule, policy_opt, value_opt = optimizers(p, n_iterations, updates)
    policy_state = roles.policy.abstract_state(policy_opt, mesh)
    state = PPOState(policy_state, roles.value.abstract_state(value_opt, mesh),
                     policy_state.params if p.ema_decay > 0 else {})
    value_params = roles.value_trainable(state)
    policy_base, value_base = roles.policy.base(frozen), roles.value.base(frozen)

    # Abstract arguments.
    prompt_len, n_new = cfg.data.max_prompt_len, cfg.data.max_response_len
    t, rep, shard = prompt_len + n_new, replicated(mesh), functools.partial(batch_sharding, mesh)
    prompts = abstract_batch({"input_ids": ((b, prompt_len), jnp.int32),
                              "attention_mask": ((b, prompt_len), jnp.int32)}, shard)
    rollout = abstract_rollout(b, prompt_len, n_new, shard)
    experience_step = functools.partial(make_experience, roles=roles, prompt_len=prompt_len, cfg=p)
    experience = jax.eval_shape(experience_step, state.policy.params, value_params, frozen,
                                rollout, jnp.float32(0))
    experience = abstract_like(experience, batch_shardings(experience, mesh))
    ptx = (abstract_batch({k: ((ptx_rows, cfg.data.ptx_seq_len),
                               jnp.float32 if k == "loss_mask" else jnp.int32)
                           for k in PTX_KEYS}, shard) if ptx_rows else None)
    indices, key = jax.ShapeDtypeStruct((mb_size,), jnp.int32, sharding=rep), abstract_key(rep)

    # The jitted steps, every input and output sharding named.
    sampling = sampling_config(p, policy, n_new, eos_token_id, pad_token_id)
    state_sh, frozen_sh = shardings_of(state), shardings_of(frozen)
    p_sh, pb_sh, vb_sh = state_sh.policy.params, shardings_of(policy_base), shardings_of(value_base)
    exp_sh = shardings_of(experience)
    sampler = roles.sampler.model
    sampler_params = roles.sampler.abstract(roles.policy.whole_like(state.policy.params,
                                                                    policy_base), mesh)
    s_sh = shardings_of(sampler_params)
    jit = lambda fn, i, o, **kw: jax.jit(fn, in_shardings=i, out_shardings=o, **kw)
    steps = {
        "sync": Step("sync", jit(functools.partial(
            sync_step, roles=roles, shardings=shardings_of(roles.policy.whole_like(
                state.policy.params, policy_base))), (p_sh, pb_sh), s_sh),
            (state.policy.params, policy_base)),
        "rollout": Step("rollout", jit(
            functools.partial(rollout_step, roles=roles, sampling=sampling, mesh=mesh),
            (s_sh, shard(2), shard(2), rep), shardings_of(rollout)),
            (sampler_params, prompts["input_ids"], prompts["attention_mask"], key),
            tokens=b * n_new, loop_trips=n_new,
            loop_body=decode_body(sampler, sampler_params, b, t, mesh)),
        "experience": Step("experience", jit(
            experience_step, (p_sh, shardings_of(value_params), frozen_sh, shardings_of(rollout), rep),
            exp_sh), (state.policy.params, value_params, frozen, rollout,
                      jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)), tokens=b * t),
        "update": Step("update", jit(
            functools.partial(policy_update_step, roles=roles, policy_opt=policy_opt,
                              prompt_len=prompt_len, cfg=p),
            (state_sh.policy, state_sh.ema_params, exp_sh, rep,
             None if ptx is None else shardings_of(ptx), pb_sh),
            (state_sh.policy, state_sh.ema_params, rep), donate_argnums=(0, 1)),
            (state.policy, state.ema_params, experience, indices, ptx, policy_base),
            tokens=mb_size * t + ptx_rows * cfg.data.ptx_seq_len),
    }
    if roles.with_value:
        steps["value_update"] = Step("value_update", jit(
            functools.partial(value_update_step, roles=roles, value_opt=value_opt,
                              prompt_len=prompt_len, cfg=p),
            (state_sh.value, exp_sh, rep, vb_sh), (state_sh.value, rep), donate_argnums=0),
            (state.value, experience, indices, value_base), tokens=mb_size * t)
    if ptx is not None:
        steps["ptx"] = Step("ptx", jit(
            functools.partial(ptx_gradient, roles=roles, chunk=p.logprob_chunk),
            (p_sh, shardings_of(ptx), pb_sh), (rep, p_sh)),
            (state.policy.params, ptx, policy_base), tokens=ptx_rows * cfg.data.ptx_seq_len)

    calls = {"sync": 1, "rollout": 1, "experience": 1, "update": updates, "value_update": updates,
             "ptx": updates}
    plan = PPOPlan(roles, policy_opt, value_opt, policy_schedule, sampling, prompt_len,
                   n_iterations, b // mb_size, ptx_rows, g, b // g)
    networks = {"policy": policy, "value": roles.value.model, "reward": roles.reward.model}
    return Program(
        "ppo", mesh, {k: m for k, m in networks.items() if m is not None},
        state, frozen, steps,
        lambda rng: random_state(roles, state, frozen, policy_opt, value_opt, rng, mesh),
        functools.partial(random_args, roles, p, steps, dict(
            prompts=prompts, rollout=rollout, experience=experience, ptx=ptx)),
        {k: v for k, v in calls.items() if k in steps}, policy_opt, policy_schedule, plan)


def random_args(roles: Roles, p: Any, steps: dict, abstract: dict, name: str, state: PPOState,
                frozen: Any, rng: jax.Array) -> tuple:
    """Concrete arguments for step ``name``: random tokens and batches, these weights."""
    if name not in steps:
        raise KeyError(f"PPO has no step {name!r}; steps: {sorted(steps)}")
    seed = int(jax.random.randint(rng, (), 0, 2**30))
    vocab = roles.policy.model.config.vocab_size
    pbase, vbase = roles.policy.base(frozen), roles.value.base(frozen)
    batch = lambda key, offset=0: random_batch(abstract[key], vocab, seed + offset)
    if name in ("update", "value_update"):
        idx = jax.device_put(np.arange(p.minibatch_size, dtype=np.int32),
                             steps[name].args[3 if name == "update" else 2].sharding)
    if name == "sync":
        return state.policy.params, pbase
    if name == "rollout":
        data = batch("prompts")
        weights = steps["sync"].fn(state.policy.params, pbase)
        return weights, data["input_ids"], data["attention_mask"], rng
    if name == "experience":
        return (state.policy.params, roles.value_trainable(state), frozen, batch("rollout"),
                jnp.float32(p.kl_coef))
    if name == "update":
        return (state.policy, state.ema_params, batch("experience"), idx,
                None if abstract["ptx"] is None else batch("ptx", 1), pbase)
    if name == "value_update":
        return state.value, batch("experience"), idx, vbase
    return state.policy.params, batch("ptx"), pbase


def abstract_rollout(b: int, prompt_len: int, n_new: int, shard: Any) -> Rollout:
    """A rollout's ShapeDtypeStructs, batch-sharded: [B, P+N] tokens and mask, [B, N] response
    mask, [B] EOS flags, [B, N] sampler log-probs."""
    t = prompt_len + n_new
    return Rollout(*(jax.ShapeDtypeStruct(shape, dtype, sharding=shard(len(shape)))
                     for shape, dtype in (((b, t), jnp.int32), ((b, t), jnp.int32),
                                          ((b, n_new), jnp.int32), ((b,), jnp.bool_),
                                          ((b, n_new), jnp.float32))))


def sampling_config(p: Any, policy: Transformer, n_new: int, eos_token_id: int | None,
                    pad_token_id: int | None) -> SamplingConfig:
    """The rollout's sampler settings; token ids default to the policy config's."""
    return SamplingConfig(
        max_new_tokens=n_new, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
        greedy=False, eos_token_id=policy.config.eos_token_id if eos_token_id is None else eos_token_id,
        pad_token_id=policy.config.pad_token_id if pad_token_id is None else pad_token_id)


def check_batches(p: Any, mesh: Mesh) -> int:
    """Batch sizes that split over the mesh; returns the ptx rows per update (0: no ptx)."""
    if p.rollout_batch_size % p.minibatch_size:
        raise ConfigError(f"ppo.rollout_batch_size={p.rollout_batch_size}: expected a multiple "
                          f"of ppo.minibatch_size={p.minibatch_size}")
    check_batch_size("ppo.rollout_batch_size", p.rollout_batch_size, mesh)
    ptx_rows = p.ptx_per_episode * p.minibatch_size if p.ptx_coef > 0 else 0
    if ptx_rows:
        check_batch_size("ppo.ptx_per_episode x ppo.minibatch_size", ptx_rows, mesh)
    return ptx_rows


def optimizers(p: Any, n_iterations: int, updates: int):
    """(policy schedule, policy optimizer, value optimizer): the policy's lr constant after a
    warmup from 0.1x (paper), the value's fixed."""
    policy_schedule = make_lr_schedule(p.lr, n_iterations * updates,
                                       warmup_steps=p.warmup_iterations * updates,
                                       decay="constant", warmup_start_fraction=0.1)
    clip = p.grad_clip_norm or None
    return (policy_schedule,
            make_optimizer(policy_schedule, b1=p.b1, b2=p.b2, grad_clip_norm=clip),
            make_optimizer(p.value_lr, b1=p.b1, b2=p.b2, grad_clip_norm=clip))


def decode_body(policy: Transformer, params: Any, batch: int, slots: int, mesh: Mesh) -> Step:
    """The rollout's decode loop body as its own step (XLA counts a loop body's FLOPs once)."""
    shapes = cache_shapes(policy.config, batch, slots)
    c_sh = cache_shardings(policy, mesh, shapes)
    cache = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         shapes, c_sh)
    shard, rep = functools.partial(batch_sharding, mesh), replicated(mesh)
    fn = jax.jit(functools.partial(decode_step, model=policy),
                 in_shardings=(shardings_of(params), shard(2), shard(2), c_sh, rep),
                 out_shardings=(shard(2), c_sh), donate_argnums=3)
    args = (params, jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=shard(2)),
            jax.ShapeDtypeStruct((batch, slots), jnp.int32, sharding=shard(2)), cache,
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    return Step("decode", fn, args, tokens=batch)
