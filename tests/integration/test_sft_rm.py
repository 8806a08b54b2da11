"""SFT and reward-model stages: losses against NumPy loops, RM head init, sharded == unsharded
steps, no recompilation, end-to-end SFT -> RM on synthetic tasks, resume, CLI."""
from __future__ import annotations

import functools
import json
import math
import os
import random
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import model_io, runtime, scoring
from rlhf_jax.config import apply_overrides, load_config
from rlhf_jax.data import tokenize_demonstrations
from rlhf_jax.metrics import read_jsonl_metrics
from rlhf_jax.models.config import tiny_config
from rlhf_jax.models.params import abstract_params, param_shardings, place_params
from rlhf_jax.model_io import is_our_checkpoint, load_our_checkpoint, read_extra
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sharding import make_mesh, shard_batch
from rlhf_jax.stages import reward, sft, supervised
from rlhf_jax.train_state import (create_train_state, make_train_step,
                                  train_state_shardings)

from paths import REPO
TINY_SFT = os.path.join(REPO, "experiments", "tiny_sft.py")
TINY_RM = os.path.join(REPO, "experiments", "tiny_rm.py")

WORDS = [f"w{i}" for i in range(20)]
SPECIAL = ["<pad>", "<eos>", "<unk>", "instruction", ":", "repeat", "reverse", "response"]
VOCAB = {t: i for i, t in enumerate(SPECIAL + WORDS)}
PAD, EOS = VOCAB["<pad>"], VOCAB["<eos>"]


# --- data and tokenizer -----------------------------------------------------------------------

def make_demonstrations(n: int, seed: int = 0) -> list[dict]:
    """Repeat / reverse a short word list."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        xs = r.choices(WORDS, k=r.randint(2, 6))
        op = r.choice(["repeat", "reverse"])
        out = xs if op == "repeat" else xs[::-1]
        rows.append({"prompt": f"instruction : {op} {' '.join(xs)} response :",
                     "completion": " ".join(out)})
    return rows


def make_comparisons(n: int, seed: int = 1) -> list[dict]:
    """K-way rankings (K in 2..5, ties allowed): more copies of the marker w7 = better."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        k = r.randint(2, 5)
        comps, quality = [], []
        for _ in range(k):
            xs = [x for x in r.choices(WORDS, k=r.randint(2, 6)) if x != "w7"] or ["w1"]
            for _ in range(r.choice([0, 0, 1, 2])):
                xs.insert(r.randrange(len(xs) + 1), "w7")
            comps.append(" ".join(xs))
            quality.append(xs.count("w7"))
        if len(set(quality)) == 1:
            comps[0] += " w7"
            quality[0] += 1
        levels = sorted(set(quality), reverse=True)
        rows.append({"prompt": "instruction : repeat w1 response :", "completions": comps,
                     "ranking": [levels.index(q) for q in quality]})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("sft_rm_data")
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(str(root / "tok"))
    return {
        "root": root,
        "tokenizer": tokenizer,
        "tok_dir": str(root / "tok"),
        "demos": write_jsonl(root / "demos.jsonl", make_demonstrations(480)),
        "cmp": write_jsonl(root / "cmp.jsonl", make_comparisons(320)),
    }


# --- small helpers ----------------------------------------------------------------------------

def small_cfg(**overrides):
    """One layer: compiling a random init costs seconds per layer on a loaded CPU."""
    sizes = dict(vocab_size=len(VOCAB), d_model=32, n_layers=1, n_heads=4, d_ff=64, max_position=32,
                 pad_token_id=PAD, eos_token_id=EOS)
    sizes.update(overrides)
    return tiny_config("gpt2", **sizes)


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def log_sigmoid_np(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def demo_batch(rng: np.random.Generator, b: int, p: int, r: int) -> dict[str, np.ndarray]:
    """Left-padded prompts + right-padded responses (ending in EOS), like tokenize_demonstrations."""
    t = p + r
    ids = np.full((b, t), PAD, np.int32)
    attn = np.zeros((b, t), np.int32)
    loss_mask = np.zeros((b, t), np.float32)
    for i in range(b):
        lp, lr = rng.integers(1, p + 1), rng.integers(1, r)
        ids[i, p - lp:p] = rng.integers(3, len(VOCAB), lp)
        ids[i, p:p + lr] = rng.integers(3, len(VOCAB), lr)
        ids[i, p + lr] = EOS
        attn[i, p - lp:p + lr + 1] = 1
        loss_mask[i, p:p + lr + 1] = 1
    pos = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "loss_mask": loss_mask}


def comparison_batch(rng: np.random.Generator, ks, ranks, p: int = 4, r: int = 4):
    """[B, K, T] like tokenize_comparisons: padding slots copy completion 0, ranks -1."""
    b, k_max = len(ks), max(len(x) for x in ranks)
    flat = demo_batch(rng, b * k_max, p, r)
    out = {key: flat[key].reshape(b, k_max, p + r) for key in ("input_ids", "attention_mask",
                                                                "position_ids")}
    valid = np.zeros((b, k_max), bool)
    rank_arr = np.full((b, k_max), -1, np.int32)
    for i, (k, rk) in enumerate(zip(ks, ranks)):
        valid[i, :k] = True
        rank_arr[i, :k] = rk[:k]
        for key in out:
            out[key][i, k:] = out[key][i, 0]
    return out | {"ranks": rank_arr, "valid": valid}


def optimizer_cfg(**changes):
    opt = load_config(TINY_SFT).optim
    with opt.unlocked():
        opt.update(changes)
    return opt


def count_primitive(jaxpr, name: str) -> int:
    """Occurrences of a primitive in a (closed) jaxpr, sub-jaxprs included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for sub in _sub_jaxprs(eqn.params):
            n += count_primitive(sub, name)
    return n


def _sub_jaxprs(params):
    for v in params.values():
        for item in v if isinstance(v, (list, tuple)) else [v]:
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):      # ClosedJaxpr
                yield item.jaxpr
            elif hasattr(item, "eqns"):                                  # Jaxpr
                yield item


def host_params(cfg, seed: int):
    """Random parameters for ``cfg`` filled on the host from the model's abstract shapes.

    Compiling a random init costs ~10 s on a loaded 2-core CPU; ``init_params`` itself (and its
    sharded twin) is covered in test_model / test_sharding. Norm scales ~1, everything else
    N(0, 0.05); a scalar head gets the RM init N(0, 1/sqrt(d_model + 1)), bias 0.
    """
    gen = np.random.default_rng(seed)

    def fill(path, a):
        name = jax.tree_util.keystr(path)
        if "score_head" in name:
            std = 0.0 if "bias" in name else 1.0 / math.sqrt(cfg.d_model + 1)
            return gen.normal(0.0, std, a.shape).astype(a.dtype)
        return ((1.0 if "scale" in name else 0.0) + gen.normal(0.0, 0.05, a.shape)).astype(a.dtype)
    return jax.tree_util.tree_map_with_path(fill, abstract_params(Transformer(cfg)))


@pytest.fixture(scope="module")
def lm_params():
    return host_params(small_cfg(), 7)


@pytest.fixture(scope="module")
def rm_params():
    return host_params(small_cfg(head="scalar"), 8)


# --- 1. SFT loss: response tokens only -------------------------------------------------------

class _LogitsModel:
    """Stands in for the Transformer: its "hidden states" are fixed logits (to perturb them at
    will) and ``STUB_PARAMS`` make the tied LM head the identity, so the loss sees those logits."""
    mesh, rules = None, ()

    def __init__(self, logits):
        self.logits = logits
        self.config = small_cfg(d_model=logits.shape[-1], n_heads=1, tie_embeddings=True)

    def apply(self, variables, *args, **kwargs):
        return self.logits


STUB_PARAMS = {"embed": {"embedding": jnp.eye(len(VOCAB), dtype=jnp.float32)}}


def test_lm_loss_golden_and_masks_prompt_and_padding(lm_params):
    rng = np.random.default_rng(0)
    batch = demo_batch(rng, b=3, p=6, r=5)
    model = Transformer(small_cfg())
    params = lm_params
    model_loss = jax.jit(lambda p, b_: sft.lm_loss(p, b_, None, model))
    loss, metrics = model_loss(params, batch)

    logits = np.asarray(jax.jit(model.apply)({"params": params}, batch["input_ids"],
                                             batch["attention_mask"], batch["position_ids"]))
    ids, mask = batch["input_ids"], batch["loss_mask"]
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:                       # token t+1 is a response token (or EOS)
                total -= log_softmax_np(logits[b, t])[ids[b, t + 1]]
                count += 1
    assert count == int(mask[:, 1:].sum()) and count < int(batch["attention_mask"].sum())
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)
    assert float(metrics["n_tokens"]) == count

    # Logits at positions that predict prompt or padding tokens do not matter ...
    stub = _LogitsModel(jnp.asarray(logits))
    base, _ = sft.lm_loss(STUB_PARAMS, batch, None, stub)
    np.testing.assert_allclose(float(base), total / count, rtol=1e-5)
    predicts_masked = np.concatenate([mask[:, 1:] == 0, np.ones((3, 1), bool)], axis=1)
    noisy = np.where(predicts_masked[..., None], rng.normal(0, 50, logits.shape), logits)
    perturbed, _ = sft.lm_loss(STUB_PARAMS, batch, None,
                               _LogitsModel(jnp.asarray(noisy, jnp.float32)))
    np.testing.assert_allclose(float(perturbed), float(base), rtol=1e-6)
    # ... nor do the ids there: change every prompt/padding target (fixed logits) ...
    other = dict(batch, input_ids=np.where(mask == 0, (batch["input_ids"] + 5) % len(VOCAB),
                                           batch["input_ids"]).astype(np.int32))
    relabelled, _ = sft.lm_loss(STUB_PARAMS, other, None, stub)
    np.testing.assert_allclose(float(relabelled), float(base), rtol=1e-6)
    # ... and with the real model, the token ids sitting in padding slots change nothing.
    repadded = dict(batch, input_ids=np.where(batch["attention_mask"] == 0, 9,
                                              batch["input_ids"]).astype(np.int32))
    loss_repadded, _ = model_loss(params, repadded)
    np.testing.assert_allclose(float(loss_repadded), float(loss), rtol=1e-5)


def test_tokenized_demonstrations_mask_only_the_response(files):
    rows = make_demonstrations(5, seed=3)
    arrays, _ = tokenize_demonstrations(rows, files["tokenizer"], 16, 8)
    for row, ids, mask in zip(rows, arrays["input_ids"], arrays["loss_mask"]):
        want = [VOCAB[w] for w in row["completion"].split()] + [EOS]
        assert ids[mask > 0].tolist() == want


# --- 2. RM loss: Eq. 1 over K-way rankings, one forward --------------------------------------

class _CountingModel:
    """Delegates to a Transformer, recording the shape of every ``apply`` call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def apply(self, variables, input_ids, *args, **kwargs):
        self.calls.append(tuple(input_ids.shape))
        return self.model.apply(variables, input_ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_rm_loss_golden_variable_k_and_ties(rm_params):
    rng = np.random.default_rng(1)
    ks = [4, 2, 3, 2, 4]
    ranks = [[0, 1, 1, 2], [0, 1], [1, 0, 1], [0, 0], [0, 0, 0, 0]]   # ties; two all-tie prompts
    batch = comparison_batch(rng, ks, ranks)
    b, k, t = batch["input_ids"].shape
    # Give the untrained head visible reward spread.
    model = Transformer(small_cfg(head="scalar"))
    params = dict(rm_params, score_head={"kernel": rm_params["score_head"]["kernel"] * 5,
                                         "bias": rm_params["score_head"]["bias"] + 0.3})

    counting = _CountingModel(model)
    loss, metrics = jax.jit(lambda p, b_: reward.rm_loss(p, b_, None, counting))(params, batch)
    assert counting.calls == [(b * k, t)], "all B*K completions must go through one forward"

    flat = {key: batch[key].reshape(b * k, t) for key in ("input_ids", "attention_mask", "position_ids")}
    rewards = np.asarray(jax.jit(lambda p, x: scoring.raw_rewards(
        model, p, x["input_ids"], x["attention_mask"], x["position_ids"]))(params, flat)).reshape(b, k)
    # The reward is the scalar at each completion's last real token.
    values = np.asarray(jax.jit(model.apply)({"params": params}, flat["input_ids"],
                                             flat["attention_mask"], flat["position_ids"]))
    values = values.reshape(b, k, t)
    for i in range(b):
        for j in range(k):
            last = np.nonzero(batch["attention_mask"][i, j])[0].max()
            np.testing.assert_allclose(rewards[i, j], values[i, j, last], rtol=1e-6)
    assert np.std(rewards) > 0.05

    per_prompt, n_pairs, n_correct = [], 0, 0
    for i in range(b):
        kb = int(batch["valid"][i].sum())
        s, strict = 0.0, 0
        for w in range(kb):
            for lo in range(kb):
                if batch["ranks"][i, w] < batch["ranks"][i, lo]:
                    s += log_sigmoid_np(float(rewards[i, w] - rewards[i, lo]))
                    strict += 1
                    n_correct += rewards[i, w] > rewards[i, lo]
        n_pairs += strict
        if strict:
            per_prompt.append(-s / math.comb(kb, 2))
    assert len(per_prompt) == 3 and n_pairs == 5 + 1 + 2
    np.testing.assert_allclose(float(loss), np.mean(per_prompt), rtol=1e-5)
    assert float(metrics["n_pairs"]) == n_pairs
    np.testing.assert_allclose(float(metrics["pair_accuracy"]), n_correct / n_pairs, rtol=1e-6)

    # One forward in the traced program too: as many matmuls as one [B*K, T] reward pass, and
    # the score head's matmul sees all B*K rows.
    loss_jaxpr = jax.make_jaxpr(functools.partial(reward.rm_loss, rng=None, model=model))(params, batch)
    fwd_jaxpr = jax.make_jaxpr(lambda p, x: scoring.raw_rewards(
        model, p, x["input_ids"], x["attention_mask"], x["position_ids"]))(params, flat)
    n_loss, n_fwd = (count_primitive(j.jaxpr, "dot_general") for j in (loss_jaxpr, fwd_jaxpr))
    assert n_fwd > 0 and n_loss == n_fwd
    head_dots = [e for e in loss_jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
                 and e.invars[1].aval.shape == params["score_head"]["kernel"].shape]
    assert [e.invars[0].aval.shape[:2] for e in head_dots] == [(b * k, t)]


# --- 3. RM initialization from the LM ---------------------------------------------------------

def test_reward_model_from_lm_head_init_and_trunk():
    d = 256
    lm = Transformer(small_cfg(d_model=d, n_heads=4, d_ff=16))
    lm_params = host_params(lm.config, 3)   # any LM weights will do
    rm, params = reward.reward_model_from_lm(lm, lm_params, jax.random.key(3), None)
    assert rm.config.head == "scalar"
    assert rm.config.replace(head="lm") == lm.config
    kernel = np.asarray(params["score_head"]["kernel"])
    assert kernel.shape == (d, 1)
    target = 1.0 / math.sqrt(d + 1)   # Stiennon et al.; the LM's projections use 0.02
    assert abs(kernel.std() - target) < 0.15 * target, (kernel.std(), target)
    assert abs(kernel.mean()) < 4 * target / math.sqrt(d)
    np.testing.assert_array_equal(np.asarray(params["score_head"]["bias"]), 0.0)

    assert set(params) == set(lm_params) | {"score_head"}
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.tree.map(lambda a: 0, abstract_params(rm)))
    for name in lm_params:   # the whole trunk, tied embedding included
        chex.assert_trees_all_equal(params[name], lm_params[name], custom_message=name)
    out = jax.jit(rm.apply)({"params": params}, jnp.ones((2, 5), jnp.int32))
    chex.assert_shape(out, (2, 5))
    chex.assert_type(out, jnp.float32)


def test_reward_model_from_lm_on_a_mesh(lm_params):
    mesh = make_mesh((2, 2, 2))
    lm = Transformer(small_cfg(), mesh=mesh)
    sharded = place_params(lm_params, lm, mesh)
    assert not sharded["embed"]["embedding"].sharding.is_fully_replicated
    rm, params = reward.reward_model_from_lm(lm, sharded, jax.random.key(5), mesh)
    assert rm.mesh is mesh and rm.config.head == "scalar"
    for name in lm_params:
        chex.assert_trees_all_equal(params[name], lm_params[name], custom_message=name)
    # Every parameter, the fresh head included, sits in the rules-table sharding of the RM.
    jax.tree.map(lambda a, sh: a.sharding.is_equivalent_to(sh, a.ndim) or pytest.fail(str(a.sharding)),
                 params, param_shardings(rm, mesh))
    np.testing.assert_array_equal(np.asarray(params["score_head"]["bias"]), 0.0)


# --- 4. sharded == unsharded train steps ------------------------------------------------------

def rm_batch(seed: int) -> dict[str, np.ndarray]:
    """8 prompts, K <= 3, ties."""
    return comparison_batch(np.random.default_rng(seed), [3, 2, 3, 3, 2, 3, 3, 2],
                            [[0, 1, 2], [1, 0], [0, 0, 1], [2, 1, 0], [0, 1], [0, 1, 1],
                             [1, 2, 0], [1, 0]])


def sft_batch(seed: int) -> dict[str, np.ndarray]:
    return demo_batch(np.random.default_rng(seed), b=8, p=6, r=6)


@pytest.fixture(scope="module")
def train_steps(lm_params, rm_params):
    """``get(stage, mesh_shape or None)``: a jitted train step (built once) and a state factory."""
    cache = {}

    def get(stage, mesh_shape):
        if (stage, mesh_shape) in cache:
            return cache[stage, mesh_shape]
        cfg, params_host, loss, example = {
            "sft": (small_cfg(), lm_params, sft.lm_loss, sft_batch(0)),
            "rm": (small_cfg(head="scalar"), rm_params, reward.rm_loss, rm_batch(0))}[stage]
        optimizer, _ = supervised.optimizer_from(optimizer_cfg(lr=1e-2, eps=1e-4), 10)
        mesh = None if mesh_shape is None else make_mesh(mesh_shape)
        model = Transformer(cfg, mesh=mesh)
        loss_fn = functools.partial(loss, model=model)
        if mesh is None:
            built = types.SimpleNamespace(
                step=make_train_step(loss_fn, optimizer), shardings=None,
                new_state=lambda: create_train_state(jax.tree.map(jnp.asarray, params_host), optimizer),
                put=lambda b: {k: jnp.asarray(v) for k, v in b.items()})
        else:
            shardings = train_state_shardings(model, optimizer, mesh)
            built = types.SimpleNamespace(
                step=make_train_step(loss_fn, optimizer, mesh, shardings, example), shardings=shardings,
                new_state=lambda: create_train_state(place_params(params_host, model, mesh),
                                                     optimizer, shardings),
                put=lambda b: shard_batch(b, mesh))
        cache[stage, mesh_shape] = built
        return built
    return get


def _one_step(built, batch):
    new_state, metrics = built.step(built.new_state(), built.put(batch), jax.random.key(11))
    if built.shardings is not None:   # the step kept the rules-table layout
        jax.tree.map(lambda a, sh: a.sharding.is_equivalent_to(sh, a.ndim) or pytest.fail(str(a.sharding)),
                     new_state.params, built.shardings.params)
    return jax.device_get(metrics), jax.device_get(new_state.params)


@pytest.mark.heavy     # the quick tier's sharded == unsharded: tests/unit/test_sharding.py
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_sharded_step_equals_unsharded(stage, train_steps, lm_params, rm_params):
    batch = {"sft": sft_batch, "rm": rm_batch}[stage](1)
    ref_metrics, ref_params = _one_step(train_steps(stage, None), batch)
    assert np.isfinite(ref_metrics["loss"])
    start = {"sft": lm_params, "rm": rm_params}[stage]
    moved = max(float(np.abs(a - b_).max()) for a, b_ in zip(jax.tree.leaves(ref_params),
                                                             jax.tree.leaves(start)))
    assert moved > 1e-3   # the step did change the parameters
    for mesh_shape in [(8, 1, 1), (2, 2, 2)]:
        metrics, params = _one_step(train_steps(stage, mesh_shape), batch)
        chex.assert_trees_all_close(metrics, ref_metrics, rtol=1e-5, atol=1e-6,
                                    custom_message=str(mesh_shape))
        chex.assert_trees_all_close(params, ref_params, rtol=1e-7, atol=1e-5,
                                    custom_message=str(mesh_shape))


# --- 5. no recompilation ----------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_train_step_compiles_once(stage, train_steps):
    built = train_steps(stage, (2, 2, 2))
    state, losses = built.new_state(), []
    for i in range(4):
        batch = {"sft": sft_batch, "rm": rm_batch}[stage](100 + i)   # new contents, same shapes
        state, metrics = built.step(state, built.put(batch), runtime.step_rng(0, i))
        losses.append(float(metrics["loss"]))
    assert len(set(losses)) == 4 and all(np.isfinite(losses))
    assert int(state.step) == 4
    assert built.step._cache_size() == 1


# --- 6. end to end: SFT then RM ---------------------------------------------------------------

SFT_STEPS = 400


def sft_config(files, **overrides):
    cfg = load_config(TINY_SFT)
    base = {"tokenizer": files["tok_dir"], "data.train": files["demos"],
            "data.max_prompt_len": 12, "data.max_response_len": 8, "model.d_model": 48,
            "model.n_heads": 4, "model.d_ff": 96, "model.max_position": 32,
            "train.batch_size": 32, "optim.lr": 3e-3, "train.log_every": 10,
            "train.eval_every": 0}
    base.update(overrides)
    return apply_overrides(cfg, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def sft_run(files):
    cfg = sft_config(files, **{"train.steps": SFT_STEPS})
    workdir = str(files["root"] / "sft")
    # Keep the initial parameters and the stage's own eval step (compiling a second random init
    # just for the starting loss would cost more than the whole training run).
    captured = {}
    real_init, real_eval = model_io.init_or_load_model, sft.make_eval_step

    def init_and_capture(*args, **kwargs):
        out = real_init(*args, **kwargs)
        captured.update(model=out[0], params=jax.device_get(out[1]), tokenizer=out[2])
        return out

    def eval_and_capture(*args, **kwargs):
        captured["eval_step"] = real_eval(*args, **kwargs)
        return captured["eval_step"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_io, "init_or_load_model", init_and_capture)
        mp.setattr(sft, "make_eval_step", eval_and_capture)
        final = sft.train(cfg, workdir)
    # The starting validation loss: the initial parameters on the stage's validation batches.
    model, mesh = captured["model"], captured["model"].mesh
    _, valid, _ = sft.load_arrays(cfg, captured["tokenizer"])
    start = supervised.evaluate(captured["eval_step"],
                                place_params(captured["params"], model, mesh),
                                supervised.fixed_batches(valid, cfg.train.batch_size), mesh,
                                "n_tokens")
    return {"cfg": cfg, "workdir": workdir, "start": start, "final": final}


def test_sft_end_to_end_learns(sft_run):
    workdir, final = sft_run["workdir"], sft_run["final"]
    start_loss, end_loss = sft_run["start"]["loss"], final["valid/loss"]
    print(f"SFT valid loss {start_loss:.3f} -> {end_loss:.3f}")
    assert start_loss > math.log(len(VOCAB)) - 0.5        # untrained: about uniform
    assert end_loss < 0.5 * start_loss
    assert os.path.isdir(os.path.join(workdir, "tb")) and os.listdir(os.path.join(workdir, "tb"))
    assert is_our_checkpoint(os.path.join(workdir, "model"))
    records = read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl"))
    valid = [r for r in records if "valid/loss" in r]
    assert valid[-1]["step"] == SFT_STEPS and valid[-1]["valid/loss"] == pytest.approx(end_loss)
    train_losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(train_losses) == SFT_STEPS // 10 and train_losses[-1] < train_losses[0]
    with open(os.path.join(workdir, "model", "extra.json"), encoding="utf-8") as f:
        assert json.load(f)["steps"] == SFT_STEPS


def rm_config(files, sft_workdir, **overrides):
    cfg = load_config(TINY_RM)
    base = {"init_from": os.path.join(sft_workdir, "model"), "data.train": files["cmp"],
            "data.max_k": 5, "data.max_prompt_len": 12, "data.max_response_len": 8,
            "normalize.demonstrations": files["demos"], "train.batch_size": 16,
            "train.steps": 120, "optim.lr": 1e-3, "train.eval_every": 0}
    base.update(overrides)
    return apply_overrides(cfg, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def rm_run(files, sft_run):
    cfg = rm_config(files, sft_run["workdir"])
    workdir = str(files["root"] / "rm")
    return {"workdir": workdir, "final": reward.train(cfg, workdir)}


def test_rm_end_to_end_from_sft(files, rm_run):
    workdir, final = rm_run["workdir"], rm_run["final"]
    acc = final["valid/pair_accuracy"]
    print(f"RM valid pair accuracy {acc:.3f} over {final['valid/n_pairs']:.0f} pairs")
    assert final["valid/n_pairs"] > 50 and acc > 0.95

    model, params, tokenizer = load_our_checkpoint(os.path.join(workdir, "model"))
    extra = read_extra(os.path.join(workdir, "model"))
    assert model.config.head == "scalar" and extra["mode"] == "kway"
    norm = extra["reward_norm"]
    assert norm == final["reward_norm"] and norm["std"] == 1.0
    # Recompute the demonstration scores: raw mean == stored bias, normalized mean ~ 0.
    rows = [json.loads(line) for line in open(files["demos"], encoding="utf-8")]
    arrays, _ = tokenize_demonstrations(rows, tokenizer, 12, 8, "truncate")
    assert norm["n_demonstrations"] == len(arrays["input_ids"]) == len(rows)
    raw = np.asarray(jax.jit(lambda p, x: scoring.raw_rewards(
        model, p, x["input_ids"], x["attention_mask"], x["position_ids"]))(
            params, {k: arrays[k] for k in ("input_ids", "attention_mask", "position_ids")}))
    assert raw.std() > 0.1
    np.testing.assert_allclose(raw.mean(), norm["mean"], atol=1e-3 * max(1.0, abs(norm["mean"])))
    normalized = np.asarray(scoring.normalize(jnp.asarray(raw), norm))
    assert abs(normalized.mean()) < 1e-3
    np.testing.assert_allclose(normalized, raw - norm["mean"], rtol=1e-6, atol=1e-6)


def test_rm_shuffled_pairs_mode_runs(files, sft_run, rm_run):
    # Continues from the trained RM (skips compiling a fresh head init; covers that branch too).
    cfg = rm_config(files, sft_run["workdir"], **{
        "mode": "shuffled_pairs", "train.steps": 4, "normalize.demonstrations": "",
        "init_from": os.path.join(rm_run["workdir"], "model")})
    workdir = str(files["root"] / "rm_pairs")
    final = reward.train(cfg, workdir)
    assert np.isfinite(final["valid/loss"]) and final["valid/n_pairs"] > 0
    assert final["reward_norm"] == {}
    with open(os.path.join(workdir, "model", "extra.json"), encoding="utf-8") as f:
        assert json.load(f)["mode"] == "shuffled_pairs"


# --- 7. resume after a kill -------------------------------------------------------------------

class _Killed(Exception):
    pass


def test_sft_resumes_from_latest_checkpoint(files, sft_run, monkeypatch):
    # Fine-tunes the SFT output (loading it is cheaper than compiling a fresh random init).
    cfg = sft_config(files, **{"train.steps": 8, "train.checkpoint_every": 2, "train.log_every": 1,
                               "train.batch_size": 16,
                               "init_from": os.path.join(sft_run["workdir"], "model")})
    workdir = str(files["root"] / "sft_resume")
    real_step_rng, real_save = runtime.step_rng, ckpt_lib.Checkpointer.save

    def dying_step_rng(seed, step):
        if step == 5:                 # steps 1..5 done, checkpoints at 2 and 4
            raise _Killed()
        return real_step_rng(seed, step)

    def save_and_wait(self, *args, **kwargs):
        # The kill comes after the last checkpoint hit the disk (an in-flight async save is
        # legitimately lost on a kill, which would make the resume point racy).
        out = real_save(self, *args, **kwargs)
        self.wait()
        return out

    monkeypatch.setattr(runtime, "step_rng", dying_step_rng)
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_and_wait)
    with pytest.raises(_Killed):
        sft.train(cfg, workdir)
    monkeypatch.setattr(runtime, "step_rng", real_step_rng)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    latest = checkpointer.latest_step()
    checkpointer.close()
    assert latest == 4
    first = {r["step"]: r["train/loss"] for r in read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl"))
             if "train/loss" in r}
    assert sorted(first) == [1, 2, 3, 4, 5]

    final = sft.train(cfg, workdir)
    records = [r for r in read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    # Continued at 5, not from scratch; the replayed step 5 is logged once, not twice.
    assert [r["step"] for r in records] == list(range(1, 9))
    # The replayed step sees the same state, batch and rng as before the kill.
    assert records[4]["train/loss"] == pytest.approx(first[5], rel=1e-5)
    assert np.isfinite(final["valid/loss"])


# --- 8. CLI -----------------------------------------------------------------------------------

def test_cli_show_config_overrides_and_errors(capsys):
    from rlhf_jax.cli import main

    assert main(["sft", "--config", TINY_SFT, "--show-config", "--config.train.steps=5"]) == 0
    out = capsys.readouterr().out
    train_section = out[out.index("train:"):]
    assert "steps: 5" in train_section and "batch_size: 16" in train_section

    assert main(["sft", "--config", TINY_SFT, "--show-config", "--config.train.nonexistent=1"]) == 2
    assert "rlhf-jax: error: --config.train.nonexistent: no field" in capsys.readouterr().err
    assert main(["sft", "--config", TINY_SFT, "--show-config", "--config.train.steps=abc"]) == 2
    assert "--config.train.steps='abc'" in capsys.readouterr().err
    with pytest.raises(KeyError, match="nonexistent"):   # --debug: the traceback, for us
        main(["sft", "--config", TINY_SFT, "--debug", "--show-config", "--config.train.nonexistent=1"])
    with pytest.raises(SystemExit) as exc:
        main(["sft", "--help"])
    assert exc.value.code == 0
    assert "--show-config" in capsys.readouterr().out
