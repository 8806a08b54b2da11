"""Stage 1: supervised fine-tuning on demonstrations (and plain-text LM pretraining).

Loss: next-token cross-entropy on **response tokens only** (prompt and padding are masked out).
``cfg.data.format = "pretrain"`` trains on every token of plain text instead, which is how the
small runs make their base LM. An optional pretraining mix puts ``pretrain_mix`` of every batch's
rows from the text corpus (InstructGPT's PPO-init SFT uses 10%). ``cfg.data.pack`` packs plain
text (the pretrain format and the mix) into full rows instead of one padded document per row;
unpacked, ``cfg.data.overlong`` decides what becomes of a longer one (pretrain format: ``truncate``,
``chunk`` into consecutive rows, or ``drop``; the mix always chunks).

    rlhf-jax sft --config experiments/tiny_sft.py --workdir runs/sft
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import model_io, storage
from rlhf_jax.data import BatchIterator, tokenize_demonstrations, tokenize_pretrain
from rlhf_jax.data.sources import read_source, source_options
from rlhf_jax.models.params import init_params
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.program import Program, Step, abstract_batch, abstract_key, random_batch
from rlhf_jax.scoring import sequence_nll
from rlhf_jax.sharding import as_auto_mesh, batch_sharding, check_batch_size, replicated
from rlhf_jax.stages import supervised
from rlhf_jax.train_state import (abstract_train_state, create_train_state, make_eval_step,
                                  make_train_step, shardings_of)

log = logging.getLogger(__name__)

BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "loss_mask")


def lm_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array | None,
            model: Transformer, chunk: int = 0) -> tuple[jax.Array, dict]:
    """Token-mean NLL of the tokens ``loss_mask`` marks (predicted from the previous position);
    the LM head runs ``chunk`` positions at a time (0 = all at once)."""
    return sequence_nll(model, params, batch, chunk=chunk, rng=rng)


# --- the compiled steps, without weights or data ------------------------------------------------

def build(cfg: Any, mesh: Mesh, *, model: Transformer | None = None, total_steps: int | None = None,
          model_overrides: dict | None = None) -> Program:
    """The SFT train and eval steps for ``cfg`` on ``mesh``, from shapes alone.

    The architecture comes from ``model`` (a loaded checkpoint's), else ``cfg.model`` or the
    config stored in ``cfg.init_from``. ``total_steps`` only sets the learning-rate schedule's
    length (default ``cfg.train.steps`` or 1000); ``model_overrides`` replace config fields of
    the network (``rlhf-jax compile`` varies ``n_layers`` to count FLOPs per layer).
    """
    mesh = as_auto_mesh(mesh)
    overrides = {**model_io.runtime_overrides(cfg), "dropout": cfg.train.dropout}
    model = model_io.stage_model(model, cfg.get("model"), cfg.init_from, mesh,
                                 {**overrides, **(model_overrides or {})})
    optimizer, schedule = supervised.optimizer_from(cfg.optim,
                                                    total_steps or cfg.train.steps or 1000)
    state = abstract_train_state(model, optimizer, mesh)
    batch_size = cfg.train.batch_size
    seq_len = cfg.data.max_prompt_len + cfg.data.max_response_len
    check_batch_size("train.batch_size", batch_size, mesh)
    batch = abstract_batch({k: ((batch_size, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32)
                            for k in BATCH_KEYS}, functools.partial(batch_sharding, mesh))
    loss_fn = functools.partial(lm_loss, model=model, chunk=cfg.train.logprob_chunk)
    train_step = make_train_step(loss_fn, optimizer, mesh, shardings_of(state), batch)
    eval_step = make_eval_step(loss_fn, mesh, shardings_of(state.params), batch)
    tokens = batch_size * seq_len
    steps = {"train": Step("train", train_step, (state, batch, abstract_key(replicated(mesh))), tokens),
             "eval": Step("eval", eval_step, (state.params, batch), tokens)}

    def init_state(rng):
        return create_train_state(init_params(model, rng, mesh), optimizer, shardings_of(state)), {}

    def random_args(name, state_, frozen, rng):
        data = random_batch(batch, model.config.vocab_size, int(jax.random.randint(rng, (), 0, 2**30)))
        return (state_, data, rng) if name == "train" else (state_.params, data)

    return Program("sft", mesh, {"policy": model}, state, {}, steps, init_state, random_args,
                   {"train": 1, "eval": 0}, optimizer, schedule)


def load_arrays(cfg: Any, tokenizer: Any) -> tuple[dict, dict, dict | None]:
    """Tokenized (train, valid, pretrain-mix) arrays as numpy dicts with BATCH_KEYS."""
    data = cfg.data
    seq_len = data.max_prompt_len + data.max_response_len
    rows = read_source(data.train, data.format, **source_options(data))
    if data.get("valid"):
        train_rows = rows
        valid_rows = read_source(data.valid, data.format, **source_options(data))
    else:
        train_rows, valid_rows = supervised.split_rows(rows, data.valid_fraction, cfg.seed)

    pack = bool(data.pack)

    def tokenize(rows_, kind):
        if data.format == "pretrain":
            arrays, stats = tokenize_pretrain(rows_, tokenizer, seq_len, data.overlong, pack=pack)
        else:
            arrays, stats = tokenize_demonstrations(rows_, tokenizer, data.max_prompt_len,
                                                    data.max_response_len, data.overlong)
        log.info("%s %s", kind, stats)
        return {k: arrays[k] for k in BATCH_KEYS}

    train = tokenize(train_rows, "train")
    valid = tokenize(valid_rows, "valid") if valid_rows else None
    mix = None
    if data.pretrain_mix > 0:
        mix_rows = read_source(data.pretrain_path, "pretrain", **source_options(data, mapped=False))
        mix_arrays, stats = tokenize_pretrain(mix_rows, tokenizer, seq_len, "chunk", pack=pack)
        log.info("pretrain mix %s", stats)
        mix = {k: mix_arrays[k] for k in BATCH_KEYS}
    return train, valid, mix


def mix_sizes(batch_size: int, fraction: float) -> tuple[int, int]:
    """(demonstration rows, pretraining rows) per batch for a mix fraction."""
    n_mix = int(round(batch_size * fraction))
    return batch_size - n_mix, n_mix


def train(cfg: Any, workdir: str) -> dict[str, float]:
    """Run the SFT (or LM pretraining) loop; returns the final validation metrics.

    SIGTERM / SIGINT finish the current step, save a checkpoint and raise Preempted; a NaN / Inf
    loss, gradient norm or parameter raises NonFiniteError (see ``rlhf_jax.reliability``).
    """
    workdir = storage.absolute(workdir)
    name = cfg.name
    with supervised.stage_run(cfg, workdir) as (stack, preemption, mesh):
        model, params, tokenizer, _ = model_io.init_or_load_model(
            cfg, mesh, jax.random.key(cfg.seed), dropout=cfg.train.dropout)
        model_io.log_params(params)
        train_arrays, valid_arrays, mix_arrays = load_arrays(cfg, tokenizer)

        # Data: demonstrations, plus a pretraining stream for the mix; both deterministic and
        # resumable.
        check_batch_size("train.batch_size", cfg.train.batch_size, mesh)
        n_demo, n_mix = mix_sizes(cfg.train.batch_size,
                                  cfg.data.pretrain_mix if mix_arrays else 0.0)
        iterators = {"train": BatchIterator(train_arrays, n_demo, seed=cfg.seed)}
        if n_mix:
            iterators["pretrain_mix"] = BatchIterator(mix_arrays, n_mix, seed=cfg.seed + 1)
        steps_per_epoch = max(1, iterators["train"].steps_per_epoch)
        total_steps = cfg.train.steps or int(math.ceil(cfg.train.epochs * steps_per_epoch))

        program = build(cfg, mesh, model=model, total_steps=total_steps)
        state = create_train_state(params, program.optimizer, shardings_of(program.state))
        del params

        def next_batch() -> dict[str, np.ndarray]:
            parts = [next(iterators["train"])]
            if n_mix:
                parts.append(next(iterators["pretrain_mix"]))
            return {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}

        valid_batches = (supervised.fixed_batches(valid_arrays, cfg.train.batch_size)
                         if valid_arrays else [])
        state, final, metrics, _ = supervised.supervised_loop(
            cfg, workdir, stack, preemption, mesh, program, state, iterators, next_batch,
            valid_batches, steps_per_epoch, total_steps, weight_key="n_tokens",
            token_key="loss_mask", postfix=("train/loss",))
        model_io.save_our_checkpoint(storage.join(workdir, "model"), model.clone(
            config=model.config.replace(dropout=0.0)), state.params, tokenizer,
            extra={"stage": name, "steps": total_steps, **final}, overwrite=True)
    log.info("finished %d steps; %s", total_steps, final)
    return final | {"train/loss": float(metrics.get("loss", jnp.nan)) if metrics else float("nan")}
