"""Audited evaluation defects, each pinned with hand-computed expectations:

* an empty response is scored as prompt + one EOS, the layout the RM trained on and PPO scores;
* a ``<pad>`` / ``<bos>`` the model sampled inside its response stays in the judged text;
* eval's KL scores samples at the temperature that drew them;
* ``figures.spearman`` gives ties average ranks and a flat series nan (as scipy does).
"""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from rlhf_jax import evaluation as ev
from rlhf_jax import figures
from rlhf_jax.data import tokenize_comparisons
from rlhf_jax.models import Transformer, init_params, tiny_config
from rlhf_jax.world.export import build_word_tokenizer

# build_word_tokenizer's ids: <pad> 0, <eos> 1, <unk> 2, <bos> 3, then the words sorted.
PAD, EOS, UNK, BOS = 0, 1, 2, 3
WORDS = "a b c d e"
A, B, C, D, E = 4, 5, 6, 7, 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_word_tokenizer([WORDS], tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok_pad_is_eos(tmp_path_factory):
    """A GPT-2-style tokenizer whose pad token is its EOS."""
    t = build_word_tokenizer([WORDS], tmp_path_factory.mktemp("tok_pad_eos"))
    t.pad_token = t.eos_token
    assert t.pad_token_id == t.eos_token_id == EOS
    return t


# --- 1. an empty response: prompt + a single EOS ---------------------------------------------

def test_empty_response_is_scored_on_the_training_layout(tok):
    rm = Transformer(tiny_config("llama", head="scalar", vocab_size=len(tok)))
    params = init_params(rm, jax.random.key(3))
    P, R = 4, 3
    got = ev.score_texts(rm, params, None, tok, ["a b", "c"], ["", "d e"],
                         max_prompt_len=P, max_response_len=R)

    # Prompt left-padded to 4, then the response's only token, EOS, then padding.
    ids = np.array([[PAD, PAD, A, B, EOS, PAD, PAD]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 0, 0]], np.int32)
    # ... which is how the RM's comparisons lay out an empty completion,
    train, _ = tokenize_comparisons([{"prompt": "a b", "completions": ["", "d e"],
                                      "ranking": [0, 1]}], tok, P, R, max_k=2)
    np.testing.assert_array_equal(train["input_ids"][0, 0], ids[0])
    np.testing.assert_array_equal(train["attention_mask"][0, 0], mask[0])
    # ... and how a PPO rollout whose first sampled token is EOS reads.
    per_position = np.asarray(rm.apply({"params": params}, ids, mask))
    want = per_position[0, 4]                      # the scalar at the last real token, EOS
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)

    # The old layout, prompt + EOS + EOS, reads the RM one position later: a different score.
    doubled = np.array([[PAD, PAD, A, B, EOS, EOS, PAD]], np.int32)
    old = np.asarray(rm.apply({"params": params}, doubled,
                              np.array([[0, 0, 1, 1, 1, 1, 0]], np.int32)))[0, 5]
    assert abs(float(got[0]) - float(old)) > 1e-4

    # Normalization applies as for every other response.
    normed = ev.score_texts(rm, params, {"mean": 0.5, "std": 2.0}, tok, ["a b"], [""],
                            max_prompt_len=P, max_response_len=R)
    np.testing.assert_allclose(normed, [(want - 0.5) / 2.0], rtol=1e-5, atol=1e-6)


# --- 2. sampled <pad> / <bos> are judged as written ------------------------------------------

def test_sampled_pad_and_bos_stay_in_the_text(tok):
    ids = np.array([A, PAD, B, EOS, PAD, PAD])
    assert ev.decode_response(tok, ids) == "a <pad> b"
    # As generate_texts passes it: the sampler's mask marks the response, EOS included.
    assert ev.decode_response(tok, ids, np.array([1, 1, 1, 1, 0, 0])) == "a <pad> b"
    assert ev.decode_response(tok, np.array([BOS, A, BOS, EOS, PAD])) == "<bos> a <bos>"
    # <unk> is a real (bad) output word, as before.
    assert ev.decode_response(tok, np.array([UNK, C, EOS])) == "<unk> c"
    # A response cut at max_new_tokens has no EOS and no padding: every token is text.
    assert ev.decode_response(tok, np.array([C, PAD, PAD]), np.array([1, 1, 1])) == "c <pad> <pad>"
    # Only the first EOS ends the response; a response that is only EOS is empty.
    assert ev.decode_response(tok, np.array([A, EOS, B, EOS])) == "a"
    assert ev.decode_response(tok, np.array([EOS, PAD, PAD])) == ""


def test_pad_equal_to_eos_keeps_the_eos_cut(tok_pad_is_eos):
    # The sampler stops at a sampled pad here (it is EOS), so the text ends there too.
    ids = np.array([A, EOS, B, EOS, EOS])
    assert ev.decode_response(tok_pad_is_eos, ids) == "a"
    assert ev.decode_response(tok_pad_is_eos, ids, np.array([1, 1, 0, 0, 0])) == "a"
    assert ev.decode_response(tok_pad_is_eos, np.array([A, BOS, C, EOS, EOS])) == "a <bos> c"


def test_generate_texts_decodes_what_was_sampled_and_records_the_temperature(tok):
    model = Transformer(tiny_config("gpt2", vocab_size=len(tok)))
    params = init_params(model, jax.random.key(0))
    prompts = ["a b", "c", "d e a", "b b", "e", "c d", "a", "b c d"]
    P, N = 4, 8
    out = ev.generate_texts(model, params, tok, prompts, max_prompt_len=P, max_new_tokens=N,
                            temperature=1.0, seed=5, batch_size=8)
    assert out["temperature"] == 1.0
    names = tok.convert_ids_to_tokens(list(range(len(tok))))
    for seq, mask, text in zip(out["sequences"], out["response_mask"], out["texts"]):
        response = [int(i) for i in seq[P:][mask > 0]]
        if EOS in response:
            response = response[:response.index(EOS)]
        assert text == " ".join(names[i] for i in response)
    # With this seed the 9-word model samples <pad> inside some responses; it is in the text.
    assert any("<pad>" in text for text in out["texts"])

    warm = ev.generate_texts(model, params, tok, prompts[:2], max_prompt_len=P,
                             max_new_tokens=N, temperature=0.5, seed=5)
    assert warm["temperature"] == 0.5
    greedy = ev.generate_texts(model, params, tok, prompts[:2], max_prompt_len=P,
                               max_new_tokens=N, temperature=0.5, greedy=True)
    assert greedy["temperature"] == 1.0


# --- 3. KL at the sampling temperature ----------------------------------------------------------

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_kl_to_reference_scores_at_the_sampling_temperature():
    vocab, P, N = 37, 4, 5
    model = Transformer(tiny_config("llama", vocab_size=vocab))
    params = init_params(model, jax.random.key(1))
    ref_params = init_params(model, jax.random.key(2))
    rng = np.random.default_rng(0)
    seqs = rng.integers(4, vocab, (3, P + N)).astype(np.int32)
    attn = np.ones((3, P + N), np.int32)
    attn[1, :2] = 0                       # left-padded prompt
    attn[2, P + 2:] = 0                   # a response that stopped after 2 tokens
    samples = {"sequences": seqs, "attention_mask": attn, "response_mask": attn[:, P:],
               "prompt_len": P, "temperature": 0.5}

    def numpy_logprob_sums(p, temperature):
        logits = np.asarray(model.apply({"params": p}, seqs, attn), np.float64)[:, P - 1:-1]
        lp = _log_softmax(logits / temperature)
        chosen = np.take_along_axis(lp, seqs[:, P:, None], axis=-1)[..., 0]
        return (chosen * attn[:, P:]).sum(-1)

    def numpy_kl(temperature):
        return float(np.mean(numpy_logprob_sums(params, temperature)
                             - numpy_logprob_sums(ref_params, temperature)))

    np.testing.assert_allclose(ev.response_logprobs(model, params, samples),
                               numpy_logprob_sums(params, 0.5), rtol=1e-4, atol=1e-4)
    kl = ev.kl_to_reference(model, params, ref_params, samples, None)
    np.testing.assert_allclose(kl, numpy_kl(0.5), rtol=1e-4, atol=1e-4)
    assert abs(numpy_kl(0.5) - numpy_kl(1.0)) > 1e-3      # the temperature matters here
    # Samples without a recorded temperature (older callers) are scored at 1; an explicit
    # temperature overrides the recorded one.
    untempered = {k: v for k, v in samples.items() if k != "temperature"}
    np.testing.assert_allclose(ev.kl_to_reference(model, params, ref_params, untempered),
                               numpy_kl(1.0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ev.kl_to_reference(model, params, ref_params, samples,
                                                  temperature=1.0),
                               numpy_kl(1.0), rtol=1e-4, atol=1e-4)


# --- 5. spearman: average ranks for ties, nan for a flat series --------------------------------

@pytest.mark.parametrize("x, y, want", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [40, 30, 20, 10], -1.0),
    # y ranks 1, 2.5, 2.5, 4: cov 4.5 / sqrt(5 * 4.5) = sqrt(0.9).
    ([1, 2, 3, 4], [1, 2, 2, 3], math.sqrt(0.9)),
    # y ranks 3.5, 1.5, 3.5, 1.5, 5 (mean 3): cov 3 / sqrt(10 * 9) = 1 / sqrt(10).
    ([1, 2, 3, 4, 5], [2, 1, 2, 1, 3], 1 / math.sqrt(10)),
    # Ties in both: x ranks 1.5, 1.5, 3, 4; y ranks 1, 2, 3.5, 3.5 (both mean 2.5):
    # cov (-1)(-1.5) + (-1)(-0.5) + 0.5 + 1.5 = 4; var_x 4.5, var_y 4.5 -> 4 / 4.5.
    ([0, 0, 1, 2], [1, 2, 3, 3], 4 / 4.5),
    # Non-finite pairs are dropped first: two pairs left are too few, four rise together.
    ([1, np.nan, 2, 3], [1, 5, 2, np.inf], float("nan")),
    ([1, np.nan, 2, 3, 4], [1, 5, 2, 3, 4], 1.0),
])
def test_spearman_matches_scipy_definition(x, y, want):
    got = figures.spearman(np.array(x, float), np.array(y, float))
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("x, y", [
    ([1, 2, 3, 4], [5, 5, 5, 5]),        # flat y: the old ranks made this +1.00
    ([7, 7, 7], [1, 2, 3]),              # flat x
    ([1, 1, 1], [2, 2, 2]),
])
def test_spearman_of_a_flat_series_is_nan_and_never_holds(x, y):
    got = figures.spearman(np.array(x, float), np.array(y, float))
    assert math.isnan(got)
    # The notebooks' verdicts compare with 0: nan must read as "not reproduced" either way.
    assert figures.verdict(got > 0) == figures.verdict(got < 0) == "not reproduced"


def test_average_ranks():
    np.testing.assert_array_equal(figures.average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])),
                                  [4.0, 1.0, 4.0, 2.0, 4.0])
    np.testing.assert_array_equal(figures.average_ranks(np.array([0.5, 0.5])), [1.5, 1.5])


def test_sweeps_are_read_from_a_gcs_root(gcs_path, monkeypatch):
    from rlhf_jax import storage
    storage.write_json(storage.join(gcs_path, "seeds", "sweep.json"), {"points": [{"x": 1}]})
    monkeypatch.setenv("RLHF_JAX_SWEEPS", gcs_path)
    assert figures.load_sweep("seeds") == {"points": [{"x": 1}]}
    assert figures.load_sweeps("sizes", "seeds") == [{"points": [{"x": 1}]}]


# --- the SFT-likelihood baseline for the RM -------------------------------------------------

def test_pair_accuracy_counts_strict_preferences_by_kind():
    rows = [{"completions": ["x", "y", "z"], "ranking": [0, 1, 1], "meta": {"type": "fact"}},
            {"completions": ["u", "v"], "ranking": [1, 0], "meta": {"type": "list"}}]
    # fact: pairs (x>y), (x>z) - x scores highest: 2 of 2; the tied y, z are no pair.
    # list: pair (v>u) - but u scores higher: 0 of 1; a tie in scores would also miss.
    got = ev.pair_accuracy(rows, np.array([3.0, 1.0, 2.0, 5.0, 4.0]))
    assert got == {"accuracy": 2 / 3, "n_pairs": 3, "by_kind": {"fact": 1.0, "list": 0.0}}
    assert ev.pair_accuracy(rows, np.array([3.0, 1.0, 2.0, 4.0, 4.0]))["by_kind"]["list"] == 0.0


def test_likelihood_pair_accuracy_ranks_by_the_models_own_log_likelihood(tok):
    model = Transformer(tiny_config("llama", vocab_size=len(tok)))
    params = init_params(model, jax.random.key(5))
    P, R = 3, 3
    rows = [{"prompt": "a b", "completions": ["c", "d e", "e"], "ranking": [2, 0, 1],
             "meta": {"type": "fact"}}]

    def logp(prompt_ids, response_ids):       # sum log pi(response + EOS | prompt), by hand
        ids = np.array([[PAD] * (P - len(prompt_ids)) + prompt_ids + response_ids + [EOS]
                        + [PAD] * (R - len(response_ids))], np.int32)
        mask = (np.arange(ids.shape[1]) >= P - len(prompt_ids)) & (
            np.arange(ids.shape[1]) < P + len(response_ids) + 1)
        logits = np.asarray(model.apply({"params": params}, ids, mask[None].astype(np.int32)))
        lp = _log_softmax(logits[0].astype(np.float64))
        targets = response_ids + [EOS]
        return sum(lp[P - 1 + t, tok_id] for t, tok_id in enumerate(targets))
    scores = np.array([logp([A, B], [C]), logp([A, B], [D, E]), logp([A, B], [E])])
    want = ev.pair_accuracy(rows, scores)
    got = ev.likelihood_pair_accuracy(model, params, tok, rows, max_prompt_len=P,
                                      max_response_len=R)
    assert got == want
    assert got["n_pairs"] == 3
