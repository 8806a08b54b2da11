"""DPO stage (rlhf_jax.stages.dpo): reference log-probs and the update against NumPy, sharded ==
unsharded steps, no recompilation, and train() end to end (loss down, model and metrics
written, resume) on a tiny synthetic ranking task.

Everything is micro-sized (one layer, d_model 32, 12 tokens) and module-scoped, so each
program compiles once."""
from __future__ import annotations

import json
import math
import os
import random

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_counting import counting_compiles

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import objectives as obj
from rlhf_jax import model_io, runtime, scoring, validate
from rlhf_jax.cli import DEFAULT_CONFIGS, TRAIN_COMMANDS
from rlhf_jax.config import apply_overrides, load_config, stage_configs
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import read_jsonl_metrics
from rlhf_jax.model_io import is_our_checkpoint, read_extra, save_our_checkpoint
from rlhf_jax.models.config import tiny_config
from rlhf_jax.models.params import abstract_params, place_params
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sharding import make_mesh, shard_batch
from rlhf_jax.stages import dpo
from rlhf_jax.train_state import create_train_state, shardings_of

from paths import REPO
TINY_DPO = os.path.join(REPO, "experiments", "tiny_dpo.py")

WORDS = [f"w{i}" for i in range(20)]
SPECIAL = ["<pad>", "<eos>", "<unk>", "instruction", ":", "repeat", "reverse", "response"]
VOCAB = {t: i for i, t in enumerate(SPECIAL + WORDS)}
PAD, EOS = VOCAB["<pad>"], VOCAB["<eos>"]
MARKER = "w7"
P, R, K, B = 6, 6, 3, 8        # prompt / response slots, max completions, prompts per batch
BETA = 0.5


# --- data, tokenizer, networks ------------------------------------------------------------------

def make_comparisons(n: int, seed: int = 1, max_k: int = K) -> list[dict]:
    """K-way rankings (K in 2..max_k, ties allowed): more copies of the marker w7 = better."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        k = r.randint(2, max_k)
        comps, quality = [], []
        for _ in range(k):
            xs = [x for x in r.choices(WORDS, k=r.randint(2, 4)) if x != MARKER] or ["w1"]
            for _ in range(r.choice([0, 0, 1, 2])):
                xs.insert(r.randrange(len(xs) + 1), MARKER)
            comps.append(" ".join(xs))
            quality.append(xs.count(MARKER))
        if len(set(quality)) == 1:
            comps[0] += f" {MARKER}"
            quality[0] += 1
        levels = sorted(set(quality), reverse=True)
        rows.append({"prompt": f"instruction : repeat {r.choice(WORDS)} response :",
                     "completions": comps, "ranking": [levels.index(q) for q in quality]})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def model_config(**overrides):
    sizes = dict(vocab_size=len(VOCAB), d_model=32, n_layers=1, n_heads=4, d_ff=64,
                 max_position=32, pad_token_id=PAD, eos_token_id=EOS)
    return tiny_config("gpt2", **{**sizes, **overrides})


def host_params(cfg, seed: int, scale: float = 0.3):
    """Random weights filled on the host (a compiled random init costs seconds per layer on a
    loaded CPU): norm scales ~1, everything else N(0, scale), so log-probs are far from
    uniform and the policy / reference differences are visible."""
    gen = np.random.default_rng(seed)

    def fill(path, a):
        name = jax.tree_util.keystr(path)
        return ((1.0 if "scale" in name else 0.0) + gen.normal(0.0, scale, a.shape)).astype(a.dtype)
    return jax.tree_util.tree_map_with_path(fill, abstract_params(Transformer(cfg)))


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("dpo_data")
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="<eos>", unk_token="<unk>")
    # The SFT stand-in: small random weights, saved as the SFT stage saves its model.
    cfg = model_config()
    sft_params = host_params(cfg, 0, scale=0.05)
    save_our_checkpoint(str(root / "sft"), Transformer(cfg), sft_params, tokenizer,
                        extra={"stage": "sft"})
    pairs = [{"prompt": "instruction : repeat w1 response :", "chosen": "w7 w2",
              "rejected": "w3 w4"}, {"prompt": "instruction : reverse w5 response :",
                                     "chosen": "w7 w7", "rejected": "w5"}]
    return {"root": root, "tokenizer": tokenizer, "sft": str(root / "sft"),
            "sft_params": sft_params,
            "cmp": write_jsonl(root / "cmp.jsonl", make_comparisons(160)),
            "pairs": write_jsonl(root / "pairs.jsonl", pairs * 8)}


def dpo_cfg(files, *extra: str):
    base = [f"init_from={files['sft']}", f"data.train={files['cmp']}", f"data.max_k={K}",
            f"data.max_prompt_len={P}", f"data.max_response_len={R}", f"train.batch_size={B}",
            f"beta={BETA}", "train.eval_every=0", "optim.lr=1e-2", "optim.eps=1e-4",
            "optim.decay=constant"]
    return apply_overrides(load_config(TINY_DPO), base + list(extra))


@pytest.fixture(scope="module")
def batches(files):
    """Tokenized comparison batches of [B, K, T] exactly as train() makes them."""
    cfg = dpo_cfg(files)
    arrays, _ = dpo.load_arrays(cfg, files["tokenizer"])
    assert arrays["input_ids"].shape[1:] == (K, P + R)
    n = arrays["input_ids"].shape[0] // B
    return [{k: v[i * B:(i + 1) * B] for k, v in arrays.items()} for i in range(n)]


@pytest.fixture(scope="module")
def weights(files):
    """Policy and reference host weights that differ (a policy equal to its reference has DPO
    loss log 2 exactly, which would make the golden checks weak)."""
    cfg = model_config()
    return {"policy": host_params(cfg, 1), "reference": host_params(cfg, 2)}


@pytest.fixture(scope="module")
def programs(files):
    """``get(mesh_shape)`` -> (program, mesh), built once per shape."""
    cache = {}

    def get(shape):
        if shape not in cache:
            mesh = make_mesh(shape)
            cfg = dpo_cfg(files, "train.logprob_chunk=4")   # 6 response positions: 2 blocks
            cache[shape] = (dpo.build(cfg, mesh, model=Transformer(model_config(), mesh=mesh),
                                      total_steps=10), mesh)
        return cache[shape]
    return get


def fresh(program, mesh, weights):
    """(state, reference) in the program's shardings."""
    model = program.models["policy"]
    state = create_train_state(place_params(weights["policy"], model, mesh),
                               program.optimizer, shardings_of(program.state))
    reference = dpo.frozen_copy(program.frozen, place_params(weights["reference"], model, mesh))
    return state, reference


def loss_at_reference(arrays) -> float:
    """DPO loss of a policy equal to its reference: every strict pair costs log 2, a prompt
    averages over its C(K, 2) pairs (a tie is a pair that costs nothing), then over prompts
    with a strict pair (as the RM loss)."""
    per_prompt = []
    for ranks, valid in zip(arrays["ranks"], arrays["valid"]):
        r = ranks[valid]
        strict = sum(int(a < b) for a in r for b in r)
        if strict:
            per_prompt.append(strict * math.log(2) / math.comb(len(r), 2))
    return float(np.mean(per_prompt))


def numpy_sequence_logps(params, batch) -> np.ndarray:
    """[B, K] sum over response tokens of log softmax(logits at t-1)[token t], in float64."""
    model = Transformer(model_config())
    b, k, t = batch["input_ids"].shape
    flat = {key: batch[key].reshape(b * k, t) for key in ("input_ids", "attention_mask",
                                                          "position_ids", "response_mask")}
    logits = np.asarray(jax.jit(model.apply)({"params": params}, flat["input_ids"],
                                             flat["attention_mask"], flat["position_ids"]))
    logp = log_softmax_np(logits)
    out = np.zeros(b * k)
    for i in range(b * k):
        for pos in range(P, t):
            if flat["response_mask"][i, pos]:
                out[i] += logp[i, pos - 1, flat["input_ids"][i, pos]]
    return out.reshape(b, k)


# --- 1. data ------------------------------------------------------------------------------------

def test_batches_hold_whole_rankings_with_responses_at_the_prompt_length(batches, files):
    batch = batches[0]
    assert batch["input_ids"].shape == (B, K, P + R) and batch["valid"].shape == (B, K)
    # Every response starts at position P: the response mask is 0 before it.
    assert not batch["response_mask"][..., :P].any() and batch["response_mask"][..., P].all()
    # K = 2 rows pad slot 2 with a copy of completion 0, marked invalid.
    two = np.nonzero(batch["valid"].sum(-1) == 2)[0]
    assert len(two) and np.all(batch["ranks"][two, 2] == -1)
    np.testing.assert_array_equal(batch["input_ids"][two, 2], batch["input_ids"][two, 0])


def test_trl_pairs_are_k2_and_need_no_padding_slots(files):
    cfg = dpo_cfg(files, f"data.train={files['pairs']}", "data.max_k=9")
    train, valid = dpo.load_arrays(cfg, files["tokenizer"])
    assert train["input_ids"].shape[1] == 2 and valid["input_ids"].shape[1] == 2
    assert train["ranks"].tolist() == [[0, 1]] * len(train["ranks"])
    chosen = train["input_ids"][:, 0][train["response_mask"][:, 0] > 0]
    assert {VOCAB[MARKER], EOS} <= set(chosen.tolist())


# --- 2. the steps against NumPy -----------------------------------------------------------------

def test_ref_logps_step_equals_direct_scoring_of_the_reference(programs, weights, batches):
    program, mesh = programs((2, 2, 2))
    _, reference = fresh(program, mesh, weights)
    batch = batches[0]
    got = np.asarray(jax.device_get(program.steps["ref_logps"].fn(reference, shard_batch(batch, mesh))))
    assert got.shape == (B, K) and got.dtype == np.float32
    want = numpy_sequence_logps(weights["reference"], batch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # The same numbers as the shared scorer PPO and eval use (response_logprobs, summed).
    model = Transformer(model_config())
    flat = lambda x: x.reshape(B * K, P + R)
    direct = jax.jit(lambda p: scoring.response_logprobs(
        model, p, flat(batch["input_ids"]), flat(batch["attention_mask"]), P)["logprobs"])(
            weights["reference"])
    direct = (np.asarray(direct) * flat(batch["response_mask"])[:, P:]).sum(-1).reshape(B, K)
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-4)
    assert np.all(got < -1.0)          # real, far-from-certain sequences


def test_update_loss_equals_dpo_loss_on_numpy_logps(programs, weights, batches):
    program, mesh = programs((2, 2, 2))
    state, reference = fresh(program, mesh, weights)
    batch = shard_batch(batches[0], mesh)
    ref_logps = program.steps["ref_logps"].fn(reference, batch)
    new_state, metrics = program.steps["update"].fn(state, batch, ref_logps, jax.random.key(0))
    metrics = jax.device_get(metrics)

    policy_logps = numpy_sequence_logps(weights["policy"], batches[0])
    ref_np = numpy_sequence_logps(weights["reference"], batches[0])
    want, want_metrics = jax.device_get(obj.dpo_loss(
        jnp.asarray(policy_logps, jnp.float32), jnp.asarray(ref_np, jnp.float32),
        batches[0]["ranks"], batches[0]["valid"], BETA))
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5, atol=1e-5)
    for key in ("pair_accuracy", "n_pairs", "chosen_reward", "rejected_reward", "reward_margin"):
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)
    # Independent of objectives: -log sigmoid(beta * (margin_w - margin_l)) by hand, per pair,
    # averaged over each prompt's C(K_b, 2) and then over prompts with a strict pair.
    margins = BETA * (policy_logps - ref_np)
    per_prompt = []
    for i in range(B):
        kb = int(batches[0]["valid"][i].sum())
        ranks = batches[0]["ranks"][i]
        terms = [math.log1p(math.exp(-(margins[i, w] - margins[i, lo])))
                 for w in range(kb) for lo in range(kb) if ranks[w] < ranks[lo]]
        if terms:
            per_prompt.append(sum(terms) / math.comb(kb, 2))
    np.testing.assert_allclose(metrics["loss"], np.mean(per_prompt), rtol=1e-5)
    assert abs(float(metrics["loss"]) - loss_at_reference(batches[0])) > 0.05  # policy != ref
    assert int(new_state.step) == 1 and np.isfinite(metrics["grad_norm"])


def test_policy_equal_to_reference_gives_log2_per_pair_and_zero_rewards(programs, weights, batches):
    program, mesh = programs((2, 2, 2))
    same = {"policy": weights["reference"], "reference": weights["reference"]}
    state, reference = fresh(program, mesh, same)
    batch = shard_batch(batches[1], mesh)
    ref_logps = program.steps["ref_logps"].fn(reference, batch)
    _, metrics = program.steps["update"].fn(state, batch, ref_logps, jax.random.key(0))
    metrics = jax.device_get(metrics)
    np.testing.assert_allclose(metrics["loss"], loss_at_reference(batches[1]), rtol=1e-6)
    np.testing.assert_allclose(metrics["reward_margin"], 0.0, atol=1e-6)
    assert metrics["grad_norm"] > 0                  # yet the gradient already points somewhere
    # The reference survived the donated update (it has buffers of its own).
    again = program.steps["ref_logps"].fn(reference, batch)
    np.testing.assert_array_equal(jax.device_get(again), jax.device_get(ref_logps))


# --- 3. sharded == unsharded, no recompilation ---------------------------------------------------

def one_step(program, mesh, weights, batch):
    state, reference = fresh(program, mesh, weights)
    device_batch = shard_batch(batch, mesh)
    ref_logps = program.steps["ref_logps"].fn(reference, device_batch)
    new_state, metrics = program.steps["update"].fn(state, device_batch, ref_logps,
                                                    jax.random.key(3))
    jax.tree.map(lambda a, sh: a.sharding.is_equivalent_to(sh, a.ndim) or pytest.fail(str(a.sharding)),
                 new_state.params, shardings_of(program.state).params)
    evaluated = program.steps["eval"].fn(new_state.params, reference, device_batch)
    return jax.device_get((ref_logps, metrics, new_state.params, evaluated))


@pytest.mark.heavy     # the quick tier's sharded == unsharded: tests/unit/test_sharding.py
@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_steps_equal_single_device(programs, weights, batches, shape):
    ref_logps, metrics, params, evaluated = one_step(*programs((1, 1, 1)), weights, batches[2])
    got = one_step(*programs(shape), weights, batches[2])
    np.testing.assert_allclose(got[0], ref_logps, rtol=1e-5, atol=1e-4)
    chex.assert_trees_all_close(got[1], metrics, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got[2], params, rtol=1e-7, atol=1e-5)
    chex.assert_trees_all_close(got[3], evaluated, rtol=1e-5, atol=1e-5)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params),
                                                           jax.tree.leaves(weights["policy"])))
    assert moved > 1e-3                                # the step did change the policy


def test_steps_compile_once(programs, weights, batches):
    program, mesh = programs((2, 2, 2))
    state, reference = fresh(program, mesh, weights)
    losses = []
    for i, batch in enumerate(batches[3:7]):           # new contents, same shapes
        device_batch = shard_batch(batch, mesh)
        ref_logps = program.steps["ref_logps"].fn(reference, device_batch)
        state, metrics = program.steps["update"].fn(state, device_batch, ref_logps,
                                                    runtime.step_rng(0, i))
        losses.append(float(metrics["loss"]))
    assert len(set(losses)) == 4 and all(np.isfinite(losses)) and int(state.step) == 4
    assert program.steps["ref_logps"].fn._cache_size() == 1
    assert program.steps["update"].fn._cache_size() == 1


# --- 4. train() end to end ------------------------------------------------------------------------

TRAIN_STEPS = 40


@pytest.fixture(scope="module")
def train_run(files):
    """40 steps of train(), with the compile count seen at each step's metrics row."""
    cfg = dpo_cfg(files, f"train.steps={TRAIN_STEPS}", "train.log_every=1",
                  "train.checkpoint_every=1000", "optim.lr=3e-3")
    workdir = files["root"] / "dpo"
    per_step = []
    with counting_compiles() as counter:

        class RecordingWriter(dpo.MetricsWriter):
            def write(self, step, metrics):
                if "train/loss" in metrics:
                    per_step.append(counter.count)
                super().write(step, metrics)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dpo, "MetricsWriter", RecordingWriter)
            final = dpo.train(cfg, str(workdir))
    return {"cfg": cfg, "workdir": str(workdir), "final": final, "compiles": per_step}


def test_train_lowers_the_loss_and_writes_model_and_metrics(train_run, files):
    workdir, final = train_run["workdir"], train_run["final"]
    records = read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl"))
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, TRAIN_STEPS + 1))
    # Step 1 scores the reference itself: log 2 per strict pair, implicit rewards 0.
    assert train[0]["train/reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert train[0]["train/pair_accuracy"] == 0.0
    _, valid = dpo.load_arrays(train_run["cfg"], files["tokenizer"])
    start = loss_at_reference(valid)                       # the validation loss at step 0
    late = np.mean([r["train/loss"] for r in train[-5:]])
    print(f"DPO train loss {train[0]['train/loss']:.3f} -> {late:.3f} (last 5); valid loss "
          f"{start:.3f} -> {final['valid/loss']:.3f}, pair accuracy "
          f"{final['valid/pair_accuracy']:.3f}")
    assert late < train[0]["train/loss"] - 0.1
    assert final["valid/loss"] < start - 0.05 and final["valid/pair_accuracy"] > 0.7
    assert final["valid/n_pairs"] > 10 and np.isfinite(final["train/loss"])
    for name in ("train/chosen_reward", "train/rejected_reward", "train/reward_margin",
                 "train/grad_norm", "train/lr", "train/tokens_per_s", "train/epoch"):
        assert all(math.isfinite(r[name]) for r in train), name
    assert train[-1]["train/reward_margin"] > 0
    assert os.listdir(os.path.join(workdir, "tb"))
    # The model is saved as SFT saves its own: an LM that eval / PPO load the same way.
    model_dir = os.path.join(workdir, "model")
    assert is_our_checkpoint(model_dir)
    model, params, tok, extra = model_io.load_model(model_dir, None)
    assert model.config.head == "lm" and model.config.dropout == 0.0 and tok is not None
    assert extra["stage"] == "dpo" and extra["beta"] == BETA and extra["steps"] == TRAIN_STEPS
    assert read_extra(model_dir)["valid/loss"] == pytest.approx(final["valid/loss"])
    # The policy moved toward the marker the rankings prefer.
    prompt = jnp.asarray([tok("instruction : repeat w3 response :")["input_ids"]])
    p_marker = jax.jit(lambda prm: jax.nn.softmax(
        model.apply({"params": prm}, prompt)[0, -1].astype(jnp.float32))[VOCAB[MARKER]])
    assert float(p_marker(params)) > float(p_marker(files["sft_params"])) + 0.05


def test_train_compiles_nothing_after_the_first_step(train_run):
    compiles = train_run["compiles"]
    assert len(compiles) == TRAIN_STEPS and compiles[0] > 0
    assert compiles[1:] == [compiles[1]] * (TRAIN_STEPS - 1), compiles


class _Killed(Exception):
    pass


def test_train_resumes_from_latest_checkpoint(files, train_run, monkeypatch):
    cfg = dpo_cfg(files, "train.steps=6", "train.checkpoint_every=2", "train.log_every=1",
                  f"init_from={os.path.join(train_run['workdir'], 'model')}")
    workdir = str(files["root"] / "dpo_resume")
    real_step_rng, real_save = runtime.step_rng, ckpt_lib.Checkpointer.save

    def dying_step_rng(seed, step):
        if step == 5:                 # steps 1..5 done, checkpoints at 2 and 4
            raise _Killed()
        return real_step_rng(seed, step)

    def save_and_wait(self, *args, **kwargs):
        out = real_save(self, *args, **kwargs)
        self.wait()
        return out

    monkeypatch.setattr(runtime, "step_rng", dying_step_rng)
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_and_wait)
    with pytest.raises(_Killed):
        dpo.train(cfg, workdir)
    monkeypatch.setattr(runtime, "step_rng", real_step_rng)
    first = {r["step"]: r["train/loss"] for r in read_jsonl_metrics(
        os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r}
    assert sorted(first) == [1, 2, 3, 4, 5]

    final = dpo.train(cfg, workdir)
    records = [r for r in read_jsonl_metrics(os.path.join(workdir, "metrics.jsonl"))
               if "train/loss" in r]
    assert [r["step"] for r in records] == list(range(1, 7))
    # The replayed step 5 saw the same state, batch and reference as before the kill.
    assert records[4]["train/loss"] == pytest.approx(first[5], rel=1e-5)
    assert np.isfinite(final["valid/loss"])


# --- 5. config, validation, CLI ------------------------------------------------------------------

def test_config_kind_validation_and_cli(files):
    cfg = dpo_cfg(files)
    assert list(stage_configs(cfg)) == ["dpo"]
    validate.check(cfg)
    assert TRAIN_COMMANDS["dpo"][0] == "rlhf_jax.stages.dpo:train"
    assert DEFAULT_CONFIGS["dpo"] == "dpo_config"
    with pytest.raises(ConfigError, match=r"beta=0\.0: expected a finite number > 0"):
        validate.check(dpo_cfg(files, "beta=0.0"))
    with pytest.raises(ConfigError, match="reference_from='/nonexistent'"):
        validate.check(dpo_cfg(files, "reference_from=/nonexistent"))
    with pytest.raises(ConfigError, match="max_position=32"):
        validate.check(dpo_cfg(files, "data.max_response_len=40"))
