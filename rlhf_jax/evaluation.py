"""Evaluation: samples, win rates with confidence intervals, gold/proxy scores, KL, capability.

The measures mirror the paper's: labelers compare each model's response with the SFT model's on
held-out prompts (win rate, 95% CI), split by labelers who made training data and labelers who
never did; the RM's (proxy) score; KL to the SFT policy on the model's own samples; and stand-ins
for the public NLP benchmarks (multiple choice by log-probability, exact-match QA) to measure
the alignment tax.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rlhf_jax import objectives as obj
from rlhf_jax import scoring
from rlhf_jax.data import tokenize_demonstrations, tokenize_prompts
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.distributed import fetch
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import progress
from rlhf_jax.sampling import SamplingConfig, make_generate_fn
from rlhf_jax.sharding import shard_global_batch


# --- batching ----------------------------------------------------------------------------------

def _padded_batches(arrays: Mapping[str, np.ndarray], batch_size: int):
    """Fixed-size batches over all rows, the last one padded by repeating row 0 (static shapes).

    Yields (batch, n_real) pairs; callers keep the first n_real outputs. Every process of a
    multi-host run iterates over the same global batches; ``_place`` feeds each process's rows
    and ``fetch`` brings the full outputs back to every process.
    """
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        n_real = int(min(batch_size, n - start))
        idx[n_real:] = 0
        yield {k: v[idx] for k, v in arrays.items()}, n_real


def _batch_size_for(mesh: Mesh | None, wanted: int) -> int:
    """Round ``wanted`` up to a multiple of the mesh's batch parallelism."""
    if mesh is None:
        return wanted
    par = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    return int(math.ceil(wanted / par) * par)


def _place(batch: Mapping[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return shard_global_batch(batch, mesh)


# --- sampling ----------------------------------------------------------------------------------

def _prompt_rows(prompts: Sequence[str | Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Canonical prompt rows: a string becomes ``{"prompt": s}``; a row read by the data layer
    keeps its ``prompt_messages``, so chat models see their own template."""
    return [{"prompt": p} if isinstance(p, str) else p for p in prompts]


def prompt_token_counts(tokenizer: Any, prompts: Sequence[str | Mapping[str, Any]],
                        max_prompt_len: int) -> list[int]:
    """The tokens of each prompt that ``generate_texts`` keeps (0: it tokenizes to nothing), so
    a caller can check prompt + new tokens against a model's positions before loading it."""
    rows = _prompt_rows(prompts)
    try:
        arrays, _ = tokenize_prompts(rows, tokenizer, max_prompt_len, "truncate")
    except ConfigError:     # raised only when no prompt kept a token
        return [0] * len(rows)
    counts = [0] * len(rows)
    for index, mask in zip(arrays["row_index"], arrays["attention_mask"]):
        counts[int(index)] = int(mask.sum())
    return counts


def generate_texts(model: Transformer, params: Any, tokenizer: Any,
                   prompts: Sequence[str | Mapping[str, Any]], *,
                   max_prompt_len: int, max_new_tokens: int, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, greedy: bool = False, seed: int = 0, mesh: Mesh | None = None,
                   batch_size: int = 64) -> dict[str, Any]:
    """Sample one response per prompt; returns decoded texts and the token arrays.

    Returns {"texts": [N] str, "sequences" [N, P+M], "attention_mask", "response_mask" [N, M],
    "prompt_len": P, "temperature": float}. Decoding stops at EOS; see ``decode_response`` for
    the texts. ``temperature`` is the one the samples were drawn at (1.0 for greedy, which takes
    the argmax of the raw logits), so ``kl_to_reference`` scores them under that distribution.
    """
    arrays, _ = tokenize_prompts(_prompt_rows(prompts), tokenizer, max_prompt_len, "truncate")
    if len(arrays["input_ids"]) != len(prompts):
        raise ValueError("some prompts tokenized to nothing; check the tokenizer")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, greedy=greedy,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    fn = make_generate_fn(model, cfg, mesh)
    batch_size = _batch_size_for(mesh, batch_size)
    outs = {"sequences": [], "attention_mask": [], "response_mask": []}
    keys = ("input_ids", "attention_mask")
    bar = progress(total=len(prompts), desc="sampling", unit="prompt", leave=False)
    for i, (batch, n_real) in enumerate(_padded_batches({k: arrays[k] for k in keys}, batch_size)):
        device = _place(batch, mesh)
        result = fetch(fn(params, device["input_ids"], device["attention_mask"],
                          jax.random.fold_in(jax.random.key(seed), i)))
        for k in outs:
            outs[k].append(np.asarray(result[k])[:n_real])
        bar.update(n_real)
    bar.close()
    out = {k: np.concatenate(v) for k, v in outs.items()}
    out["prompt_len"] = max_prompt_len
    out["temperature"] = 1.0 if greedy else float(temperature)
    out["texts"] = [decode_response(tokenizer, seq[max_prompt_len:], mask)
                    for seq, mask in zip(out["sequences"], out["response_mask"])]
    return out


def decode_response(tokenizer: Any, ids: np.ndarray, response_mask: np.ndarray | None = None) -> str:
    """A response's text as a judge should see it: every token the model sampled, as written.

    Only framing is removed: the positions after the response (``response_mask`` 0, when given)
    and everything from the first EOS on. The sampler fills the positions after EOS with pad and
    gives them mask 0, while a pad or BOS id the model sampled inside its response has mask 1 and
    comes before any EOS, so dropping those ids by value would judge a cleaned-up text the model
    never wrote (as ``skip_special_tokens`` would with ``<unk>``). Where pad == EOS (GPT-2-style
    tokenizers) a sampled pad is an EOS and ends the response, as it did in the sampler.
    """
    ids = np.asarray(ids).reshape(-1)
    if response_mask is not None:
        ids = ids[np.asarray(response_mask).reshape(-1) > 0]
    kept = [int(i) for i in ids]
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) in kept:
        kept = kept[:kept.index(int(tokenizer.eos_token_id))]
    return tokenizer.decode(kept, skip_special_tokens=False).strip()


# --- scoring token arrays ----------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "prompt_len", "temperature"))
def _response_logprob_sum(model, params, sequences, attention_mask, response_mask, prompt_len,
                          temperature=1.0):
    lp = scoring.response_logprobs(model, params, sequences, attention_mask, prompt_len,
                                   temperature=temperature)["logprobs"]
    return obj.masked_sum(lp, response_mask.astype(jnp.float32), axis=-1)


_raw_rewards = jax.jit(scoring.raw_rewards, static_argnames=("model",))


def _map_batches(fn, arrays: Mapping[str, np.ndarray], mesh: Mesh | None, batch_size: int) -> np.ndarray:
    batch_size = _batch_size_for(mesh, batch_size)
    outs = []
    for batch, n_real in _padded_batches(arrays, batch_size):
        outs.append(np.asarray(fetch(fn(_place(batch, mesh))))[:n_real])
    return np.concatenate(outs)


def _sampling_temperature(samples: Mapping[str, Any], temperature: float | None) -> float:
    if temperature is None:
        temperature = samples.get("temperature", 1.0)
    return float(temperature)


def response_logprobs(model: Transformer, params: Any, samples: Mapping[str, Any],
                      mesh: Mesh | None = None, batch_size: int = 64, *,
                      temperature: float | None = None) -> np.ndarray:
    """Sum of log pi(response | prompt) for each sample, [N] float32, with pi = softmax(logits /
    temperature): the distribution the samples were drawn from, as PPO scores its rollouts.
    ``temperature=None`` reads ``samples["temperature"]`` (``generate_texts`` sets it), else 1."""
    keys = ("sequences", "attention_mask", "response_mask")
    temperature = _sampling_temperature(samples, temperature)
    return _map_batches(lambda b: _response_logprob_sum(model, params, b["sequences"],
                                                        b["attention_mask"], b["response_mask"],
                                                        samples["prompt_len"], temperature),
                        {k: samples[k] for k in keys}, mesh, batch_size)


def kl_to_reference(model: Transformer, params: Any, ref_params: Any, samples: Mapping[str, Any],
                    mesh: Mesh | None = None, *, temperature: float | None = None) -> float:
    """Monte-Carlo KL(pi || pi_ref) per response, on the policy's own samples (nats).

    Both policies are tempered by the samples' temperature: a Monte-Carlo estimate is only
    unbiased under the distribution that drew the samples, and it is the KL PPO penalizes.
    """
    temperature = _sampling_temperature(samples, temperature)
    return float(np.mean(response_logprobs(model, params, samples, mesh, temperature=temperature)
                         - response_logprobs(model, ref_params, samples, mesh,
                                             temperature=temperature)))


def score_texts(reward_model: Transformer, params: Any, norm: Mapping[str, float] | None,
                tokenizer: Any, prompts: Sequence[str | Mapping[str, Any]],
                responses: Sequence[str], *, max_prompt_len: int, max_response_len: int,
                mesh: Mesh | None = None) -> np.ndarray:
    """Normalized RM scores of (prompt, response) text pairs (laid out as in RM training).

    An empty response is prompt + EOS, the layout the RM trained on and PPO scores (a rollout
    whose first token is EOS); the demonstration layout appends that EOS itself.
    """
    rows = [{**row, "completion": r} for row, r in zip(_prompt_rows(prompts), responses)]
    arrays, _ = tokenize_demonstrations(rows, tokenizer, max_prompt_len, max_response_len, "truncate")
    raw = _map_batches(lambda b: _raw_rewards(reward_model, params, b["input_ids"],
                                                   b["attention_mask"]),
                       {k: arrays[k] for k in ("input_ids", "attention_mask")}, mesh, 64)
    return np.asarray(scoring.normalize(jnp.asarray(raw), dict(norm or {})))


# --- labeler judgements ------------------------------------------------------------------------

def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (ties count as half a win)."""
    if n == 0:
        return float("nan"), float("nan")
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(prompt_rows: Sequence[Mapping], responses: Sequence[str], baseline: Sequence[str],
             labelers: Sequence[Any], seed: int) -> dict[str, float]:
    """Share of prompts where a labeler prefers ``responses`` over ``baseline`` (ties = 1/2).

    Each prompt is judged by one labeler drawn from the group, with the labeler's own noise,
    as a human comparison would be.
    """
    rng = np.random.default_rng([seed, 11])
    wins = 0.0
    for row, ours, theirs in zip(prompt_rows, responses, baseline):
        labeler = labelers[int(rng.integers(len(labelers)))]
        if ours == theirs:
            wins += 0.5
            continue
        ranking = labeler.rank(row, [ours, theirs], rng)
        wins += 1.0 if ranking[0] < ranking[1] else 0.5 if ranking[0] == ranking[1] else 0.0
    n = len(responses)
    lo, hi = wilson_interval(wins, n)
    return {"rate": wins / max(n, 1), "ci95": [lo, hi], "n": n}


def gold_score_by_category(prompt_rows: Sequence[Mapping], responses: Sequence[str],
                           labelers: Sequence[Any]) -> dict[str, dict[str, float]]:
    """``{prompt type: {"mean", "n", "off_task"}}``: the gold score (mean noise-free score over a
    labeler group, the 'true' quality of the responses) per kind of instruction and
    the share of responses that do not attempt it, so a model that wins by exploiting one kind
    of prompt (or by not answering) shows."""
    from rlhf_jax.world.labelers import response_features
    groups: dict[str, list[tuple[float, bool]]] = {}
    for row, resp in zip(prompt_rows, responses):
        score = float(np.mean([lab.gold_score(row, resp) for lab in labelers]))
        off = response_features(labelers[0].world, row["meta"], resp).off_task
        groups.setdefault(row["meta"]["type"], []).append((score, off))
    return {kind: {"mean": float(np.mean([s for s, _ in v])), "n": len(v),
                   "off_task": float(np.mean([o for _, o in v]))}
            for kind, v in sorted(groups.items())}


def noise_free_accuracy(comparisons: Sequence[Mapping], labelers: Sequence[Any]) -> float:
    """The share of strict pairs that the ranking labeler's own noise-free score orders the
    same way (ties count half): the accuracy of a perfect RM of that labeler, i.e. the
    ceiling the labelers' noise leaves any RM on these comparisons."""
    by_name = {lab.name: lab for lab in labelers}
    hits = total = 0.0
    for row in comparisons:
        lab = by_name.get(row.get("labeler"))
        if lab is None:
            continue
        gold = [lab.gold_score(row, c) for c in row["completions"]]
        for a, b in ((a, b) for a in range(len(gold)) for b in range(len(gold))
                     if row["ranking"][a] < row["ranking"][b]):
            total += 1
            hits += 1.0 if gold[a] > gold[b] else 0.5 if gold[a] == gold[b] else 0.0
    return hits / total if total else float("nan")


def _comparison_texts(comparisons: Sequence[Mapping]) -> tuple[list[dict], list[str]]:
    """One (prompt row, completion) per completion of every comparison, in order."""
    prompts, responses = [], []
    for row in comparisons:
        for completion in row["completions"]:
            prompts.append({k: v for k, v in row.items() if k in ("prompt", "prompt_messages")})
            responses.append(completion)
    return prompts, responses


def pair_accuracy(comparisons: Sequence[Mapping], scores: np.ndarray) -> dict[str, Any]:
    """Fraction of strict labeler preferences that ``scores`` (one per completion, in order)
    order the same way; with the labeler world's rows also per kind of instruction
    (``by_kind``: where a scorer fails). A tie in ``scores`` counts as a miss."""
    correct = total = 0
    offset = 0
    kinds: dict[str, list[int]] = {}
    for row in comparisons:
        k = len(row["completions"])
        r = scores[offset:offset + k]
        offset += k
        kind = kinds.setdefault(str((row.get("meta") or {}).get("type", "")), [0, 0])
        for a in range(k):
            for b in range(k):
                if row["ranking"][a] < row["ranking"][b]:
                    total += 1
                    correct += int(r[a] > r[b])
                    kind[0] += int(r[a] > r[b])
                    kind[1] += 1
    by_kind = {name: c / n for name, (c, n) in sorted(kinds.items()) if name and n}
    return {"accuracy": correct / max(total, 1), "n_pairs": total, "by_kind": by_kind}


def rm_pair_accuracy(reward_model: Transformer, params: Any, tokenizer: Any,
                     comparisons: Sequence[Mapping], *, max_prompt_len: int, max_response_len: int,
                     mesh: Mesh | None = None) -> dict[str, float]:
    """``pair_accuracy`` of the RM's scores."""
    prompts, responses = _comparison_texts(comparisons)
    scores = score_texts(reward_model, params, None, tokenizer, prompts, responses,
                         max_prompt_len=max_prompt_len, max_response_len=max_response_len, mesh=mesh)
    return pair_accuracy(comparisons, scores)


def likelihood_pair_accuracy(model: Transformer, params: Any, tokenizer: Any,
                             comparisons: Sequence[Mapping], *, max_prompt_len: int,
                             max_response_len: int, mesh: Mesh | None = None) -> dict[str, float]:
    """``pair_accuracy`` of a policy's own log pi(completion + EOS | prompt), summed over tokens.

    A baseline for the RM that needs no training: when the SFT model's likelihood orders the
    labelers' pairs better than the RM trained from it, the knowledge is there and the RM does
    not read it.
    """
    prompts, responses = _comparison_texts(comparisons)
    rows = [{**p, "completion": r} for p, r in zip(prompts, responses)]
    arrays, _ = tokenize_demonstrations(rows, tokenizer, max_prompt_len, max_response_len, "truncate")
    if len(arrays["input_ids"]) != len(rows):
        raise ValueError("some comparison completions tokenized to nothing; check the tokenizer")
    samples = {"sequences": arrays["input_ids"], "attention_mask": arrays["attention_mask"],
               "response_mask": arrays["loss_mask"][:, max_prompt_len:],
               "prompt_len": max_prompt_len}
    return pair_accuracy(comparisons, response_logprobs(model, params, samples, mesh))


# --- capability evals (the alignment tax) -------------------------------------------------------

def multiple_choice_accuracy(model: Transformer, params: Any, tokenizer: Any,
                             items: Sequence[Mapping], *, max_prompt_len: int,
                             max_choice_len: int = 8, mesh: Mesh | None = None) -> float:
    """Pick the choice with the highest log-probability after the context; accuracy."""
    rows = [{"prompt": item["context"], "completion": choice}
            for item in items for choice in item["choices"]]
    arrays, _ = tokenize_demonstrations(rows, tokenizer, max_prompt_len, max_choice_len, "truncate")
    # Score the choice tokens only: drop the EOS the demonstration layout appends.
    choice_mask = arrays["loss_mask"] * (arrays["input_ids"] != tokenizer.eos_token_id)
    samples = {"sequences": arrays["input_ids"], "attention_mask": arrays["attention_mask"],
               "response_mask": choice_mask[:, max_prompt_len:], "prompt_len": max_prompt_len}
    scores = response_logprobs(model, params, samples, mesh)
    correct, offset = 0, 0
    for item in items:
        k = len(item["choices"])
        correct += int(int(np.argmax(scores[offset:offset + k])) == int(item["answer"]))
        offset += k
    return correct / max(len(items), 1)


def qa_exact_match(model: Transformer, params: Any, tokenizer: Any, items: Sequence[Mapping], *,
                   max_prompt_len: int, mesh: Mesh | None = None) -> float:
    """Greedy answer's first word equals the reference answer."""
    out = generate_texts(model, params, tokenizer, [item["question"] for item in items],
                         max_prompt_len=max_prompt_len, max_new_tokens=4, greedy=True, mesh=mesh)
    hits = 0
    for item, text in zip(items, out["texts"]):
        words = text.split()
        hits += int(bool(words) and words[0] == str(item["answer"]).split()[0])
    return hits / max(len(items), 1)
