"""Stage 3: PPO and PPO-ptx (InstructGPT Eq. 2).

Networks: the policy starts from the (PPO-init) SFT model; a frozen copy of it is the KL
reference; the reward model is frozen and scores with its demonstration normalization; the value
network is a separate copy of the reward model, trained.

One iteration, as the loop below reads:
  1. rollout     sample responses for a batch of prompts (jitted KV-cache sampler)
  2. experience  one jitted, gradient-free pass, float32 throughout: policy and reference
                 log-probs, values, RM scores, per-token rewards -beta*(log pi - log pi_ref) plus
                 the score at the last token, GAE advantages and returns
  3. update      ppo_epochs x minibatches jitted steps over that frozen experience; each step sums
                 the clipped-PPO gradient and gamma_ptx x the pretraining-NLL gradient into ONE
                 optimizer update of the policy, and takes a value-loss step
  4. log / KL controller / checkpoint

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
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax.convert import save_our_checkpoint
from rlhf_jax import objectives as obj
from rlhf_jax.data import BatchIterator, tokenize_pretrain, tokenize_prompts
from rlhf_jax.data.sources import read_source
from rlhf_jax.metrics import MetricsWriter, ProgressBar, StepTimer
from rlhf_jax.models.params import param_shardings
from rlhf_jax.models.transformer import Transformer, default_position_ids
from rlhf_jax.optim import current_lr, ema_update, make_lr_schedule, make_optimizer
from rlhf_jax.sampling import SamplingConfig, make_generate_fn
from rlhf_jax.sharding import batch_sharding, check_batch_size, shard_batch
from rlhf_jax.stages import common
from rlhf_jax.stages.reward import normalize
from rlhf_jax.train_state import TrainState, train_state_shardings

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class PPOState:
    policy: TrainState
    value: TrainState
    ema_params: Any          # EMA of the policy weights ({} when disabled)


@flax.struct.dataclass
class Models:
    """The four networks' definitions (static: closed over by the jitted steps)."""
    policy: Transformer = flax.struct.field(pytree_node=False)
    value: Transformer = flax.struct.field(pytree_node=False)
    reward: Transformer = flax.struct.field(pytree_node=False)
    reward_norm: dict = flax.struct.field(pytree_node=False, default_factory=dict)


# --- pure pieces -------------------------------------------------------------------------------

def response_logits(model: Transformer, params: Any, sequences: jax.Array,
                    attention_mask: jax.Array, prompt_len: int, temperature: float = 1.0) -> jax.Array:
    """Logits that predict each response token: positions P-1 .. P+N-2 -> [B, N, V].

    Divided by the sampling temperature, so log-probs are those of the distribution the
    rollout sampled from (the paper samples at temperature 1).
    """
    logits = model.apply({"params": params}, sequences, attention_mask,
                         default_position_ids(attention_mask))
    return logits[:, prompt_len - 1:-1] / temperature


def response_values(model: Transformer, params: Any, sequences: jax.Array,
                    attention_mask: jax.Array, prompt_len: int) -> jax.Array:
    """V(s_t) for each response token t, read where the policy decides it: [B, N] float32."""
    values = model.apply({"params": params}, sequences, attention_mask,
                         default_position_ids(attention_mask))
    return values[:, prompt_len - 1:-1].astype(jnp.float32)


def make_experience(models: Models, policy_params: Any, ref_params: Any, value_params: Any,
                    reward_params: Any, rollout: Batch, kl_coef: jax.Array, *, prompt_len: int,
                    cfg: Any) -> Batch:
    """Everything the update needs, computed once per rollout batch, without gradients, in f32."""
    seqs, attn = rollout["sequences"], rollout["attention_mask"]
    response_ids = seqs[:, prompt_len:]
    mask = rollout["response_mask"].astype(jnp.float32)
    logprobs = obj.token_logprobs(
        response_logits(models.policy, policy_params, seqs, attn, prompt_len, cfg.temperature),
        response_ids)
    ref_logprobs = obj.token_logprobs(
        response_logits(models.policy, ref_params, seqs, attn, prompt_len, cfg.temperature),
        response_ids)
    values = response_values(models.value, value_params, seqs, attn, prompt_len) * mask
    raw = obj.value_at_last_token(models.reward.apply({"params": reward_params}, seqs, attn,
                                                      default_position_ids(attn)), attn)
    scores = normalize(raw, models.reward_norm)
    if cfg.missing_eos_penalty is not None:
        # A response cut at max_new_tokens without EOS gets a fixed low score instead.
        has_eos = rollout["has_eos"]
        scores = jnp.where(has_eos, scores, jnp.float32(cfg.missing_eos_penalty))
    rewards, kl = obj.per_token_rewards(logprobs, ref_logprobs, scores, mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = obj.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = obj.gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = obj.masked_whiten(advantages, mask)
    return dict(sequences=seqs, attention_mask=attn, response_mask=mask,
                old_logprobs=logprobs * mask, ref_logprobs=ref_logprobs * mask,
                old_values=values, rewards=rewards, kl=kl, scores=scores,
                advantages=advantages, returns=returns)


def ppo_objective(params: Any, models: Models, mb: Batch, *, prompt_len: int,
                  cfg: Any) -> tuple[jax.Array, dict]:
    """Clipped PPO policy loss minus the entropy bonus, on one minibatch of experience."""
    logits = response_logits(models.policy, params, mb["sequences"], mb["attention_mask"],
                             prompt_len, cfg.temperature)
    logprobs = obj.token_logprobs(logits, mb["sequences"][:, prompt_len:])
    mask = mb["response_mask"]
    pg_loss, stats = obj.ppo_policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mask,
                                         cfg.clip_eps)
    entropy = obj.masked_mean(obj.token_entropy(logits), mask)
    loss = pg_loss - cfg.entropy_coef * entropy
    return loss, dict(stats, policy_loss=pg_loss, entropy=entropy)


def ptx_objective(params: Any, models: Models, ptx: Batch) -> jax.Array:
    """Pretraining term: token-mean NLL (= -E[log pi(x)]) of a pretraining minibatch."""
    logits = models.policy.apply({"params": params}, ptx["input_ids"], ptx["attention_mask"],
                                 ptx["position_ids"])
    loss, _ = obj.next_token_loss(logits[:, :-1], ptx["input_ids"][:, 1:], ptx["loss_mask"][:, 1:])
    return loss


def policy_gradient(params: Any, models: Models, mb: Batch, ptx: Batch | None, *,
                    prompt_len: int, cfg: Any) -> tuple[Any, dict]:
    """grad(PPO loss) + gamma_ptx * grad(ptx NLL): one gradient for one optimizer step.

    The two gradients are taken separately (as the paper accumulates them in consecutive passes)
    and summed before the optimizer sees them; gamma_ptx = 0 skips the ptx pass entirely.
    """
    (_, stats), grads = jax.value_and_grad(
        functools.partial(ppo_objective, models=models, mb=mb, prompt_len=prompt_len, cfg=cfg),
        has_aux=True)(params)
    if ptx is not None and cfg.ptx_coef > 0:
        ptx_loss, ptx_grads = jax.value_and_grad(ptx_objective)(params, models, ptx)
        grads = jax.tree.map(lambda g, h: g + cfg.ptx_coef * h, grads, ptx_grads)
        stats = dict(stats, ptx_loss=ptx_loss)
    return grads, stats


def value_objective(params: Any, models: Models, mb: Batch, *, prompt_len: int,
                    cfg: Any) -> tuple[jax.Array, dict]:
    values = response_values(models.value, params, mb["sequences"], mb["attention_mask"], prompt_len)
    loss, stats = obj.value_loss(values, mb["old_values"], mb["returns"], mb["response_mask"],
                                 cfg.value_clip if cfg.value_clip > 0 else None)
    stats = dict(stats, explained_variance=obj.explained_variance(
        values, mb["returns"], mb["response_mask"]))
    return loss, stats


def update_step(state: PPOState, experience: Batch, indices: jax.Array, ptx: Batch | None, *,
                models: Models, policy_opt: optax.GradientTransformation,
                value_opt: optax.GradientTransformation, prompt_len: int, cfg: Any):
    """One minibatch update of policy (PPO + ptx) and value; the experience itself is not changed."""
    mb = jax.tree.map(lambda x: jnp.take(x, indices, axis=0), experience)
    grads, pstats = policy_gradient(state.policy.params, models, mb, ptx, prompt_len=prompt_len,
                                    cfg=cfg)
    updates, opt_state = policy_opt.update(grads, state.policy.opt_state, state.policy.params)
    policy = TrainState(state.policy.step + 1, optax.apply_updates(state.policy.params, updates),
                        opt_state)

    (vloss, vstats), vgrads = jax.value_and_grad(
        functools.partial(value_objective, models=models, mb=mb, prompt_len=prompt_len, cfg=cfg),
        has_aux=True)(state.value.params)
    vupdates, vopt_state = value_opt.update(vgrads, state.value.opt_state, state.value.params)
    value = TrainState(state.value.step + 1, optax.apply_updates(state.value.params, vupdates),
                       vopt_state)

    ema = state.ema_params
    if cfg.ema_decay > 0:
        ema = ema_update(ema, policy.params, cfg.ema_decay)
    stats = dict(pstats, value_loss=vloss, policy_grad_norm=optax.global_norm(grads),
                 value_grad_norm=optax.global_norm(vgrads), **vstats)
    return PPOState(policy, value, ema), stats


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
    workdir = os.path.abspath(workdir)
    p = cfg.ppo
    mesh = common.setup_mesh(cfg)
    overrides = common.runtime_overrides(cfg)

    # Networks: policy (trained) and its frozen reference share one definition.
    policy, policy_params, tokenizer, _ = common.load_model(cfg.policy_from, mesh, **overrides)
    ref_params = jax.tree.map(jnp.copy, policy_params)
    reward, reward_params, _, reward_extra = common.load_model(cfg.reward_from, mesh, **overrides)
    value, value_params, _, _ = common.load_model(cfg.value_from or cfg.reward_from, mesh, **overrides)
    if reward.config.head != "scalar" or value.config.head != "scalar":
        raise ValueError(f"reward_from={cfg.reward_from!r} must be a reward model (scalar head)")
    if tokenizer is None:
        raise FileNotFoundError(f"policy_from={cfg.policy_from!r}: no tokenizer saved beside it")
    models = Models(policy, value, reward, reward_extra.get("reward_norm") or {})
    log.info("reward normalization: %s", models.reward_norm or "none")
    common.log_params(policy_params)

    prompts, ptx_arrays, prompt_rows = load_data(cfg, tokenizer)
    prompt_len = prompts["input_ids"].shape[1]
    if p.rollout_batch_size % p.minibatch_size:
        raise ValueError(f"ppo.rollout_batch_size={p.rollout_batch_size} must be a multiple of "
                         f"ppo.minibatch_size={p.minibatch_size}")
    n_minibatches = p.rollout_batch_size // p.minibatch_size
    check_batch_size("ppo.rollout_batch_size", p.rollout_batch_size, mesh)
    if p.ptx_coef > 0:
        check_batch_size("ppo.ptx_per_episode x ppo.minibatch_size",
                         p.ptx_per_episode * p.minibatch_size, mesh)
    iterators = {"prompts": BatchIterator(prompts, p.rollout_batch_size, seed=cfg.seed)}
    ptx_batch_size = p.ptx_per_episode * p.minibatch_size
    if ptx_arrays is not None:
        iterators["ptx"] = BatchIterator(ptx_arrays, ptx_batch_size, seed=cfg.seed + 1)
    n_iterations = p.iterations or math.ceil(p.total_episodes / p.rollout_batch_size)
    updates_per_iteration = p.epochs * n_minibatches

    # Optimizers: policy lr constant after warmup from 0.1x (paper); value lr fixed.
    policy_schedule = make_lr_schedule(p.lr, n_iterations * updates_per_iteration,
                                       warmup_steps=p.warmup_iterations * updates_per_iteration,
                                       decay="constant", warmup_start_fraction=0.1)
    policy_opt = make_optimizer(policy_schedule, b1=p.b1, b2=p.b2, grad_clip_norm=p.grad_clip_norm or None)
    value_opt = make_optimizer(p.value_lr, b1=p.b1, b2=p.b2, grad_clip_norm=p.grad_clip_norm or None)

    # State in its shardings: params, optimizer moments and EMA follow the rules table.
    policy_sh = train_state_shardings(policy, policy_opt, mesh)
    value_sh = train_state_shardings(value, value_opt, mesh)
    state_sh = PPOState(policy_sh, value_sh, policy_sh.params if p.ema_decay > 0 else {})
    state = jax.jit(lambda pp, vp: PPOState(
        TrainState(jnp.zeros((), jnp.int32), pp, policy_opt.init(pp)),
        TrainState(jnp.zeros((), jnp.int32), vp, value_opt.init(vp)),
        jax.tree.map(jnp.copy, pp) if p.ema_decay > 0 else {}), out_shardings=state_sh)(
            policy_params, value_params)
    del policy_params, value_params

    # Jitted steps, all with named shardings.
    replicated = NamedSharding(mesh, PartitionSpec())
    sampling = SamplingConfig(max_new_tokens=cfg.data.max_response_len, temperature=p.temperature,
                              top_k=p.top_k, top_p=p.top_p, greedy=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    generate = make_generate_fn(policy, sampling, mesh)
    exp_example = _experience_shapes(p.rollout_batch_size, prompt_len, cfg.data.max_response_len)
    exp_sh = {k: batch_sharding(mesh, len(s)) for k, s in exp_example.items()}
    p_sh, v_sh, r_sh = (param_shardings(m, mesh) for m in (policy, value, reward))
    rollout_sh = {k: batch_sharding(mesh, n) for k, n in
                  (("sequences", 2), ("attention_mask", 2), ("response_mask", 2), ("has_eos", 1))}
    experience_fn = jax.jit(
        functools.partial(make_experience, models, prompt_len=prompt_len, cfg=p),
        in_shardings=(p_sh, p_sh, v_sh, r_sh, rollout_sh, replicated), out_shardings=exp_sh)
    ptx_sh = ({k: batch_sharding(mesh, 2) for k in ("input_ids", "attention_mask", "position_ids",
                                                    "loss_mask")} if ptx_arrays is not None else None)
    update_fn = jax.jit(
        functools.partial(update_step, models=models, policy_opt=policy_opt, value_opt=value_opt,
                          prompt_len=prompt_len, cfg=p),
        in_shardings=(state_sh, exp_sh, replicated, ptx_sh), out_shardings=(state_sh, replicated),
        donate_argnums=0)

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    state, start_iteration, meta = common.resume(checkpointer, state, iterators)
    kl_coef = float(meta.get("kl_coef", p.kl_coef))
    writer = MetricsWriter(workdir)
    timer = StepTimer()
    bar = ProgressBar(n_iterations, desc=cfg.get("name", "ppo"), initial=start_iteration)
    log.info("PPO: %d iterations x %d episodes, %d epochs x %d minibatches of %d, ptx_coef %g",
             n_iterations, p.rollout_batch_size, p.epochs, n_minibatches, p.minibatch_size, p.ptx_coef)

    metrics: dict[str, float] = {}
    for it in range(start_iteration, n_iterations):
        it_rng = common.step_rng(cfg.seed, it)

        # 1. Rollout: sample one response per prompt with the current policy.
        prompt_batch = next(iterators["prompts"])
        with timer("rollout"):
            device_prompts = shard_batch({k: prompt_batch[k] for k in ("input_ids", "attention_mask")}, mesh)
            rollout = generate(state.policy.params, device_prompts["input_ids"],
                               device_prompts["attention_mask"], it_rng)
            rollout = _rollout_for_experience(rollout, sampling.eos_token_id)
            jax.block_until_ready(rollout)

        # 2. Experience: log-probs, reference log-probs, values, scores, rewards, GAE, once.
        with timer("experience"):
            experience = experience_fn(state.policy.params, ref_params, state.value.params,
                                       reward_params, rollout, jnp.float32(kl_coef))
            jax.block_until_ready(experience)

        # 3. Update: epochs x minibatches over the frozen experience; PPO + ptx in one gradient.
        update_stats = []
        with timer("update"):
            order_rng = np.random.default_rng([cfg.seed, it])
            for epoch in range(p.epochs):
                order = order_rng.permutation(p.rollout_batch_size)
                for mb in range(n_minibatches):
                    indices = jnp.asarray(order[mb * p.minibatch_size:(mb + 1) * p.minibatch_size])
                    ptx_batch = (shard_batch(next(iterators["ptx"]), mesh)
                                 if ptx_arrays is not None else None)
                    state, stats = update_fn(state, experience, indices, ptx_batch)
                    update_stats.append(stats)
            update_stats = jax.device_get(update_stats)

        # 4. Log, adapt the KL coefficient, checkpoint.
        summary = summarize(experience, update_stats, kl_coef)
        n_tokens = float(summary.pop("_n_tokens"))
        times = timer.pop()
        metrics = summary | times | {
            "objective/kl_coef": kl_coef,
            "policy/lr": float(current_lr(policy_schedule, int(state.policy.step))),
            "tokens/s": n_tokens / max(sum(times.values()), 1e-9),
            "episodes": (it + 1) * p.rollout_batch_size}
        writer.write(it + 1, metrics)
        if p.sample_every and ((it + 1) % p.sample_every == 0 or it == start_iteration):
            writer.write_table(it + 1, "samples", sample_table(
                tokenizer, experience, prompt_len, p.n_samples_logged))
        kl_coef = next_kl_coef(kl_coef, summary["objective/kl"], p)
        bar.update(tokens=int(n_tokens), score=summary["objective/scores"], kl=summary["objective/kl"])
        if p.checkpoint_every and (it + 1) % p.checkpoint_every == 0 and it + 1 < n_iterations:
            checkpointer.save(it + 1, state, {"iterators": common.iterator_states(iterators),
                                              "kl_coef": kl_coef})
    bar.close()
    checkpointer.wait()
    final_policy = policy.clone(config=policy.config.replace(dropout=0.0))
    save_our_checkpoint(os.path.join(workdir, "model"), final_policy, state.policy.params,
                            tokenizer, extra={"stage": cfg.get("name", "ppo"), "ptx_coef": p.ptx_coef,
                                              "iterations": n_iterations}, overwrite=True)
    if p.ema_decay > 0:
        save_our_checkpoint(os.path.join(workdir, "model_ema"), final_policy, state.ema_params,
                                tokenizer, extra={"stage": cfg.get("name", "ppo"), "ema_decay": p.ema_decay}, overwrite=True)
    writer.close()
    checkpointer.close()
    return metrics


def _experience_shapes(batch: int, prompt_len: int, n: int) -> dict[str, tuple[int, ...]]:
    t = prompt_len + n
    shapes = {"sequences": (batch, t), "attention_mask": (batch, t), "scores": (batch,)}
    for key in ("response_mask", "old_logprobs", "ref_logprobs", "old_values", "rewards", "kl",
                "advantages", "returns"):
        shapes[key] = (batch, n)
    return shapes


def _rollout_for_experience(rollout: dict, eos_token_id: int | None) -> dict:
    """Keep what the experience pass needs; flag responses that ended with EOS."""
    mask = rollout["response_mask"]
    if eos_token_id is None:
        has_eos = jnp.ones(mask.shape[:1], bool)
    else:
        has_eos = jnp.any((rollout["response_ids"] == eos_token_id) & (mask > 0), axis=-1)
    return {"sequences": rollout["sequences"], "attention_mask": rollout["attention_mask"],
            "response_mask": mask, "has_eos": has_eos}


def next_kl_coef(kl_coef: float, kl: float, p: Any) -> float:
    if p.kl_controller == "adaptive":
        return float(obj.adaptive_kl_update(kl_coef, kl, p.rollout_batch_size, p.kl_target,
                                            p.kl_horizon))
    if p.kl_controller != "fixed":
        raise ValueError(f"ppo.kl_controller={p.kl_controller!r}; expected 'fixed' or 'adaptive'")
    return float(obj.fixed_kl_update(kl_coef, kl, p.rollout_batch_size))


def summarize(experience: Batch, update_stats: list[dict], kl_coef: float) -> dict[str, float]:
    """TRL-compatible metric names, from the experience and the minibatch statistics."""
    exp = jax.device_get({k: experience[k] for k in ("kl", "scores", "response_mask", "rewards")})
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
        "loss/value_avg": mean("value_loss"),
        "val/var_explained": mean("explained_variance"),
        "val/clipfrac_avg": mean("vf_clipfrac"),
        "response/length_mean": float(exp["response_mask"].sum(-1).mean()),
        "_n_tokens": float(exp["response_mask"].sum()),
    }
    if "ptx_loss" in update_stats[0]:
        out["ptx/loss"] = mean("ptx_loss")
    return out


def sample_table(tokenizer: Any, experience: Batch, prompt_len: int, n: int) -> list[dict]:
    """A few (prompt, response, score, KL) rows for the samples table."""
    exp = jax.device_get({k: experience[k] for k in ("sequences", "attention_mask", "response_mask",
                                                      "scores", "kl")})
    rows = []
    for i in range(min(n, len(exp["scores"]))):
        prompt_ids = exp["sequences"][i, :prompt_len][exp["attention_mask"][i, :prompt_len] > 0]
        response_ids = exp["sequences"][i, prompt_len:][exp["response_mask"][i] > 0]
        rows.append({"prompt": tokenizer.decode(prompt_ids.tolist()),
                     "response": tokenizer.decode(response_ids.tolist()),
                     "score": float(exp["scores"][i]), "kl": float(exp["kl"][i].sum())})
    return rows
