"""Direct preference optimization (Rafailov et al. 2023): the policy trained on comparisons.

DPO skips the reward model and PPO: with the implicit reward r = beta * (log pi(y|x) -
log ref(y|x)), the RM's pair loss -log sigmoid(r_w - r_l) trains the policy directly, and the
frozen reference (the SFT model) keeps it close, as PPO's KL penalty does.

Data are the RM's: a batch element is one prompt with its K (2..max_k) ranked completions, so a
K-way ranking gives all its C(K, 2) pairs for K policy and K reference forwards (a TRL
chosen/rejected pair is K = 2). One step, as the loop below reads:

  1. ref_logps  the reference's summed response log-probs of every completion of the batch
                ([B, K] float32), once per batch, without gradient
  2. update     the policy's log-probs of the same completions (all B*K in one forward, dropout
                on), ``objectives.dpo_loss`` over every strict pair, one optimizer step
  3. log / validate / checkpoint

The model is saved to ``<workdir>/model`` as SFT saves its own, so ``eval`` and PPO load it.

    rlhf-jax dpo --config experiments/tiny_dpo.py --workdir runs/dpo \
        --config.init_from=runs/sft/model --config.data.train=comparisons.jsonl
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import objectives as obj
from rlhf_jax import model_io, reliability, runtime, scoring, storage
from rlhf_jax.data import BatchIterator
from rlhf_jax.errors import ConfigError, Preempted
from rlhf_jax.metrics import MetricsWriter, ProgressBar, TraceWindow
from rlhf_jax.models.params import abstract_params, init_params
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.optim import current_lr
from rlhf_jax.program import Program, Step, abstract_batch, abstract_key, random_batch
from rlhf_jax.sharding import (as_auto_mesh, batch_sharding, check_batch_size, replicated,
                               shard_batch)
from rlhf_jax.stages import supervised
from rlhf_jax.train_state import (TrainState, abstract_train_state, apply_gradients,
                                  create_train_state, shardings_of)

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "response_mask", "ranks", "valid")


# --- the objective as pure functions -----------------------------------------------------------

def sequence_logprobs(model: Transformer, params: Any, batch: dict[str, jax.Array], *,
                      prompt_len: int, chunk: int = 0, rng: jax.Array | None = None) -> jax.Array:
    """[B, K] float32 sum of log pi(y_t | x, y_<t) over each completion's response tokens.

    All B*K completions go through one forward. Prompts are left-padded to ``prompt_len``, so
    every response starts there and the LM head runs on the N response positions only,
    ``chunk`` at a time (``scoring.chunked_token_logprobs``). Padding slots (copies of
    completion 0) are summed like the rest; ``dpo_loss`` drops them by ``valid``.
    """
    b, k, t = batch["input_ids"].shape
    flat = lambda x: x.reshape(b * k, t)
    ids = flat(batch["input_ids"])
    hidden = scoring.hidden_states(model, params, ids, flat(batch["attention_mask"]),
                                   flat(batch["position_ids"]), rng)
    logprobs = scoring.chunked_token_logprobs(model, params, hidden[:, prompt_len - 1:-1],
                                              ids[:, prompt_len:], chunk=chunk)["logprobs"]
    mask = flat(batch["response_mask"])[:, prompt_len:]
    return obj.masked_sum(logprobs, mask, axis=-1).reshape(b, k)


def reference_logprobs(reference: Any, batch: dict[str, jax.Array], *, model: Transformer,
                       prompt_len: int, chunk: int = 0) -> jax.Array:
    """The frozen reference's [B, K] sequence log-probs: deterministic, no gradient."""
    return jax.lax.stop_gradient(sequence_logprobs(model, reference, batch,
                                                   prompt_len=prompt_len, chunk=chunk))


def dpo_objective(params: Any, batch: dict[str, jax.Array], ref_logps: jax.Array,
                  rng: jax.Array | None, *, model: Transformer, beta: float, prompt_len: int,
                  chunk: int = 0) -> tuple[jax.Array, dict]:
    """DPO over every strict pair of each prompt's ranking (``objectives.dpo_loss``)."""
    policy_logps = sequence_logprobs(model, params, batch, prompt_len=prompt_len, chunk=chunk,
                                     rng=rng)
    return obj.dpo_loss(policy_logps, ref_logps, batch["ranks"], batch["valid"], beta)


def update_step(state: TrainState, batch: dict[str, jax.Array], ref_logps: jax.Array,
                rng: jax.Array, *, model: Transformer, optimizer: optax.GradientTransformation,
                beta: float, prompt_len: int, chunk: int = 0) -> tuple[TrainState, dict]:
    """One optimizer step on the DPO loss of one batch, given its reference log-probs."""
    (loss, metrics), grads = jax.value_and_grad(dpo_objective, has_aux=True)(
        state.params, batch, ref_logps, rng, model=model, beta=beta, prompt_len=prompt_len,
        chunk=chunk)
    return apply_gradients(state, grads, optimizer), dict(metrics, loss=loss,
                                                          grad_norm=optax.global_norm(grads))


def eval_step(params: Any, reference: Any, batch: dict[str, jax.Array], *, model: Transformer,
              beta: float, prompt_len: int, chunk: int = 0) -> dict[str, jax.Array]:
    """Validation metrics of one batch (reference and policy both deterministic)."""
    ref_logps = reference_logprobs(reference, batch, model=model, prompt_len=prompt_len,
                                   chunk=chunk)
    loss, metrics = dpo_objective(params, batch, ref_logps, None, model=model, beta=beta,
                                  prompt_len=prompt_len, chunk=chunk)
    return dict(metrics, loss=loss)


# --- the compiled steps, without weights or data ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DPOPlan:
    prompt_len: int
    max_k: int                   # completions per prompt in a batch element

def build(cfg: Any, mesh: Mesh, *, model: Transformer | None = None, total_steps: int | None = None,
          model_overrides: dict | None = None, max_k: int | None = None) -> Program:
    """DPO's ``ref_logps``, ``update`` and ``eval`` steps for ``cfg`` on ``mesh``, from shapes.

    The architecture comes from ``model``, else ``cfg.model`` or ``cfg.init_from``'s stored
    config; the reference has the policy's definition and shardings. A batch (training and
    validation alike) is ``train.batch_size`` prompts x ``max_k`` completions (default
    ``data.max_k``; ``train`` passes the largest K of its data, so TRL pairs compile for K = 2).
    """
    mesh = as_auto_mesh(mesh)
    overrides = {**model_io.runtime_overrides(cfg), "dropout": cfg.train.dropout,
                 **(model_overrides or {})}
    model = model_io.stage_model(model, cfg.get("model"), cfg.init_from, mesh, overrides)
    check_language_model(model, cfg.init_from)
    optimizer, schedule = supervised.optimizer_from(cfg.optim,
                                                    total_steps or cfg.train.steps or 1000)
    state = abstract_train_state(model, optimizer, mesh)
    reference = abstract_params(model, mesh)
    b, k = cfg.train.batch_size, max_k or cfg.data.max_k
    prompt_len = cfg.data.max_prompt_len
    t = prompt_len + cfg.data.max_response_len
    check_batch_size("train.batch_size", b, mesh)

    batch = abstract_batch({
        "input_ids": ((b, k, t), jnp.int32), "attention_mask": ((b, k, t), jnp.int32),
        "position_ids": ((b, k, t), jnp.int32), "response_mask": ((b, k, t), jnp.float32),
        "ranks": ((b, k), jnp.int32), "valid": ((b, k), jnp.bool_)},
        functools.partial(batch_sharding, mesh))
    ref_logps = jax.ShapeDtypeStruct((b, k), jnp.float32, sharding=batch_sharding(mesh, 2))

    # The jitted steps, every input and output sharding named; the state is donated.
    rep = replicated(mesh)
    state_sh, ref_sh = shardings_of(state), shardings_of(reference)
    fixed = dict(model=model, prompt_len=prompt_len, chunk=cfg.train.logprob_chunk)
    beta = float(cfg.beta)
    ref_fn = jax.jit(functools.partial(reference_logprobs, **fixed),
                     in_shardings=(ref_sh, shardings_of(batch)), out_shardings=ref_logps.sharding)
    update_fn = jax.jit(functools.partial(update_step, optimizer=optimizer, beta=beta, **fixed),
                        in_shardings=(state_sh, shardings_of(batch), ref_logps.sharding, rep),
                        out_shardings=(state_sh, rep), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, beta=beta, **fixed),
                      in_shardings=(state_sh.params, ref_sh, shardings_of(batch)),
                      out_shardings=rep)
    tokens = b * k * t
    steps = {"ref_logps": Step("ref_logps", ref_fn, (reference, batch), tokens),
             "update": Step("update", update_fn, (state, batch, ref_logps, abstract_key(rep)),
                            tokens),
             "eval": Step("eval", eval_fn, (state.params, reference, batch), tokens)}

    def init_state(rng):
        """Random policy; the reference is a copy of it, as at the start of DPO."""
        params = init_params(model, rng, mesh)
        return (create_train_state(params, optimizer, state_sh), frozen_copy(reference, params))

    def random_args(name, state_, frozen, rng):
        seed = int(jax.random.randint(rng, (), 0, 2**30))
        vocab = model.config.vocab_size
        if name == "ref_logps":
            return frozen, random_batch(batch, vocab, seed)
        if name == "update":
            return state_, random_batch(batch, vocab, seed), random_batch(ref_logps, vocab), rng
        if name == "eval":
            return state_.params, frozen, random_batch(batch, vocab, seed)
        raise KeyError(f"DPO has no step {name!r}; steps: {sorted(steps)}")

    return Program("dpo", mesh, {"policy": model}, state, reference, steps, init_state,
                   random_args, {"ref_logps": 1, "update": 1, "eval": 0}, optimizer, schedule,
                   DPOPlan(prompt_len=prompt_len, max_k=k))


def check_language_model(model: Transformer, source: str) -> None:
    """DPO trains a policy: a reward model's scalar head has no token distribution."""
    if model.config.head != "lm":
        raise ConfigError(f"init_from={source!r}: a model with a {model.config.head!r} head; "
                          "expected a language model (the SFT model directory)")


def frozen_copy(reference: Any, params: Any) -> Any:
    """A copy of ``params`` in the reference's shardings: its own buffers, so donating the
    policy's state in ``update`` never frees the reference."""
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                   out_shardings=shardings_of(reference))(params)


# --- data --------------------------------------------------------------------------------------

def load_arrays(cfg: Any, tokenizer: Any) -> tuple[dict, dict | None]:
    """(train, validation or None) ``[N, K, T]`` comparison arrays, K the largest ranking in
    the data (at most ``data.max_k``): pairs-only data is not padded to 9 completions."""
    train_rows, valid_rows = supervised.comparison_rows(cfg.data, cfg.seed)
    max_k = max(len(row["completions"]) for row in train_rows + valid_rows)
    train = supervised.comparison_arrays(train_rows, tokenizer, cfg.data, max_k, BATCH_KEYS,
                                         "train")
    valid = (supervised.comparison_arrays(valid_rows, tokenizer, cfg.data, max_k, BATCH_KEYS,
                                          "valid")
             if valid_rows else None)
    return train, valid


def load_reference(cfg: Any, model: Transformer, mesh: Mesh) -> Any | None:
    """The reference's weights from ``reference_from``, or None: the policy's own start (the
    ``init_from`` weights) is the reference, loaded once."""
    source = cfg.get("reference_from") or ""
    if not source or source == cfg.get("init_from"):
        return None
    ref_model, params, _, _ = model_io.load_model(source, mesh, **model_io.runtime_overrides(cfg))
    shapes = lambda m: jax.tree.map(lambda a: a.shape, abstract_params(m))
    if ref_model.config.head != "lm" or shapes(ref_model) != shapes(model):
        raise ConfigError(f"reference_from={source!r}: a different architecture; expected the "
                          "policy's (init_from) network, as DPO scores both on the same tokens")
    return params


# --- the loop ----------------------------------------------------------------------------------

def train(cfg: Any, workdir: str) -> dict[str, float]:
    """Train the policy with DPO; returns the final validation metrics and the last step's.

    SIGTERM / SIGINT finish the current step, save a checkpoint and raise Preempted; a NaN / Inf
    loss, gradient norm or parameter raises NonFiniteError (see ``rlhf_jax.reliability``).
    """
    workdir = storage.absolute(workdir)
    name = cfg.name
    with supervised.stage_run(cfg, workdir) as (stack, preemption, mesh):

        # Networks: the policy starts from the SFT model, which is also the frozen reference.
        model, params, tokenizer, _ = model_io.init_or_load_model(
            cfg, mesh, jax.random.key(cfg.seed), dropout=cfg.train.dropout)
        check_language_model(model, cfg.init_from)
        reference_params = load_reference(cfg, model, mesh)
        model_io.log_params(params)

        # Data: the RM's comparisons, every ranking with its K completions in one element.
        train_arrays, valid_arrays = load_arrays(cfg, tokenizer)
        check_batch_size("train.batch_size", cfg.train.batch_size, mesh)
        iterators = {"train": BatchIterator(train_arrays, cfg.train.batch_size, seed=cfg.seed)}
        steps_per_epoch = max(1, iterators["train"].steps_per_epoch)
        total_steps = cfg.train.steps or int(math.ceil(cfg.train.epochs * steps_per_epoch))

        # The compiled steps, then the state and the reference in their shardings.
        program = build(cfg, mesh, model=model, total_steps=total_steps,
                        max_k=train_arrays["input_ids"].shape[1])
        ref_logps_fn, update_fn, eval_fn = (program.steps[k].fn
                                            for k in ("ref_logps", "update", "eval"))
        reference = frozen_copy(program.frozen,
                                params if reference_params is None else reference_params)
        state = create_train_state(params, program.optimizer, shardings_of(program.state))
        del params, reference_params
        evaluate = lambda params_, batch: eval_fn(params_, reference, batch)
        valid_batches = (supervised.fixed_batches(valid_arrays, cfg.train.batch_size)
                         if valid_arrays else [])

        checkpointer = stack.enter_context(ckpt_lib.Checkpointer(
            storage.join(workdir, "checkpoints"), max_to_keep=cfg.train.keep_checkpoints))
        state, start_step, _ = reliability.resume(checkpointer, state, iterators, cfg)
        guard = reliability.FiniteGuard(name, ("loss", "grad_norm"), checkpointer)
        meta = lambda: reliability.checkpoint_meta(cfg, iterators)
        writer = stack.enter_context(MetricsWriter(workdir, config=cfg))
        writer.discard_after(start_step)
        bar = stack.enter_context(ProgressBar(total_steps, desc=name, initial=start_step))
        log.info("DPO: %d steps of %d prompts x K=%d, beta %g", total_steps,
                 cfg.train.batch_size, program.plan.max_k, cfg.beta)
        trace = TraceWindow(cfg.profile_steps, storage.join(workdir, "profile"))
        stack.callback(trace.close)
        if preemption.requested():
            raise Preempted(preemption.signum)    # nothing done since the last checkpoint

        metrics: dict = {}
        for step in range(start_step, total_steps):
            trace.step(step)
            host_batch = next(iterators["train"])
            batch = shard_batch(host_batch, mesh)

            # 1. The reference's log-probs of every completion of the batch, once, no gradient.
            with jax.profiler.TraceAnnotation("ref_logps"):
                ref_logps = ref_logps_fn(reference, batch)

            # 2. The policy's log-probs, DPO over every strict pair, one optimizer step.
            with jax.profiler.TraceAnnotation("update"):
                state, metrics = update_fn(state, batch, ref_logps,
                                           runtime.step_rng(cfg.seed, step))
            guard.observe(step + 1, metrics)
            bar.update(tokens=real_tokens(host_batch))

            # 3. Log, validate, checkpoint; SIGTERM / SIGINT stop here with a checkpoint.
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps:
                lr = float(current_lr(program.schedule, step))
                row = supervised.train_log_row(metrics, lr, step, steps_per_epoch, bar)
                writer.write(step + 1, row)
                bar.set_postfix(loss=row["train/loss"], pair_accuracy=row["train/pair_accuracy"])
                guard.check()
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 \
                    and step + 1 < total_steps:
                supervised.validate(evaluate, state.params, valid_batches, mesh, "n_pairs", writer,
                                    step + 1)
            if (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < total_steps:
                reliability.save_checkpoint(checkpointer, step + 1, state, meta(), guard)
            reliability.stop_if_preempted(preemption, checkpointer, step + 1, state, meta, guard)
        bar.close()
        guard.check()
        guard.check_tree(total_steps, state.params, "params")
        final = supervised.validate(evaluate, state.params, valid_batches, mesh, "n_pairs", writer,
                                    total_steps)
        checkpointer.wait()
        model_io.save_our_checkpoint(storage.join(workdir, "model"), model.clone(
            config=model.config.replace(dropout=0.0)), state.params, tokenizer,
            extra={"stage": name, "beta": float(cfg.beta), "steps": total_steps, **final},
            overwrite=True)
    log.info("finished %d steps; %s", total_steps, final)
    last = supervised.as_float_dict(metrics, "train/") if metrics else {}
    return final | last


def real_tokens(host_batch: dict[str, np.ndarray]) -> int:
    """Tokens of the real completions of a host batch (padding slots excluded), all processes."""
    per_slot = host_batch["attention_mask"].sum(-1) * host_batch["valid"]
    return int(per_slot.sum()) * jax.process_count()
