"""Autoregressive sampling over the KV cache: temperature, top-k, top-p (nucleus) and greedy.

``generate`` is a pure, jittable function with static shapes: one prefill call writes the
(left-padded) prompt into a cache of ``P + max_new_tokens`` slots, then a ``lax.while_loop``
feeds one token per step. Each sequence stops at its own EOS (later tokens are pad with mask 0)
and the loop exits as soon as every sequence has stopped, so a batch of short answers does not
pay for ``max_new_tokens`` forward passes.

Two log-probabilities are returned per sampled token:

* ``logprobs``: log-softmax of the *raw* logits (temperature 1, no filtering).
* ``sampling_logprobs``: under the tempered / top-k / top-p distribution actually sampled from
  (0 for greedy, a point mass). Useful for diagnostics and importance corrections.

Neither is what PPO trains on: its experience pass and update rescore the rollout with
``scoring.response_logprobs(..., temperature=cfg.temperature)``, softmax(logits / T) without the
top-k / top-p filters, for the old, new and reference log-probs alike, so the ratio and the KL
penalty use the sampling temperature's distribution consistently. Evaluation's KL
(``evaluation.kl_to_reference``) scores samples at the temperature that drew them too.

A response's tokens carry ``response_mask`` 1, its EOS included; the positions after EOS are pad
with mask 0. A pad id the model itself sampled inside its response has mask 1, so the mask, not
the id, tells padding apart (``evaluation.decode_response`` keeps such a token in the text).

With a mesh the batch is split over ('data', 'fsdp') and the KV cache follows
``cache_shardings``; parameters keep their model shardings.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rlhf_jax.models.params import cache_shardings, param_shardings
from rlhf_jax.models.transformer import Cache, Transformer, init_cache
from rlhf_jax.sharding import as_auto_mesh, batch_sharding, replicated

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable, so every field is a compile-time constant).

    ``top_k=0`` and ``top_p=1.0`` switch those filters off. ``greedy`` takes the argmax of the
    raw logits and ignores temperature / top-k / top-p. ``eos_token_id=None`` never stops early.
    ``pad_token_id=None`` (a tokenizer without a pad token, like GPT-2's) falls back to EOS, as
    the data layer does, else 0: positions after EOS carry mask 0, so any valid id will do.
    """
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.pad_token_id is None:
            object.__setattr__(self, "pad_token_id",
                               0 if self.eos_token_id is None else int(self.eos_token_id))
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.greedy and not self.temperature > 0:
            problems.append(f"temperature={self.temperature} must be > 0 (or use greedy=True)")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if problems:
            raise ValueError("invalid SamplingConfig: " + "; ".join(problems))


# --- one sampling step over [B, V] logits ---------------------------------------------------

def filter_logits(logits: Array, cfg: SamplingConfig) -> Array:
    """Tempered logits with everything outside the top-k / nucleus set at -inf.

    logits: [B, V] (any float dtype) -> [B, V] float32. Top-p is applied after top-k (on the
    renormalised top-k distribution) and keeps the smallest prefix of the sorted tokens whose
    probability reaches ``top_p``; the most likely token is always kept. Tokens tied with the
    cut-off value are kept too, so a filter may keep slightly more than k tokens on exact ties.
    """
    scaled = logits.astype(jnp.float32) / jnp.float32(cfg.temperature)
    vocab = scaled.shape[-1]
    use_top_k = 0 < cfg.top_k < vocab
    if not use_top_k and cfg.top_p >= 1.0:
        return scaled
    # top_k(k=V) is a full descending sort; with top-k on, top-p only needs the k candidates.
    candidates = jax.lax.top_k(scaled, cfg.top_k if use_top_k else vocab)[0]     # [B, K] desc
    keep = jnp.ones(candidates.shape, bool)
    if cfg.top_p < 1.0:
        probs = jax.nn.softmax(candidates, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs   # probability of strictly better tokens
        keep = (mass_before < cfg.top_p).at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, candidates, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample_with_logprobs(rng: Array, logits: Array,
                         cfg: SamplingConfig) -> tuple[Array, Array, Array]:
    """Draw one token per row and score it.

    Returns ``(tokens [B] int32, logprobs [B] f32, sampling_logprobs [B] f32)``: the log-prob
    under the raw logits and under the distribution actually sampled from (see module docs).
    """
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sampling_logprobs = jnp.zeros(tokens.shape, jnp.float32)   # a point mass
    else:
        filtered = filter_logits(logits, cfg)
        tokens = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
        sampling_logprobs = _take_rows(jax.nn.log_softmax(filtered, axis=-1), tokens)
    logprobs = _take_rows(jax.nn.log_softmax(logits, axis=-1), tokens)
    return tokens, logprobs, sampling_logprobs


def sample_logits(rng: Array, logits: Array, cfg: SamplingConfig) -> Array:
    """Sample token ids [B] int32 from logits [B, V] with temperature / top-k / top-p / greedy."""
    return sample_with_logprobs(rng, logits, cfg)[0]


def _take_rows(values: Array, index: Array) -> Array:
    """values [B, V], index [B] -> values[b, index[b]] as [B]."""
    return jnp.take_along_axis(values, index[:, None], axis=-1)[:, 0]


# --- generation loop ------------------------------------------------------------------------

class _DecodeState(NamedTuple):
    """Loop carry. ``step`` = response positions sampled so far = decode forward passes run."""
    step: Array                # [] int32
    input_tokens: Array        # [B] int32, fed at cache slot P - 1 + step
    cache: Cache
    slot_mask: Array           # [B, P+N] int32, real tokens among the cache slots
    response_ids: Array        # [B, N] int32
    response_mask: Array       # [B, N] int32
    logprobs: Array            # [B, N] f32
    sampling_logprobs: Array   # [B, N] f32
    done: Array                # [B] bool, sequence has emitted EOS


def _set_column(matrix: Array, column: Array, index: Array | int) -> Array:
    """matrix [B, N] with column ``index`` replaced by column [B] (a traced index is fine)."""
    return jax.lax.dynamic_update_slice_in_dim(matrix, column[:, None].astype(matrix.dtype),
                                               index, axis=1)


def _record_sample(state: _DecodeState, logits: Array, rng: Array, prompt_len: int,
                   cfg: SamplingConfig) -> _DecodeState:
    """Sample response position ``state.step`` from ``logits [B, V]`` and store it.

    Finished sequences get pad with mask 0 (and log-prob 0); a sequence that samples EOS keeps
    that EOS token (mask 1) and is finished from the next position on. The new token's cache
    slot is marked real now; causality keeps it invisible until it is fed in the next step.
    """
    step = state.step
    tokens, logprobs, sampling_logprobs = sample_with_logprobs(
        jax.random.fold_in(rng, step), logits, cfg)
    active = ~state.done
    tokens = jnp.where(active, tokens, cfg.pad_token_id)
    zero = jnp.float32(0.0)
    done = state.done
    if cfg.eos_token_id is not None:
        done = done | (tokens == cfg.eos_token_id)
    return state._replace(
        step=step + 1,
        input_tokens=tokens,
        slot_mask=_set_column(state.slot_mask, active, prompt_len + step),
        response_ids=_set_column(state.response_ids, tokens, step),
        response_mask=_set_column(state.response_mask, active, step),
        logprobs=_set_column(state.logprobs, jnp.where(active, logprobs, zero), step),
        sampling_logprobs=_set_column(state.sampling_logprobs,
                                      jnp.where(active, sampling_logprobs, zero), step),
        done=done,
    )


def generate(model: Transformer, params: PyTree, prompt_ids: Array, prompt_mask: Array,
             rng: Array, cfg: SamplingConfig, *, mesh: Mesh | None = None) -> dict[str, Array]:
    """Sample up to ``cfg.max_new_tokens`` tokens after each (left-padded) prompt.

    The prefill writes prompt tokens ``0 .. P-2`` into the cache and its logits are dropped
    (XLA removes the LM head from it), so no ``[B, P, V]`` logits tensor is ever built; the last
    prompt token is fed by the first decode step, whose logits give response position 0.

    Args:
      model: an LM-head ``Transformer``; params: its parameter tree.
      prompt_ids: [B, P] int, left-padded. prompt_mask: [B, P] (1 = real token); every row needs
        at least one real token, and the last column must be real (left padding).
      rng: a PRNG key (ignored when greedy). mesh: when given, the KV cache is constrained to
        ``cache_shardings`` (batch over ('data', 'fsdp'), KV heads over 'tensor').

    Returns a dict of:
      sequences [B, P+N] int32: prompt then response (response right-padded with pad);
      response_ids [B, N] int32; response_mask [B, N] int32 (1 on generated tokens, EOS
      included); logprobs [B, N] f32 (raw-logit log-probs); sampling_logprobs [B, N] f32;
      attention_mask [B, P+N] int32 (prompt mask then response mask);
      n_steps [] int32: decode steps run (= response positions sampled), < N when every
      sequence stopped early.
    """
    mesh = as_auto_mesh(mesh)
    batch, prompt_len = prompt_ids.shape
    n_new = cfg.max_new_tokens
    prompt_ids = prompt_ids.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)

    cache = init_cache(model.config, batch, prompt_len + n_new)
    constrain_cache = _cache_constraint(model, mesh, cache)
    cache = constrain_cache(cache)
    slot_mask = jnp.concatenate([prompt_mask, jnp.zeros((batch, n_new), jnp.int32)], axis=1)
    if prompt_len > 1:
        _, cache = model.apply({"params": params}, prompt_ids[:, :-1], attention_mask=slot_mask,
                               cache=cache, cache_index=0)
        cache = constrain_cache(cache)

    def keep_going(s: _DecodeState) -> Array:
        return (s.step < n_new) & ~jnp.all(s.done)

    def decode_step(s: _DecodeState) -> _DecodeState:
        logits, new_cache = model.apply({"params": params}, s.input_tokens[:, None],
                                        attention_mask=s.slot_mask, cache=s.cache,
                                        cache_index=prompt_len - 1 + s.step)
        s = s._replace(cache=constrain_cache(new_cache))
        return _record_sample(s, logits[:, 0], rng, prompt_len, cfg)

    initial = _DecodeState(
        step=jnp.int32(0),
        input_tokens=prompt_ids[:, -1],
        cache=cache,
        slot_mask=slot_mask,
        response_ids=jnp.full((batch, n_new), cfg.pad_token_id, jnp.int32),
        response_mask=jnp.zeros((batch, n_new), jnp.int32),
        logprobs=jnp.zeros((batch, n_new), jnp.float32),
        sampling_logprobs=jnp.zeros((batch, n_new), jnp.float32),
        done=jnp.zeros((batch,), bool),
    )
    final = jax.lax.while_loop(keep_going, decode_step, initial)
    return {
        "sequences": jnp.concatenate([prompt_ids, final.response_ids], axis=1),
        "response_ids": final.response_ids,
        "response_mask": final.response_mask,
        "logprobs": final.logprobs,
        "sampling_logprobs": final.sampling_logprobs,
        "attention_mask": jnp.concatenate([prompt_mask, final.response_mask], axis=1),
        "n_steps": final.step,
    }


def _cache_constraint(model: Transformer, mesh: Mesh | None,
                      cache: Cache) -> Callable[[Cache], Cache]:
    """A function pinning cache arrays to ``cache_shardings`` (identity without a mesh).

    Pinning inside the loop keeps the carried cache from drifting to a layout GSPMD guessed.
    """
    if mesh is None:
        return lambda c: c
    shardings = cache_shardings(model, mesh, cache)
    return lambda c: jax.lax.with_sharding_constraint(c, shardings)


GENERATE_OUTPUT_NDIMS = {"sequences": 2, "response_ids": 2, "response_mask": 2, "logprobs": 2,
                         "sampling_logprobs": 2, "attention_mask": 2, "n_steps": 0}


def make_generate_fn(model: Transformer, cfg: SamplingConfig,
                     mesh: Mesh | None = None) -> Callable[..., dict[str, Array]]:
    """``jax.jit``-ed ``(params, prompt_ids [B,P], prompt_mask [B,P], rng) -> generate(...)``.

    With a mesh, params are expected in ``param_shardings(model, mesh)``, batch arrays are split
    over ('data', 'fsdp') (B must divide by data * fsdp) and the rng is replicated; outputs come
    back batch-sharded (``n_steps`` replicated). One compile per prompt shape. A mesh with
    Explicit axes (``jax.make_mesh``'s default) is used as its Auto twin.
    """
    mesh = as_auto_mesh(mesh)
    fn = functools.partial(_generate_positional, model, cfg, mesh)
    if mesh is None:
        return jax.jit(fn)
    in_shardings = (param_shardings(model, mesh), batch_sharding(mesh, 2), batch_sharding(mesh, 2),
                    replicated(mesh))
    out_shardings = {name: batch_sharding(mesh, ndim) if ndim else replicated(mesh)
                     for name, ndim in GENERATE_OUTPUT_NDIMS.items()}
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)


def _generate_positional(model: Transformer, cfg: SamplingConfig, mesh: Mesh | None,
                         params: PyTree, prompt_ids: Array, prompt_mask: Array,
                         rng: Array) -> dict[str, Array]:
    return generate(model, params, prompt_ids, prompt_mask, rng, cfg, mesh=mesh)
