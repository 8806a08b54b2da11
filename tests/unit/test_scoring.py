"""scoring.py: chunked log-probs equal the full-logits ones (values and gradients), the memory
plan shrinks the PPO update's temporaries without changing its numbers, RM scores as before."""
import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlhf_jax import objectives as obj
from rlhf_jax import scoring
from rlhf_jax.config import ppo_config
from rlhf_jax.models.config import tiny_config
from rlhf_jax.models.params import init_params
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sharding import make_mesh
from rlhf_jax.stages import ppo

B, P, N = 4, 5, 11          # N = 11 is not a multiple of the chunk sizes below: padding is exercised


def batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    seqs = rng.integers(0, vocab, (B, P + N)).astype(np.int32)
    attn = np.ones((B, P + N), np.int32)
    attn[1, :2] = 0                      # left padding
    attn[2, P + 7:] = 0                  # a short response
    return jnp.asarray(seqs), jnp.asarray(attn)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def net(request):
    model = Transformer(tiny_config(request.param, vocab_size=97))
    return model, init_params(model, jax.random.key(0))


def full_logits_reference(model, params, seqs, attn, temperature):
    logits = model.apply({"params": params}, seqs, attn)[:, P - 1:-1] / temperature
    return obj.token_logprobs(logits, seqs[:, P:]), obj.token_entropy(logits)


@pytest.mark.parametrize("chunk", [0, 1, 4, 11, 64])
def test_chunked_logprobs_equal_full_logits(net, chunk):
    model, params = net
    seqs, attn = batch(model.config.vocab_size)
    want_lp, want_ent = full_logits_reference(model, params, seqs, attn, 0.7)
    got = jax.jit(lambda p: scoring.response_logprobs(model, p, seqs, attn, P, temperature=0.7,
                                                      chunk=chunk, entropy=True))(params)
    chex.assert_type([got["logprobs"], got["entropy"]], jnp.float32)
    chex.assert_shape(got["logprobs"], (B, N))
    np.testing.assert_allclose(got["logprobs"], want_lp, atol=1e-5)
    np.testing.assert_allclose(got["entropy"], want_ent, atol=1e-5)


def test_chunked_gradient_equals_full_gradient(net):
    model, params = net
    seqs, attn = batch(model.config.vocab_size, seed=1)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal((B, N)), jnp.float32)

    def loss_full(p):
        lp, ent = full_logits_reference(model, p, seqs, attn, 1.0)
        return jnp.sum(lp * weights) + 0.1 * jnp.sum(ent)

    def loss_chunked(p):
        out = scoring.response_logprobs(model, p, seqs, attn, P, chunk=3, entropy=True)
        return jnp.sum(out["logprobs"] * weights) + 0.1 * jnp.sum(out["entropy"])

    g_full, g_chunk = jax.jit(jax.grad(loss_full))(params), jax.jit(jax.grad(loss_chunked))(params)
    chex.assert_trees_all_close(g_full, g_chunk, rtol=1e-4, atol=2e-5)


def test_sequence_nll_equals_next_token_loss(net):
    model, params = net
    seqs, attn = batch(model.config.vocab_size, seed=3)
    loss_mask = attn.astype(jnp.float32).at[:, :P].set(0.0)
    position_ids = jnp.maximum(jnp.cumsum(attn, -1) - 1, 0)
    data = dict(input_ids=seqs, attention_mask=attn, position_ids=position_ids, loss_mask=loss_mask)
    logits = model.apply({"params": params}, seqs, attn, position_ids)
    want, want_m = obj.next_token_loss(logits[:, :-1], seqs[:, 1:], loss_mask[:, 1:])
    for chunk in (0, 5):
        got, got_m = scoring.sequence_nll(model, params, data, chunk=chunk)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(got_m["accuracy"], want_m["accuracy"], rtol=1e-6)
        assert float(got_m["n_tokens"]) == float(want_m["n_tokens"])


def test_rm_scores_and_values_match_the_scalar_head():
    model = Transformer(tiny_config("llama", head="scalar", vocab_size=97))
    params = init_params(model, jax.random.key(4))
    seqs, attn = batch(97, seed=5)
    per_position = model.apply({"params": params}, seqs, attn)
    raw = obj.value_at_last_token(per_position, attn)
    np.testing.assert_allclose(scoring.raw_rewards(model, params, seqs, attn), raw, rtol=1e-6)
    norm = {"mean": 0.5, "std": 2.0}
    np.testing.assert_allclose(scoring.rm_scores(model, params, norm, seqs, attn), (raw - 0.5) / 2.0,
                               rtol=1e-6)
    np.testing.assert_allclose(scoring.rm_scores(model, params, scoring.norm_array(norm), seqs, attn),
                               (raw - 0.5) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(scoring.response_values(model, params, seqs, attn, P),
                               per_position[:, P - 1:-1], rtol=1e-6)


# --- the memory plan on a PPO update -----------------------------------------------------------

def memory_plan_config(plan: bool) -> ml_collections.ConfigDict:
    """A PPO config whose vocabulary dominates activations (as a 128k vocabulary does)."""
    c = ppo_config()
    arch = dict(arch="gpt2", vocab_size=4096, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                max_position=128)
    c.policy_model = ml_collections.ConfigDict(arch)
    c.reward_model = ml_collections.ConfigDict(arch)
    c.mesh.shape = (-1, 1, 1)
    c.data.max_prompt_len, c.data.max_response_len, c.data.ptx_seq_len = 16, 48, 64
    c.ppo.rollout_batch_size, c.ppo.minibatch_size, c.ppo.ptx_coef = 16, 8, 1.0
    c.ppo.frozen_dtype = "bfloat16" if plan else "float32"
    c.ppo.logprob_chunk = 8 if plan else 0
    return c


@pytest.mark.slow     # two compiles of a 4096-word update: a minute of the quick tier's ten
def test_memory_plan_shrinks_the_update_and_keeps_its_numbers():
    mesh = make_mesh((1, 1, 1))
    results = {}
    for plan in (False, True):
        program = ppo.build(memory_plan_config(plan), mesh)
        compiled = {k: program.steps[k].lower().compile() for k in ("update",)}
        mem = {k: c.memory_analysis() for k, c in compiled.items()}
        state, frozen = program.init_state(jax.random.key(0))
        args = program.random_args("update", state, frozen, jax.random.key(1))
        new_policy, _, stats = compiled["update"](*args)
        results[plan] = dict(
            temp={k: m.temp_size_in_bytes for k, m in mem.items()},
            frozen_bytes=sum(x.nbytes for x in jax.tree.leaves((frozen.reference, frozen.reward))),
            stats=jax.device_get(stats), params=jax.device_get(new_policy.params))
    before, after = results[False], results[True]
    # No float32 [B, N, V] (minibatch 8 x 48 x 4096 x 4 B = 6.3 MB, plus the ptx batch's): the
    # update's temporaries shrink by more than one such tensor.
    full_logits = 8 * 48 * 4096 * 4
    assert before["temp"]["update"] - after["temp"]["update"] > full_logits, (before, after)
    assert after["frozen_bytes"] * 2 == before["frozen_bytes"]
    # Same update (the frozen networks don't enter it): stats and new params agree.
    for key in ("policy_loss", "entropy", "ptx_loss", "policy_grad_norm"):
        np.testing.assert_allclose(after["stats"][key], before["stats"][key], rtol=2e-5, atol=1e-6)
    chex.assert_trees_all_close(after["params"], before["params"], rtol=1e-7, atol=1e-6)
