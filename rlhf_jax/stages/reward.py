"""Stage 2: the reward model, trained on K-way rankings with InstructGPT's loss (Eq. 1).

Every batch element is one prompt with its K (2..max_k) ranked completions. All K completions
of the batch go through the network in one forward pass (``[B*K, T]``), the reward is read at the
last real token, and the loss averages ``-log sigmoid(r_w - r_l)`` over the prompt's C(K, 2)
pairs before averaging over prompts. ``mode = "shuffled_pairs"`` instead makes every pair its own
example (the baseline the paper says overfits).

After training, the bias (and optionally the gain) that makes labeler demonstrations score mean 0
(std 1) is stored with the model in ``extra.json`` and applied by ``score`` everywhere.

    rlhf-jax rm --config experiments/tiny_rm.py --workdir runs/rm
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import model_io, storage
from rlhf_jax.data import BatchIterator, comparisons_to_pairs, tokenize_demonstrations
from rlhf_jax.data.sources import read_source
from rlhf_jax.models.params import init_params, param_shardings
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.objectives import kway_ranking_loss
from rlhf_jax.program import Program, Step, abstract_batch, abstract_key, random_batch
from rlhf_jax.scoring import raw_rewards
from rlhf_jax.sharding import (as_auto_mesh, batch_sharding, check_batch_size, replicated,
                               shard_batch)
from rlhf_jax.stages import supervised
from rlhf_jax.train_state import (abstract_train_state, create_train_state, make_eval_step,
                                  make_train_step, shardings_of)

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "ranks", "valid")


# --- the reward model as a function -----------------------------------------------------------

def rm_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array | None,
            model: Transformer) -> tuple[jax.Array, dict]:
    """InstructGPT Eq. 1 over a batch of prompts, all B*K completions in one forward pass."""
    b, k, t = batch["input_ids"].shape
    flat = lambda x: x.reshape(b * k, t)
    rewards = raw_rewards(model, params, flat(batch["input_ids"]), flat(batch["attention_mask"]),
                          flat(batch["position_ids"]), rng).reshape(b, k)
    return kway_ranking_loss(rewards, batch["ranks"], batch["valid"])


# --- the compiled steps, without weights or data ------------------------------------------------

def build(cfg: Any, mesh: Mesh, *, model: Transformer | None = None, total_steps: int | None = None,
          model_overrides: dict | None = None, max_k: int | None = None) -> Program:
    """The RM train and eval steps for ``cfg`` on ``mesh``, from shapes alone.

    The architecture comes from ``model``, else ``cfg.model`` or ``cfg.init_from``'s stored config,
    with a scalar head. A batch is ``train.batch_size`` prompts x ``max_k`` completions
    (``data.max_k``; ``max_k=2`` for shuffled pairs).
    """
    mesh = as_auto_mesh(mesh)
    overrides = {**model_io.runtime_overrides(cfg), "dropout": cfg.train.dropout, "head": "scalar",
                 **(model_overrides or {})}
    model = model_io.stage_model(model, cfg.get("model"), cfg.init_from, mesh, overrides)
    optimizer, schedule = supervised.optimizer_from(cfg.optim,
                                                    total_steps or cfg.train.steps or 1000)
    state = abstract_train_state(model, optimizer, mesh)
    b, k = cfg.train.batch_size, max_k or (2 if cfg.mode == "shuffled_pairs" else cfg.data.max_k)
    t = cfg.data.max_prompt_len + cfg.data.max_response_len
    check_batch_size("train.batch_size", b, mesh)
    shapes = {"input_ids": ((b, k, t), jnp.int32), "attention_mask": ((b, k, t), jnp.int32),
              "position_ids": ((b, k, t), jnp.int32), "ranks": ((b, k), jnp.int32),
              "valid": ((b, k), jnp.bool_)}
    sharding = functools.partial(batch_sharding, mesh)
    batch = abstract_batch(shapes, sharding)
    eval_batch = abstract_batch(dict(shapes, **{
        key: ((b, cfg.data.max_k, *shape[2:]), dtype) for key, (shape, dtype) in shapes.items()}),
        sharding)
    loss_fn = functools.partial(rm_loss, model=model)
    train_step = make_train_step(loss_fn, optimizer, mesh, shardings_of(state), batch)
    eval_step = make_eval_step(loss_fn, mesh, shardings_of(state.params), eval_batch)
    steps = {"train": Step("train", train_step, (state, batch, abstract_key(replicated(mesh))), b * k * t),
             "eval": Step("eval", eval_step, (state.params, eval_batch), b * cfg.data.max_k * t)}

    def init_state(rng):
        return create_train_state(init_params(model, rng, mesh), optimizer, shardings_of(state)), {}

    def random_args(name, state_, frozen, rng):
        seed = int(jax.random.randint(rng, (), 0, 2**30))
        if name == "train":
            return state_, random_batch(batch, model.config.vocab_size, seed), rng
        return state_.params, random_batch(eval_batch, model.config.vocab_size, seed)

    return Program("rm", mesh, {"reward": model}, state, {}, steps, init_state, random_args,
                   {"train": 1, "eval": 0}, optimizer, schedule)


def reward_model_from_lm(model: Transformer, params: Any, rng: jax.Array,
                         mesh: Mesh | None) -> tuple[Transformer, Any]:
    """Swap the LM head for a fresh scalar head on the same trunk (SFT -> RM initialization).

    The head is N(0, 1/sqrt(d_model + 1)) with bias 0; the trunk (and tied embedding) is kept.
    """
    rm = Transformer(model.config.replace(head="scalar"), mesh=mesh, rules=model.rules)
    fresh = jax.jit(lambda key: nn.meta.unbox(rm.init(key, jnp.zeros((1, 2), jnp.int32))["params"]),
                    out_shardings=param_shardings(rm, mesh) if mesh is not None else None)(rng)
    merged = {name: params[name] if name in params and name != "score_head" else value
              for name, value in fresh.items()}
    return rm, merged


# --- data --------------------------------------------------------------------------------------

def load_arrays(cfg: Any, tokenizer: Any) -> tuple[dict, dict | None]:
    data = cfg.data
    train_rows, valid_rows = supervised.comparison_rows(data, cfg.seed)
    max_k = data.max_k
    if cfg.mode == "shuffled_pairs":
        train_rows, max_k = comparisons_to_pairs(train_rows), 2
        log.info("shuffled_pairs: %d pair examples", len(train_rows))
    train = supervised.comparison_arrays(train_rows, tokenizer, data, max_k, BATCH_KEYS, "train")
    # Validation always uses whole rankings: accuracy over every strict pair of a prompt.
    valid = (supervised.comparison_arrays(valid_rows, tokenizer, data, data.max_k, BATCH_KEYS,
                                          "valid")
             if valid_rows else None)
    return train, valid


def demonstration_norm(cfg: Any, tokenizer: Any, params: Any, model: Transformer,
                       mesh: Mesh) -> dict[str, float]:
    """Mean (and std) of the RM's raw rewards on labeler demonstrations."""
    rows = read_source(cfg.normalize.demonstrations, "demonstrations",
                       data_dir=cfg.data.get("tfds_data_dir"))
    arrays, _ = tokenize_demonstrations(rows, tokenizer, cfg.data.max_prompt_len,
                                        cfg.data.max_response_len, "truncate")
    batch_size = cfg.train.batch_size * cfg.data.max_k
    n = len(arrays["input_ids"])
    # Pad to whole batches with weight-0 rows, and reduce inside the jit: the sums come back
    # replicated, so every process of a multi-host run gets the same statistics.
    n_padded = -(-n // batch_size) * batch_size
    take = np.arange(n_padded) % n
    padded = {k: arrays[k][take] for k in ("input_ids", "attention_mask", "position_ids")}
    padded["weight"] = (np.arange(n_padded) < n).astype(np.float32)

    def moments(p, b):
        r = raw_rewards(model, p, b["input_ids"], b["attention_mask"], b["position_ids"])
        return jnp.stack([jnp.sum(b["weight"] * r), jnp.sum(b["weight"] * r * r)])

    fn = jax.jit(moments)
    total = np.zeros(2)
    for batch in supervised.fixed_batches(padded, batch_size):
        total += np.asarray(jax.device_get(fn(params, shard_batch(batch, mesh))))
    mean = total[0] / n
    std = float(np.sqrt(max(total[1] / n - mean * mean, 0.0)))
    norm = {"mean": float(mean), "std": 1.0, "n_demonstrations": int(n)}
    if cfg.normalize.unit_std:
        norm["std"] = max(std, 1e-6)
    return norm


# --- the loop ----------------------------------------------------------------------------------

def train(cfg: Any, workdir: str) -> dict[str, float]:
    """Train the reward model; returns final validation metrics and the stored normalization.

    SIGTERM / SIGINT finish the current step, save a checkpoint and raise Preempted; a NaN / Inf
    loss, gradient norm or parameter raises NonFiniteError (see ``rlhf_jax.reliability``).
    """
    workdir = storage.absolute(workdir)
    name = cfg.name
    with supervised.stage_run(cfg, workdir) as (stack, preemption, mesh):
        rng = jax.random.key(cfg.seed)
        lm, lm_params, tokenizer, extra = model_io.init_or_load_model(cfg, mesh, rng,
                                                                      dropout=cfg.train.dropout)
        if lm.config.head == "scalar":
            model, params = lm, lm_params          # continuing from a reward model
        else:
            model, params = reward_model_from_lm(lm, lm_params, jax.random.fold_in(rng, 1), mesh)
        del lm_params
        model_io.log_params(params)
        train_arrays, valid_arrays = load_arrays(cfg, tokenizer)

        check_batch_size("train.batch_size", cfg.train.batch_size, mesh)
        iterators = {"train": BatchIterator(train_arrays, cfg.train.batch_size, seed=cfg.seed)}
        steps_per_epoch = max(1, iterators["train"].steps_per_epoch)
        total_steps = cfg.train.steps or int(math.ceil(cfg.train.epochs * steps_per_epoch))

        program = build(cfg, mesh, model=model, total_steps=total_steps,
                        max_k=train_arrays["input_ids"].shape[1])
        state = create_train_state(params, program.optimizer, shardings_of(program.state))
        del params

        valid_batches = (supervised.fixed_batches(valid_arrays, cfg.train.batch_size)
                         if valid_arrays else [])
        state, final, _, guard = supervised.supervised_loop(
            cfg, workdir, stack, preemption, mesh, program, state, iterators,
            lambda: next(iterators["train"]), valid_batches, steps_per_epoch, total_steps,
            weight_key="n_pairs", token_key="attention_mask",
            postfix=("train/loss", "train/pair_accuracy"))

        final_model = model.clone(config=model.config.replace(dropout=0.0))
        norm = (demonstration_norm(cfg, tokenizer, state.params, final_model, mesh)
                if cfg.normalize.demonstrations else {})
        if norm:
            log.info("reward normalization from %d demonstrations: mean %.4f std %.4f",
                     norm["n_demonstrations"], norm["mean"], norm["std"])
            guard.check_values(total_steps, {"reward_norm.mean": norm["mean"],
                                             "reward_norm.std": norm["std"]})
        model_io.save_our_checkpoint(
            storage.join(workdir, "model"), final_model, state.params, tokenizer,
            extra={"stage": name, "reward_norm": norm, "mode": cfg.mode, **final}, overwrite=True)
    return final | {"reward_norm": norm}
