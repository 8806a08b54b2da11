"""Scoring token arrays with the four networks: response log-probs, values, RM scores.

PPO's experience pass, its update, the RM stage and evaluation all score sequences the same way,
so it is written once here:

* ``response_logprobs``: log pi(y_t | x, y_<t) of each response token at the sampling
  temperature (the distribution the rollout drew from), float32, optionally with the entropy.
  The trunk runs over the whole sequence, but the LM head only over the N response positions,
  ``chunk`` positions at a time: a ``[B, chunk, V]`` block of logits is the largest vocabulary
  tensor that ever exists, and under ``jax.grad`` each block is recomputed in the backward pass
  instead of stored. At a 128k vocabulary that is the difference between tens of GB per device
  and a few hundred MB.
* ``response_values``: V(s_t) where the policy chooses response token t.
* ``raw_rewards`` / ``normalize`` / ``rm_scores``: the reward model's scalar at the last real
  token, and the demonstration normalization stored with it.

Alignment: with prompt length P, the token at sequence position P + t is predicted from position
P + t - 1, so the response block of hidden states is ``hidden[:, P-1 : -1]``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax import objectives as obj
from rlhf_jax.models.transformer import Transformer, default_position_ids, head_outputs
from rlhf_jax.sharding import with_logical_constraint

Array = jax.Array
PyTree = Any


def hidden_states(model: Transformer, params: PyTree, input_ids: Array, attention_mask: Array,
                  position_ids: Array | None = None, rng: Array | None = None) -> Array:
    """Final-normed hidden states [B, T, D] (no head); dropout when ``rng`` is given."""
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
    return model.apply({"params": params}, input_ids, attention_mask, position_ids,
                       deterministic=rng is None, rngs=None if rng is None else {"dropout": rng},
                       return_hidden=True)


def chunked_token_logprobs(model: Transformer, params: PyTree, hidden: Array, targets: Array, *,
                           temperature: float = 1.0, chunk: int = 0, entropy: bool = False,
                           accuracy: bool = False) -> dict[str, Array]:
    """LM head + log-softmax over ``hidden [B, N, D]`` in blocks of ``chunk`` positions.

    Returns ``{"logprobs": [B, N] f32}`` plus ``"entropy"`` (nats) and ``"correct"`` (argmax ==
    target, as float32) when asked. ``chunk <= 0`` or ``>= N`` is one block (no loop). Equal to
    ``objectives.token_logprobs`` / ``token_entropy`` on the full logits.
    """
    b, n, d = hidden.shape
    chunk = n if chunk <= 0 or chunk >= n else chunk
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n

    def block(h: Array, t: Array) -> dict[str, Array]:
        logits = head_outputs(model.config, params, h).astype(jnp.float32) / jnp.float32(temperature)
        logits = with_logical_constraint(logits, ("activation_batch", "activation_length",
                                                  "activation_vocab"), model.mesh, model.rules)
        out = {"logprobs": obj.token_logprobs(logits, t)}
        if entropy:
            out["entropy"] = obj.token_entropy(logits)
        if accuracy:
            out["correct"] = (jnp.argmax(logits, axis=-1) == t).astype(jnp.float32)
        return out

    if n_chunks == 1:
        return block(hidden, targets)
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    to_blocks = lambda x: jnp.swapaxes(x.reshape(b, n_chunks, chunk, *x.shape[2:]), 0, 1)
    # checkpoint: the backward pass recomputes each block's logits instead of keeping them all.
    blocks = jax.lax.map(jax.checkpoint(lambda xs: block(*xs)),
                         (to_blocks(hidden), to_blocks(targets)))
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(b, n_chunks * chunk)[:, :n], blocks)


def response_logprobs(model: Transformer, params: PyTree, sequences: Array,
                      attention_mask: Array, prompt_len: int, *, temperature: float = 1.0,
                      chunk: int = 0, entropy: bool = False) -> dict[str, Array]:
    """Log-probs (and entropy) of the response tokens ``sequences[:, P:]``: [B, N] float32 each.

    Divided by the sampling temperature, so they are the probabilities of the distribution the
    rollout sampled from (the paper samples at temperature 1).
    """
    hidden = hidden_states(model, params, sequences, attention_mask)[:, prompt_len - 1:-1]
    return chunked_token_logprobs(model, params, hidden, sequences[:, prompt_len:],
                                  temperature=temperature, chunk=chunk, entropy=entropy)


def sequence_nll(model: Transformer, params: PyTree, batch: dict[str, Array], *,
                 chunk: int = 0, rng: Array | None = None) -> tuple[Array, dict]:
    """Token-mean NLL of the tokens ``loss_mask`` marks, each predicted from the previous one
    (SFT, LM pretraining and PPO's ptx term), with the chunked LM head. ``(loss, metrics)`` as
    ``objectives.next_token_loss``."""
    hidden = hidden_states(model, params, batch["input_ids"], batch["attention_mask"],
                           batch["position_ids"], rng)
    out = chunked_token_logprobs(model, params, hidden[:, :-1], batch["input_ids"][:, 1:],
                                 chunk=chunk, accuracy=True)
    mask = batch["loss_mask"][:, 1:]
    loss = obj.masked_mean(-out["logprobs"], mask)
    return loss, {"accuracy": obj.masked_mean(out["correct"], mask),
                  "n_tokens": jnp.sum(jnp.asarray(mask, jnp.float32))}


def response_values(model: Transformer, params: PyTree, sequences: Array, attention_mask: Array,
                    prompt_len: int) -> Array:
    """V(s_t) for each response token t, read where the policy decides it: [B, N] float32."""
    hidden = hidden_states(model, params, sequences, attention_mask)[:, prompt_len - 1:-1]
    return head_outputs(model.config, params, hidden)


def raw_rewards(model: Transformer, params: PyTree, input_ids: Array, attention_mask: Array,
                position_ids: Array | None = None, rng: Array | None = None) -> Array:
    """[N, T] sequences -> [N] float32 rewards read at each sequence's last real token."""
    hidden = hidden_states(model, params, input_ids, attention_mask, position_ids, rng)
    return obj.value_at_last_token(head_outputs(model.config, params, hidden), attention_mask)


def normalize(raw: Array, norm: Array | dict | None) -> Array:
    """``(raw - mean) / std`` with the RM's stored demonstration normalization.

    ``norm`` is the ``{"mean", "std"}`` dict saved with the model, or (inside jitted steps, so a
    new RM needs no recompile) the array ``[mean, std]`` from ``norm_array``.
    """
    if norm is None or (isinstance(norm, dict) and not norm):
        return raw
    if isinstance(norm, dict):
        return (raw - norm["mean"]) / norm.get("std", 1.0)
    return (raw - norm[0]) / norm[1]


def norm_array(norm: dict | None) -> Array:
    """The stored normalization as a float32 ``[mean, std]`` (identity ``[0, 1]`` without one)."""
    norm = norm or {}
    return jnp.asarray([norm.get("mean", 0.0), norm.get("std", 1.0)], jnp.float32)


def fold_normalization(params: PyTree, norm: dict | None) -> PyTree:
    """Scalar-head params whose raw output is ``normalize(raw, norm)``: the head's kernel and bias
    divided by ``std`` after ``mean`` comes off the bias. How a value network starts from the RM
    on the scale of PPO's returns, which use the normalized score."""
    if not norm:
        return params
    mean, std = float(norm.get("mean", 0.0)), float(norm.get("std", 1.0))
    head = params["score_head"]
    folded = {"kernel": head["kernel"] / std,
              "bias": ((head["bias"].astype(jnp.float32) - mean) / std).astype(head["bias"].dtype)}
    return {**params, "score_head": {**head, **folded}}


def rm_scores(model: Transformer, params: PyTree, norm: Array | dict | None, sequences: Array,
              attention_mask: Array) -> Array:
    """Normalized RM score [N] float32 of whole sequences (what PPO and evaluation use)."""
    return normalize(raw_rewards(model, params, sequences, attention_mask), norm)
