"""Tests for rlhf_jax.sampling: KV-cache decoding vs the full forward, EOS, filters, sharding."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
from compile_counting import counting_compiles

from rlhf_jax.models import Transformer, init_params, place_params, tiny_config
from rlhf_jax.sampling import (SamplingConfig, _DecodeState, _record_sample, filter_logits,
                               make_generate_fn, sample_logits, sample_with_logprobs)
from rlhf_jax.sharding import make_mesh

BATCH, PROMPT_LEN, NEW_TOKENS = 8, 6, 6
PAD = 0
GREEDY = SamplingConfig(max_new_tokens=NEW_TOKENS, greedy=True, pad_token_id=PAD)


def model_config(arch: str):
    # The llama variant uses grouped-query attention (4 query heads share 2 K/V heads).
    return tiny_config(arch, n_kv_heads=2) if arch == "llama" else tiny_config(arch)


@functools.lru_cache(maxsize=None)
def model_params_and_greedy_fn(arch: str):
    """(model, params, jitted greedy generate) per architecture, built once for the module."""
    model = Transformer(model_config(arch))
    params = init_params(model, jax.random.key(0))
    return model, params, make_generate_fn(model, GREEDY)


@pytest.fixture(params=["gpt2", "llama"])
def setup(request):
    return model_params_and_greedy_fn(request.param)


@pytest.fixture
def gpt2_setup():
    return model_params_and_greedy_fn("gpt2")


def left_padded_prompts(seed: int = 1, batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    """[B, P] int32 ids and mask; rows have 0..P-1 pad tokens on the left (pad id = PAD)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, size=(batch, PROMPT_LEN)).astype(np.int32)
    mask = np.ones((batch, PROMPT_LEN), np.int32)
    for row in range(batch):
        n_pad = row % PROMPT_LEN
        mask[row, :n_pad] = 0
        ids[row, :n_pad] = PAD
    return ids, mask


def full_forward_logits(model, params, out) -> np.ndarray:
    """Logits [B, N, V] that predict each response token, from one full (cache-free) forward."""
    return next_token_logits(model, params, out)[:, PROMPT_LEN - 1:]


def next_token_logits(model, params, out) -> np.ndarray:
    """Full-forward logits [B, T-1, V] at every position but the last (jitted: one compile)."""
    forward = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask))
    logits = forward(params, out["sequences"], out["attention_mask"])
    return np.asarray(logits[:, :-1], np.float32)


def chosen(values: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    return np.take_along_axis(values, tokens[..., None], axis=-1)[..., 0]


# --- greedy decoding over the KV cache == the full forward ------------------------------------

def test_greedy_matches_argmax_and_logprobs_of_full_forward(setup):
    model, params, generate = setup
    ids, mask = left_padded_prompts()
    out = jax.device_get(generate(params, ids, mask, jax.random.key(0)))

    assert out["sequences"].shape == (BATCH, PROMPT_LEN + NEW_TOKENS)
    assert out["sequences"].dtype == np.int32 and out["logprobs"].dtype == np.float32
    np.testing.assert_array_equal(out["sequences"][:, :PROMPT_LEN], ids)
    np.testing.assert_array_equal(out["sequences"][:, PROMPT_LEN:], out["response_ids"])
    np.testing.assert_array_equal(out["response_mask"], np.ones((BATCH, NEW_TOKENS)))
    np.testing.assert_array_equal(out["attention_mask"],
                                  np.concatenate([mask, out["response_mask"]], axis=1))
    assert int(out["n_steps"]) == NEW_TOKENS

    logits = full_forward_logits(model, params, out)
    np.testing.assert_array_equal(out["response_ids"], logits.argmax(-1))
    expected_logprobs = chosen(np.asarray(jax.nn.log_softmax(logits, axis=-1)), out["response_ids"])
    np.testing.assert_allclose(out["logprobs"], expected_logprobs, atol=1e-5)
    # Greedy samples from a point mass.
    np.testing.assert_array_equal(out["sampling_logprobs"], 0.0)


def test_single_token_prompt_needs_no_prefill(gpt2_setup):
    model, params, generate = gpt2_setup
    ids, mask = left_padded_prompts()
    out = jax.device_get(generate(params, ids[:, -1:], mask[:, -1:], jax.random.key(0)))
    np.testing.assert_array_equal(out["response_ids"],
                                  next_token_logits(model, params, out).argmax(-1))


# --- EOS and early exit -----------------------------------------------------------------------

def test_sequences_stop_at_their_own_eos(gpt2_setup):
    model, params, generate = gpt2_setup
    ids, mask = left_padded_prompts()
    free = jax.device_get(generate(params, ids, mask, jax.random.key(0)))
    eos = int(free["response_ids"][0, 0])   # row 0 stops right after its first token
    stopping = make_generate_fn(model, dataclasses.replace(GREEDY, eos_token_id=eos))
    out = jax.device_get(stopping(params, ids, mask, jax.random.key(0)))

    lengths = out["response_mask"].sum(1)
    assert lengths[0] == 1
    assert lengths.max() > 1, "this seed should leave some sequence running past step 1"
    for row in range(BATCH):
        hits = np.flatnonzero(free["response_ids"][row] == eos)
        length = hits[0] + 1 if hits.size else NEW_TOKENS   # EOS itself is a response token
        assert lengths[row] == length
        np.testing.assert_array_equal(out["response_mask"][row, :length], 1)
        np.testing.assert_array_equal(out["response_mask"][row, length:], 0)
        np.testing.assert_array_equal(out["response_ids"][row, :length],
                                      free["response_ids"][row, :length])
        np.testing.assert_array_equal(out["response_ids"][row, length:], PAD)
        np.testing.assert_allclose(out["logprobs"][row, :length], free["logprobs"][row, :length],
                                   atol=1e-6)
        np.testing.assert_array_equal(out["logprobs"][row, length:], 0.0)
    np.testing.assert_array_equal(out["attention_mask"][:, PROMPT_LEN:], out["response_mask"])
    assert int(out["n_steps"]) == lengths.max()


def test_loop_exits_early_when_every_sequence_has_stopped(gpt2_setup):
    model, params, generate = gpt2_setup
    ids, mask = left_padded_prompts()
    # One left-padded prompt repeated in every row: every row's first greedy token is the same.
    ids, mask = np.repeat(ids[3:4], BATCH, axis=0), np.repeat(mask[3:4], BATCH, axis=0)
    first = int(jax.device_get(generate(params, ids, mask, jax.random.key(0)))["response_ids"][0, 0])
    stopping = make_generate_fn(model, dataclasses.replace(GREEDY, eos_token_id=first))
    out = jax.device_get(stopping(params, ids, mask, jax.random.key(0)))
    assert int(out["n_steps"]) == 1
    np.testing.assert_array_equal(out["response_ids"][:, 0], first)
    np.testing.assert_array_equal(out["response_mask"][:, 0], 1)
    np.testing.assert_array_equal(out["response_mask"][:, 1:], 0)
    np.testing.assert_array_equal(out["response_ids"][:, 1:], PAD)


def test_a_sampled_pad_has_mask_one_and_padding_after_eos_mask_zero():
    """The mask, not the id, tells a pad the model wrote from the padding after its EOS."""
    eos, word, vocab, prompt_len, n = 1, 5, 8, 2, 3
    cfg = dataclasses.replace(GREEDY, max_new_tokens=n, eos_token_id=eos)

    def one_hot_logits(tokens):
        return jnp.asarray(np.eye(vocab, dtype=np.float32)[tokens] * 10.0)

    state = _DecodeState(
        step=jnp.int32(0), input_tokens=jnp.zeros((2,), jnp.int32), cache=None,
        slot_mask=jnp.asarray([[1, 1, 0, 0, 0]] * 2, jnp.int32),
        response_ids=jnp.full((2, n), PAD, jnp.int32),
        response_mask=jnp.zeros((2, n), jnp.int32),
        logprobs=jnp.zeros((2, n), jnp.float32), sampling_logprobs=jnp.zeros((2, n), jnp.float32),
        done=jnp.zeros((2,), bool))
    # Row 0 samples pad, a word, EOS; row 1 samples EOS first, then would sample words.
    for tokens in ([PAD, eos], [word, word], [eos, word]):
        state = _record_sample(state, one_hot_logits(tokens), jax.random.key(0), prompt_len, cfg)
    np.testing.assert_array_equal(state.response_ids, [[PAD, word, eos], [eos, PAD, PAD]])
    np.testing.assert_array_equal(state.response_mask, [[1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(state.slot_mask, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(state.done, [True, True])


# --- filters and stochastic sampling -------------------------------------------------------

def test_top_k_one_and_tiny_top_p_equal_greedy_on_random_logits():
    logits = jax.random.normal(jax.random.key(1), (32, 64)) * 3.0
    greedy = np.asarray(jnp.argmax(logits, -1))
    for seed in range(3):
        rng = jax.random.key(seed)
        top_k_1 = SamplingConfig(max_new_tokens=1, temperature=1.7, top_k=1)
        tiny_top_p = SamplingConfig(max_new_tokens=1, temperature=1.7, top_p=1e-6)
        np.testing.assert_array_equal(sample_logits(rng, logits, top_k_1), greedy)
        np.testing.assert_array_equal(sample_logits(rng, logits, tiny_top_p), greedy)
        _, _, sampling_logprobs = sample_with_logprobs(rng, logits, top_k_1)
        np.testing.assert_allclose(sampling_logprobs, 0.0, atol=1e-6)   # all mass on one token


def test_top_k_one_generation_equals_greedy_generation(gpt2_setup):
    model, params, generate = gpt2_setup
    ids, mask = left_padded_prompts()
    top_k_1 = make_generate_fn(model, SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.8,
                                                     top_k=1, pad_token_id=PAD))
    sampled = jax.device_get(top_k_1(params, ids, mask, jax.random.key(5)))
    greedy = jax.device_get(generate(params, ids, mask, jax.random.key(0)))
    np.testing.assert_array_equal(sampled["sequences"], greedy["sequences"])
    np.testing.assert_allclose(sampled["logprobs"], greedy["logprobs"], atol=1e-6)


def test_filter_logits_keeps_top_k_and_smallest_nucleus():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
    shuffled = np.array([2, 0, 3, 1])           # filters must not depend on token order
    logits = jnp.asarray(np.log(probs)[:, shuffled])
    kept = lambda **kw: np.isfinite(np.asarray(
        filter_logits(logits, SamplingConfig(max_new_tokens=1, **kw))))[0][np.argsort(shuffled)]

    np.testing.assert_array_equal(kept(top_k=3), [True, True, True, False])
    # 0.5 < 0.75, so the second token is still needed; the first two reach 0.8 >= 0.75.
    np.testing.assert_array_equal(kept(top_p=0.75), [True, True, False, False])
    np.testing.assert_array_equal(kept(top_p=0.5), [True, False, False, False])
    np.testing.assert_array_equal(kept(top_p=1e-9), [True, False, False, False])
    # Top-p after top-k renormalises over the k survivors: 0.5/0.8 = 0.625 < 0.9 keeps both.
    np.testing.assert_array_equal(kept(top_k=2, top_p=0.9), [True, True, False, False])
    np.testing.assert_array_equal(kept(), [True, True, True, True])

    tempered = filter_logits(logits, SamplingConfig(max_new_tokens=1, temperature=2.0))
    np.testing.assert_allclose(tempered, logits / 2.0, rtol=1e-6)


def test_sampled_frequencies_follow_the_softmax():
    n = 20000
    logits = jnp.tile(jnp.array([[0.0, np.log(3.0)]], jnp.float32), (n, 1))   # p = (1/4, 3/4)
    for temperature, p_second in [(1.0, 0.75), (2.0, np.sqrt(3) / (1 + np.sqrt(3)))]:
        cfg = SamplingConfig(max_new_tokens=1, temperature=temperature)
        tokens = np.asarray(sample_logits(jax.random.key(7), logits, cfg))
        # Binomial std is ~0.003 at n=20000; 0.02 is a loose, non-flaky bound.
        assert abs(tokens.mean() - p_second) < 0.02


def test_temperature_sampling_is_deterministic_per_rng_and_scores_raw_logits(gpt2_setup):
    model, params, _ = gpt2_setup
    ids, mask = left_padded_prompts()
    cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.5, top_k=8, pad_token_id=PAD)
    generate = make_generate_fn(model, cfg)
    first = jax.device_get(generate(params, ids, mask, jax.random.key(11)))
    again = jax.device_get(generate(params, ids, mask, jax.random.key(11)))
    other = jax.device_get(generate(params, ids, mask, jax.random.key(12)))
    np.testing.assert_array_equal(first["sequences"], again["sequences"])
    assert (first["response_ids"] != other["response_ids"]).any()

    # "logprobs" score the raw (temperature 1, unfiltered) distribution; "sampling_logprobs"
    # the tempered top-k distribution the tokens were drawn from.
    logits = full_forward_logits(model, params, first)
    tokens = first["response_ids"]
    np.testing.assert_allclose(first["logprobs"],
                               chosen(np.asarray(jax.nn.log_softmax(logits, -1)), tokens),
                               atol=1e-5)
    filtered = filter_logits(jnp.asarray(logits.reshape(-1, logits.shape[-1])), cfg)
    sampling = np.asarray(jax.nn.log_softmax(filtered, -1)).reshape(logits.shape)
    np.testing.assert_allclose(first["sampling_logprobs"], chosen(sampling, tokens), atol=1e-5)
    assert np.isfinite(first["sampling_logprobs"]).all()


# --- sharding and compilation ---------------------------------------------------------------

@pytest.mark.parametrize("mesh_shape, jax_make_mesh", [((2, 2, 2), False), ((8, 1, 1), False),
                                                       ((2, 2, 2), True)],
                         ids=["2x2x2", "8x1x1", "2x2x2-jax.make_mesh"])
def test_sharded_generation_equals_unsharded(mesh_shape, jax_make_mesh):
    plain_model, plain_params, plain_generate = model_params_and_greedy_fn("llama")
    ids, mask = left_padded_prompts()
    expected = jax.device_get(plain_generate(plain_params, ids, mask, jax.random.key(0)))

    # jax.make_mesh gives Explicit axes by default; every entry point accepts such a mesh.
    mesh = (jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor")) if jax_make_mesh
            else make_mesh(mesh_shape))
    model = Transformer(plain_model.config, mesh=mesh)   # activation sharding constraints on
    params = place_params(plain_params, model, mesh)
    out = make_generate_fn(model, GREEDY, mesh)(params, ids, mask, jax.random.key(0))
    assert out["sequences"].sharding.spec[0] == ("data", "fsdp")
    out = jax.device_get(out)
    np.testing.assert_array_equal(out["sequences"], expected["sequences"])
    np.testing.assert_array_equal(out["response_mask"], expected["response_mask"])
    np.testing.assert_allclose(out["logprobs"], expected["logprobs"], atol=1e-5)
    assert int(out["n_steps"]) == int(expected["n_steps"])


def test_repeated_calls_do_not_recompile(gpt2_setup):
    model, params, _ = gpt2_setup
    cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.9, top_p=0.9,
                         eos_token_id=3, pad_token_id=PAD)
    generate = make_generate_fn(model, cfg)
    inputs = [(*left_padded_prompts(seed), jax.random.key(seed)) for seed in range(3)]
    jax.block_until_ready(generate(params, *inputs[0]))

    with counting_compiles() as counter:
        for ids, mask, rng in inputs[1:]:
            jax.block_until_ready(generate(params, ids, mask, rng))
    assert counter.count == 0
    assert generate._cache_size() == 1


def test_sampling_config_rejects_bad_values():
    for bad in [dict(max_new_tokens=0), dict(max_new_tokens=4, temperature=0.0),
                dict(max_new_tokens=4, top_k=-1), dict(max_new_tokens=4, top_p=0.0),
                dict(max_new_tokens=4, top_p=1.5)]:
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    assert SamplingConfig(max_new_tokens=4, temperature=0.0, greedy=True).greedy
