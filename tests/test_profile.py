"""`rlhf-jax profile`: reports of tiny programs, traces, the PPO phases, one-line CLI errors."""
from __future__ import annotations

import functools
import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import profile
from rlhf_jax.models.config import tiny_config
from rlhf_jax.models.params import abstract_params, init_params, param_shardings
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.objectives import next_token_loss
from rlhf_jax.program import Program, Step, abstract_batch, abstract_like
from rlhf_jax.sharding import batch_sharding, make_mesh
from rlhf_jax.train_state import (TrainState, create_train_state, make_eval_step,
                                  make_train_step, train_state_shardings)

B, T, VOCAB = 8, 16, 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "instructgpt_tiny.py")


def _lm_loss(params, batch, rng, model):
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    return next_token_loss(logits[:, :-1], batch["input_ids"][:, 1:],
                           batch["attention_mask"][:, 1:])


def _batch_structs(mesh, batch=B, length=T):
    return abstract_batch({"input_ids": ((batch, length), jnp.int32),
                           "attention_mask": ((batch, length), jnp.int32)},
                          lambda ndim: batch_sharding(mesh, ndim))


def _random_batch(structs, rng):
    g = np.random.default_rng(int(jax.random.randint(rng, (), 0, 2 ** 30)))
    out = {"input_ids": g.integers(0, VOCAB, structs["input_ids"].shape).astype(np.int32),
           "attention_mask": np.ones(structs["attention_mask"].shape, np.int32)}
    return {k: jax.device_put(v, structs[k].sharding) for k, v in out.items()}


def tiny_lm_program(mesh, stage="sft", ppo_shaped=False) -> Program:
    """A Program like the stages build: train/eval (or PPO's four phases) of a tiny LM."""
    model = Transformer(tiny_config(vocab_size=VOCAB, max_position=64), mesh=mesh)
    optimizer = optax.adam(1e-3)
    shardings = train_state_shardings(model, optimizer, mesh)
    params_abs = abstract_params(model)
    state_abs = abstract_like(
        jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                            opt_state=optimizer.init(p)), params_abs),
        shardings)
    batch_abs = _batch_structs(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    key_abs = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    loss_fn = functools.partial(_lm_loss, model=model)
    train = make_train_step(loss_fn, optimizer, mesh, shardings, batch_abs)
    evaluate = make_eval_step(loss_fn, mesh, param_shardings(model, mesh), batch_abs)
    steps = {"train": Step("train", train, (state_abs, batch_abs, key_abs), tokens=B * T),
             "eval": Step("eval", evaluate, (state_abs.params, batch_abs), tokens=B * T)}
    if ppo_shaped:
        steps = _ppo_shaped_steps(model, steps, state_abs, batch_abs, key_abs, mesh)

    def init_state(rng):
        return create_train_state(init_params(model, rng, mesh), optimizer, shardings), {}

    def random_args(name, state, frozen, rng):
        batch = _random_batch(batch_abs, rng)
        if name in ("train", "update", "ptx"):
            return (state, batch, rng) if name != "ptx" else (state.params, batch)
        if name == "rollout":
            return (state.params, batch["input_ids"][:, :4])
        return (state.params, batch)

    return Program(stage=stage, mesh=mesh, models={"policy": model}, state=state_abs,
                   frozen={}, steps=steps, init_state=init_state, random_args=random_args)


def _ppo_shaped_steps(model, steps, state_abs, batch_abs, key_abs, mesh):
    """rollout (a while loop with its body as its own step), experience, update, ptx."""
    new_tokens = 6
    prompt_abs = jax.ShapeDtypeStruct((B, 4), jnp.int32, sharding=batch_sharding(mesh, 2))

    def decode_once(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return jnp.concatenate([tokens[:, 1:], jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)], 1)

    def rollout(params, prompts):
        def body(carry):
            i, toks = carry
            return i + 1, decode_once(params, toks)
        return jax.lax.while_loop(lambda c: c[0] < new_tokens, body, (0, prompts))[1]

    p_shard = param_shardings(model, mesh)
    out = batch_sharding(mesh, 2)
    body_step = Step("rollout_body", jax.jit(decode_once, in_shardings=(p_shard, out),
                                             out_shardings=out), (state_abs.params, prompt_abs))
    rollout_step = Step("rollout", jax.jit(rollout, in_shardings=(p_shard, out), out_shardings=out),
                        (state_abs.params, prompt_abs), tokens=B * new_tokens,
                        loop_trips=new_tokens, loop_body=body_step)
    ptx = jax.jit(lambda p, b: jax.grad(lambda q: _lm_loss(q, b, None, model)[0])(p),
                  in_shardings=(p_shard, None), out_shardings=p_shard)
    return {"rollout": rollout_step,
            "experience": Step("experience", steps["eval"].fn, steps["eval"].args, tokens=B * T),
            "update": Step("update", steps["train"].fn, steps["train"].args, tokens=B * T),
            "ptx": Step("ptx", ptx, (state_abs.params, batch_abs), tokens=B * T)}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((-1, 1, 1))


@pytest.fixture(scope="module")
def peak(mesh):
    p = profile.measure_matmul_peak(mesh, n=512, repeats=3)
    assert p["flops_per_s"] > 0 and p["devices"] == mesh.size and p["n"] % mesh.size == 0
    return p


def _check_phase(p, check_mfu=True):
    assert p["compile_s"] > 0 and p["median_s"] > 0 and p["min_s"] <= p["median_s"]
    assert p["flops"] > 0 and p["bytes_accessed"] > 0 and p["flops_per_s"] > 0
    assert p["memory_per_device"]["total_bytes"] > 0
    assert p["tokens_per_s"] > 0
    if check_mfu:
        assert 0 < p["mfu"] < 1.5, p["mfu"]


def test_profile_program_report_and_trace(mesh, peak, tmp_path):
    program = tiny_lm_program(mesh)
    report = profile.profile_program(program, steps=3, warmup=1, peak=peak,
                                     calls_per_iteration={"train": 1, "eval": 0},
                                     trace_dir=str(tmp_path / "trace"), trace_iterations=1)
    assert list(report["phases"]) == ["train", "eval"]
    for p in report["phases"].values():
        _check_phase(p)
        assert len(p["times_s"]) == 3
    assert report["phases"]["train"]["flops"] > report["phases"]["eval"]["flops"]
    assert report["devices"] == mesh.size and report["mesh"]["data"] == mesh.size
    assert report["iteration"]["seconds"] == pytest.approx(report["phases"]["train"]["median_s"])
    # FLOPs are the whole mesh's: per-device count times devices.
    train = report["phases"]["train"]
    assert train["flops"] == pytest.approx(train["flops_per_device"] * mesh.size)
    # The trace: xplane for TensorBoard, perfetto json.gz, both on disk.
    trace = report["trace"]
    assert trace["xplane"] and trace["perfetto"]
    for f in trace["files"]:
        assert os.path.getsize(tmp_path / "trace" / f) > 0
    json.dumps(report)     # JSON-able as is
    table = profile.format_table(report)
    assert "train" in table and "eval" in table and "matmul peak" in table


def test_ppo_shaped_program_has_four_phases_and_loop_flops(mesh, peak):
    program = tiny_lm_program(mesh, stage="ppo", ppo_shaped=True)
    calls = {"rollout": 1, "experience": 1, "update": 4, "ptx": 4}
    report = profile.profile_program(program, steps=2, warmup=1, peak=peak,
                                     calls_per_iteration=calls)
    assert list(report["phases"]) == ["rollout", "experience", "update", "ptx"]
    for p in report["phases"].values():
        _check_phase(p, check_mfu=False)
    rollout = report["phases"]["rollout"]
    assert rollout["loop_trips"] == 6
    # The loop body counted 6 times, not once.
    assert rollout["flops_per_device"] >= 6 * rollout["loop_body_flops_per_device"] * 0.99
    # ptx is inside update: not added to the iteration, but given a share.
    it = report["iteration"]
    assert set(it["calls"]) == {"rollout", "experience", "update"}
    expected = sum(calls[n] * report["phases"][n]["median_s"] for n in it["calls"])
    assert it["seconds"] == pytest.approx(expected)
    assert report["phases"]["ptx"]["included_in"] == "update"
    assert "(" in profile.format_table(report)


def test_donated_state_is_fed_back(mesh, peak):
    """train donates the state; eval, given state.params, must get the new params."""
    program = tiny_lm_program(mesh)
    state, _ = program.init_state(jax.random.key(0))
    report = profile.profile_program(program, steps=2, warmup=1, peak=peak, state=state,
                                     frozen={})
    assert report["phases"]["eval"]["median_s"] > 0


def _args(**kw):
    base = dict(config=TINY, stage="ppo", steps=1, warmup=0, workdir=None, trace=None, out=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("kw, message", [
    (dict(config="experiments/nope.py"), "does not exist"),
    (dict(steps=0), "--steps"),
    (dict(warmup=-1), "--warmup"),
    (dict(workdir="/nonexistent/run"), "--workdir"),
])
def test_cli_bad_input_is_one_line(kw, message):
    with pytest.raises(SystemExit) as e:
        profile.run(_args(**kw), [])
    text = str(e.value)
    assert text.startswith("error:") and message in text and "\n" not in text


def test_cli_bad_override_and_missing_stage(tmp_path):
    with pytest.raises(SystemExit, match="error: .*no field"):
        profile.run(_args(), ["ppo.nope=1"])
    single = tmp_path / "sft_only.py"
    single.write_text("from rlhf_jax.config import sft_config\n"
                      "def get_config(arg=None):\n    return sft_config()\n")
    with pytest.raises(SystemExit, match="error: the config has no 'ppo' stage"):
        profile.run(_args(config=str(single)), [])
