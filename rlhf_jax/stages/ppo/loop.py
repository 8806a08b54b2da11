"""PPO's training loop: load the roles, then rollout -> experience -> update, every iteration.

SIGTERM / SIGINT finish the current iteration, save a checkpoint and raise Preempted; a NaN /
Inf loss, gradient norm or parameter raises NonFiniteError (see ``rlhf_jax.reliability``).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import objectives as obj
from rlhf_jax import locking, reliability, runtime, storage
from rlhf_jax.data import BatchIterator, tokenize_pretrain, tokenize_prompts
from rlhf_jax.data.sources import read_source, source_options
from rlhf_jax.errors import ConfigError, Preempted
from rlhf_jax.metrics import MetricsWriter, ProgressBar, StepTimer, TraceWindow
from rlhf_jax.model_io import save_our_checkpoint
from rlhf_jax.optim import current_lr
from rlhf_jax.sharding import shard_batch
from rlhf_jax.stages.ppo import roles as roles_lib
from rlhf_jax.stages.ppo.program import PTX_KEYS, build
from rlhf_jax.stages.ppo.roles import PPOState

log = logging.getLogger(__name__)


def train(cfg: Any, workdir: str) -> dict[str, float]:
    """Run PPO / PPO-ptx (or GRPO / RLOO); returns the last iteration's metrics."""
    workdir, p, name = storage.absolute(workdir), cfg.ppo, cfg.name
    outputs = ["checkpoints", "model", "lora"] + (["model_ema"] if p.ema_decay > 0 else [])
    reliability.check_writable(workdir, *(storage.join(workdir, out) for out in outputs))
    # Left in reverse order on any exit: the bar is closed, pending checkpoint saves are
    # committed (never left as *-tmp), the previous signal handlers come back, the lock goes.
    with contextlib.ExitStack() as stack:
        stack.enter_context(locking.RunLock(workdir))
        preemption = stack.enter_context(reliability.Preemption())
        mesh = runtime.setup_mesh(cfg)
        loaded = roles_lib.load_networks(cfg, mesh)
        tokenizer = loaded.tokenizer
        program = build(cfg, mesh, models=loaded.models, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
        plan, roles = program.plan, program.plan.roles
        executables = runtime.compile_ahead(   # in the background while the rest is set up
            program, [k for k in ("sync", "rollout", "experience", "update", "value_update")
                      if k in program.steps])
        state, frozen = roles_lib.initial_state(program, loaded, cfg.seed)
        policy_base, value_base = roles.policy.base(frozen), roles.value.base(frozen)
        del loaded

        iterators = make_iterators(cfg, tokenizer, plan)
        checkpointer = stack.enter_context(ckpt_lib.Checkpointer(
            storage.join(workdir, "checkpoints"), max_to_keep=2))
        state, start, meta = reliability.resume(checkpointer, state, iterators, cfg)
        kl_coef = float(meta.get("kl_coef", p.kl_coef))
        guard = reliability.FiniteGuard(name, checkpointer=checkpointer)
        checkpoint_meta = lambda: reliability.checkpoint_meta(cfg, iterators, kl_coef=kl_coef)
        writer = stack.enter_context(MetricsWriter(workdir, config=cfg))
        writer.discard_after(start, tables=("samples",))
        timer = StepTimer()
        trace = TraceWindow(cfg.profile_steps, storage.join(workdir, "profile"))
        stack.callback(trace.close)
        # Counted in episodes (tqdm scales each iteration by the rollout batch): episodes/s.
        bar = stack.enter_context(ProgressBar(plan.n_iterations, desc=name, initial=start,
                                              unit="episode", unit_scale=p.rollout_batch_size))
        log.info("PPO: %d iterations x %d episodes (%d prompts x %d), %d epochs x %d minibatches "
                 "of %d, advantage %s, ptx_coef %g", plan.n_iterations, p.rollout_batch_size,
                 plan.prompts_per_rollout, plan.group_size, p.epochs, plan.n_minibatches,
                 p.minibatch_size, p.advantage, p.ptx_coef)
        if preemption.requested():
            raise Preempted(preemption.signum)    # nothing done since the last checkpoint
        side = stack.enter_context(runtime.SideThread())
        step = {k: f.result() for k, f in executables.items()}

        metrics: dict[str, float] = {}
        for it in range(start, plan.n_iterations):
            trace.step(it)
            it_rng = runtime.step_rng(cfg.seed, it)

            # 1. Rollout: G responses per prompt (G = 1 for GAE) from the current policy, copied
            #    once into the sampler's layout and dtype (ppo.sampler).
            prompt_batch = repeat_prompts(next(iterators["prompts"]), plan.group_size)
            with timer("rollout"):
                sampler_weights = step["sync"](state.policy.params, policy_base)
                batch = shard_batch({k: prompt_batch[k] for k in ("input_ids", "attention_mask")},
                                    mesh)
                rollout = step["rollout"](sampler_weights, batch["input_ids"],
                                          batch["attention_mask"], it_rng)
                jax.block_until_ready(rollout)
                del sampler_weights

            # 2. Experience, once: log-probs, reference log-probs, values, scores, rewards and
            #    advantages (GAE, or against the group).
            with timer("experience"):
                experience = step["experience"](state.policy.params, roles.value_trainable(state),
                                                frozen, rollout, jnp.float32(kl_coef))
                jax.block_until_ready(experience)

            # 3. Update: epochs x minibatches over the frozen experience. Each policy step sums
            #    the PPO and gamma_ptx x pretraining gradients into one update. The value steps
            #    read nothing the policy steps write, so they run on a second core meanwhile.
            with timer("update"):
                order = np.random.default_rng([cfg.seed, it])
                minibatches = [jnp.asarray(perm[i:i + p.minibatch_size])
                               for perm in (order.permutation(p.rollout_batch_size)
                                            for _ in range(p.epochs))
                               for i in range(0, p.rollout_batch_size, p.minibatch_size)]
                value_job = side.submit(run_value_updates, step.get("value_update"), state.value,
                                        experience, minibatches, value_base)
                policy_state, ema_params, policy_stats = state.policy, state.ema_params, []
                for indices in minibatches:
                    ptx_batch = (shard_batch(next(iterators["ptx"]), mesh)
                                 if "ptx" in iterators else None)
                    policy_state, ema_params, stats = step["update"](
                        policy_state, ema_params, experience, indices, ptx_batch, policy_base)
                    policy_stats.append(stats)
                value_state, value_stats = value_job.result()
                state = PPOState(policy_state, value_state, ema_params)
                update_stats = [a | b for a, b in zip(*jax.device_get((policy_stats, value_stats)))]

            # 4. Log, adapt the KL coefficient, checkpoint.
            summary = summarize(experience, update_stats, kl_coef)
            n_tokens, times = float(summary.pop("_n_tokens")), timer.pop()
            metrics = summary | times | {
                "objective/kl_coef": kl_coef,
                "policy/lr": current_lr(plan.policy_schedule, int(state.policy.step)),
                "tokens/s": n_tokens / max(sum(times.values()), 1e-9),
                "episodes": (it + 1) * p.rollout_batch_size}
            writer.write(it + 1, metrics)
            guard.check_values(it + 1, {   # every minibatch's losses and gradient norms
                key: [s[key] for s in update_stats] for key in
                ("policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm", "ptx_loss")
                if key in update_stats[0]})
            if p.sample_every and ((it + 1) % p.sample_every == 0 or it == start):
                writer.write_table(it + 1, "samples", sample_table(
                    tokenizer, experience, plan.prompt_len, p.n_samples_logged))
            kl_coef = next_kl_coef(kl_coef, summary["objective/kl"], p)
            bar.update(tokens=int(n_tokens), score=summary["objective/scores"],
                       kl=summary["objective/kl"])
            if p.checkpoint_every and (it + 1) % p.checkpoint_every == 0 and it + 1 < plan.n_iterations:
                reliability.save_checkpoint(checkpointer, it + 1, state, checkpoint_meta(), guard)
            reliability.stop_if_preempted(preemption, checkpointer, it + 1, state, checkpoint_meta,
                                          guard)
        bar.close()
        save_outputs(workdir, cfg, state, frozen, roles, tokenizer, guard, checkpointer,
                     plan.n_iterations)
    return metrics


def save_outputs(workdir: str, cfg: Any, state: PPOState, frozen: Any, roles: Any, tokenizer: Any,
                 guard: reliability.FiniteGuard, checkpointer: Any, n_iterations: int) -> None:
    """``model/`` (and ``model_ema/``): the policy's whole weights (merged under LoRA, with
    ``lora/`` holding the adapters alone), after a last check that they are finite."""
    p = cfg.ppo
    guard.check_tree(n_iterations, state.policy.params, "policy")
    if p.ema_decay > 0:
        guard.check_tree(n_iterations, state.ema_params, "ema")
    checkpointer.wait()
    policy = roles.policy.model
    final_policy = policy.clone(config=policy.config.replace(dropout=0.0))
    roles_lib.save_adapters(storage.join(workdir, "lora"), roles.policy, state.policy.params,
                            cfg.policy_from)
    save_our_checkpoint(storage.join(workdir, "model"), final_policy,
                        roles_lib.exported_policy(roles, state.policy.params, frozen), tokenizer,
                        extra={"stage": cfg.name, "ptx_coef": p.ptx_coef,
                               "iterations": n_iterations, **roles.facts(p)}, overwrite=True)
    if p.ema_decay > 0:
        save_our_checkpoint(storage.join(workdir, "model_ema"), final_policy,
                            roles_lib.exported_policy(roles, state.ema_params, frozen), tokenizer,
                            extra={"stage": cfg.name, "ema_decay": p.ema_decay}, overwrite=True)


# --- helpers -----------------------------------------------------------------------------------

def make_iterators(cfg: Any, tokenizer: Any, plan: Any) -> dict[str, BatchIterator]:
    """Resumable batch iterators: prompts (one rollout's worth of groups) and, for PPO-ptx,
    pretraining rows (one update's worth)."""
    prompts, ptx_arrays = load_data(cfg, tokenizer, plan.prompt_len)
    iterators = {"prompts": BatchIterator(prompts, plan.prompts_per_rollout, seed=cfg.seed)}
    if ptx_arrays is not None:
        iterators["ptx"] = BatchIterator(ptx_arrays, plan.ptx_rows, seed=cfg.seed + 1)
    return iterators


def load_data(cfg: Any, tokenizer: Any, prompt_len: int) -> tuple[dict, dict | None]:
    """(prompt arrays, ptx arrays or None)."""
    data = cfg.data
    rows = read_source(data.prompts, "prompts", **source_options(data))
    arrays, stats = tokenize_prompts(rows, tokenizer, data.max_prompt_len, data.overlong)
    stats.log(log)
    if arrays["input_ids"].shape[1] != prompt_len:
        raise ValueError(f"prompts tokenized to {arrays['input_ids'].shape[1]} tokens; expected "
                         f"data.max_prompt_len={prompt_len}")
    prompts = {k: arrays[k] for k in ("input_ids", "attention_mask", "row_index")}
    if cfg.ppo.ptx_coef <= 0:
        return prompts, None
    ptx_rows = read_source(data.pretrain, "pretrain", **source_options(data, mapped=False))
    ptx_arrays, stats = tokenize_pretrain(ptx_rows, tokenizer, data.ptx_seq_len, "chunk")
    stats.log(log)
    return prompts, {k: ptx_arrays[k] for k in PTX_KEYS}


def repeat_prompts(batch: dict[str, np.ndarray], g: int) -> dict[str, np.ndarray]:
    """Each prompt G times in a row (group-major: prompt b owns rows b*G .. b*G + G-1), as the
    group advantages expect; G = 1 is the batch itself."""
    return batch if g == 1 else {k: np.repeat(v, g, axis=0) for k, v in batch.items()}


def run_value_updates(value_update_fn: Any, value: Any, experience: Any,
                      minibatches: list[jax.Array], base: Any) -> tuple[Any, list[dict]]:
    """The value network's steps of one iteration, in the policy's minibatch order (none, and
    no statistics, without a value network)."""
    if value_update_fn is None:
        return value, [{}] * len(minibatches)
    stats = []
    for indices in minibatches:
        value, step_stats = value_update_fn(value, experience, indices, base)
        stats.append(step_stats)
    return value, stats


def next_kl_coef(kl_coef: float, kl: float, p: Any) -> float:
    if p.kl_controller == "adaptive":
        return float(obj.adaptive_kl_update(kl_coef, kl, p.rollout_batch_size, p.kl_target,
                                            p.kl_horizon))
    if p.kl_controller != "fixed":
        raise ConfigError(f"ppo.kl_controller={p.kl_controller!r}; expected 'fixed' or 'adaptive'")
    return float(obj.fixed_kl_update(kl_coef, kl, p.rollout_batch_size))


def _host_values(experience: Any, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Full values of some experience fields on every process (a collective across processes:
    the experience is batch-sharded over every host's devices)."""
    from rlhf_jax.distributed import fetch
    return fetch({k: getattr(experience, k) for k in keys})


def summarize(experience: Any, update_stats: list[dict], kl_coef: float) -> dict[str, float]:
    """TRL-compatible metric names, from the experience and the minibatch statistics.

    Every process calls this (the KL controller needs the summary everywhere) and gets the
    same numbers."""
    exp = _host_values(experience, ("kl", "scores", "response_mask", "sampler_gap"))
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
    mask = exp["response_mask"] > 0
    gap = exp["sampler_gap"][mask]
    out |= {"sampler/logprob_gap_mean": float(gap.mean()) if gap.size else 0.0,
            "sampler/logprob_gap_max": float(gap.max()) if gap.size else 0.0}
    out |= {"response/length_mean": float(exp["response_mask"].sum(-1).mean()),
            "_n_tokens": float(exp["response_mask"].sum())}
    if "k3_kl" in update_stats[0]:
        out["policy/k3_kl_avg"] = mean("k3_kl")
    if "ptx_loss" in update_stats[0]:
        out["ptx/loss"] = mean("ptx_loss")
    return out


def sample_table(tokenizer: Any, experience: Any, prompt_len: int, n: int) -> list[dict]:
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
