"""``rlhf-jax compile``: AOT reports for every stage, FLOP accounting with loop trips, errors.

Runs on the 8 simulated CPU devices (``--topology cpu``); the TPU test needs libtpu (the ``tpu``
extra) and is skipped without it.
"""
from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from rlhf_jax import compile as aot
from rlhf_jax.config import (dpo_config, load_config, ppo_config, rm_config, sft_config,
                             stage_configs)
from rlhf_jax.errors import UserError
from rlhf_jax.models.params import abstract_params, cache_shardings
from rlhf_jax.models.transformer import Transformer, cache_shapes, init_cache
from rlhf_jax.program import Program, Step, abstract_batch, abstract_key
from rlhf_jax.sharding import batch_sharding, replicated
from rlhf_jax.stages.supervised import optimizer_from
from rlhf_jax.train_state import abstract_train_state, make_train_step, shardings_of

MODEL = dict(arch="gpt2", d_model=32, n_layers=3, n_heads=4, d_ff=64, max_position=32)
RUNTIME = dict(dtype="float32", remat=True, scan_layers=True)


def tiny_pipeline(vocab: int = 96) -> ml_collections.ConfigDict:
    """SFT / RM / PPO-ptx, every loop switched on: scanned layers, remat, chunked LM head, and
    networks of different depths (policy 3 layers, RM and value 2)."""
    c = ml_collections.ConfigDict()
    c.vocab_size = vocab
    c.sft = sft_config()
    c.sft.model = ml_collections.ConfigDict(MODEL)
    c.sft.model_runtime = ml_collections.ConfigDict(RUNTIME)
    c.sft.mesh.shape = (2, 4, 1)
    c.sft.data.max_prompt_len, c.sft.data.max_response_len = 6, 6
    c.sft.train.batch_size = 8
    c.sft.train.logprob_chunk = 4
    c.rm = rm_config()
    c.rm.model_runtime = ml_collections.ConfigDict(RUNTIME)
    c.rm.mesh.shape = (-1, 1, 1)
    c.rm.data.max_k = 3
    c.rm.data.max_prompt_len, c.rm.data.max_response_len = 6, 6
    c.rm.train.batch_size = 8
    c.rm_model = ml_collections.ConfigDict(dict(MODEL, n_layers=2, d_model=16, n_heads=2))
    c.ppo = ppo_config()
    c.ppo.model_runtime = ml_collections.ConfigDict(RUNTIME)
    c.ppo.mesh.shape = (4, 1, 2)
    c.ppo.data.max_prompt_len, c.ppo.data.max_response_len = 6, 5
    c.ppo.data.ptx_seq_len = 8
    c.ppo.ppo.rollout_batch_size = 8
    c.ppo.ppo.minibatch_size = 4
    c.ppo.ppo.ptx_coef = 1.0
    c.ppo.ppo.ptx_per_episode = 2
    c.ppo.ppo.logprob_chunk = 2
    c.ppo.ppo.frozen_dtype = "bfloat16"
    return c


@pytest.fixture(scope="module")
def cpu_report():
    return aot.compile_report(tiny_pipeline(), "cpu", "all")


def test_report_has_every_step_of_every_stage(cpu_report):
    r = cpu_report
    assert r["topology"] == "cpu" and r["num_devices"] == 8 and r["hbm_bytes_per_device"] > 0
    assert set(r["stages"]) == {"sft", "rm", "ppo"}
    assert set(r["stages"]["sft"]) == {"train", "eval"}
    assert set(r["stages"]["rm"]) == {"train", "eval"}
    assert {"rollout", "decode", "experience", "update", "ptx"} <= set(r["stages"]["ppo"])
    assert r["stages"]["ppo"]["decode"]["loop_body_of"] == "rollout"
    assert r["stage_info"]["ppo"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
    for stage, rows in r["stages"].items():
        for name, row in rows.items():
            assert row["fits"] is True, (stage, name, row)
            assert row["peak_bytes_per_device"] >= row["argument_bytes"] > 0
            # PPO's sync is a weight copy (casts only): no FLOPs to speak of
            assert (row["flops"] > 0 or name == "sync") and row["compile_s"] >= 0, (stage, name, row)
    json.dumps(r)                                      # the report is plain JSON
    table = aot.format_table(r)
    assert "rollout" in table and "experience" in table and "mesh" in table


def test_hbm_traffic_reads_fsdp_weights_whole(cpu_report):
    """SFT's mesh is (2, 4, 1): a device reads every weight whole (all-gathered), its batch shard."""
    stage_cfg = stage_configs(tiny_pipeline())["sft"]
    mesh = aot.stage_mesh("sft", stage_cfg, aot.get_target("cpu"))
    program = aot._builder("sft")(stage_cfg, mesh)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(program.state.params))
    batch_bytes = sum(aot._shard_bytes(x) for x in jax.tree.leaves(program.steps["eval"].args[1]))
    row = cpu_report["stages"]["sft"]["eval"]
    assert row["hbm_traffic_per_device"] == weight_bytes + batch_bytes + row["output_bytes"]
    ids = aot.weight_leaf_ids(program)
    assert all(id(x) in ids for x in jax.tree.leaves(program.state.params))
    assert not any(id(x) in ids for x in jax.tree.leaves(program.state.opt_state))



def test_dpo_compiles_ref_logps_update_eval():
    """A pipeline config's dpo section: the SFT architecture (3 scanned, remat layers) as policy
    and reference; one iteration is ref_logps + update. ``all`` leaves it out unless ``methods``
    names it."""
    c = tiny_pipeline()
    c.dpo = dpo_config()
    c.dpo.mesh.shape = (-1, 1, 1)
    c.dpo.data.max_k, c.dpo.data.max_prompt_len, c.dpo.data.max_response_len = 2, 6, 6
    c.dpo.train.batch_size = 8
    assert "dpo" not in aot.select_stages(c, "all")
    r = aot.compile_report(c, "cpu", "dpo")
    rows = r["stages"]["dpo"]
    assert list(rows) == ["ref_logps", "update", "eval"]
    assert all(row["fits"] and row["flops"] > 0 for row in rows.values()), rows
    assert rows["update"]["flops"] > rows["eval"]["flops"] > rows["ref_logps"]["flops"]
    info = r["stage_info"]["dpo"]
    assert info["models"]["policy"]["n_layers"] == MODEL["n_layers"]
    assert info["iteration"]["calls"] == {"ref_logps": 1, "update": 1}
    assert "ref_logps" in aot.format_table(r)
    c.methods = ("dpo",)
    assert "dpo" in aot.select_stages(c, "all")


def test_grpo_ppo_compiles_without_value_update():
    """ppo.advantage=grpo as an override: no value network, so no value_update row, and the
    pipeline's group_size (default 4) fills in ppo.group_size."""
    c = tiny_pipeline()
    c.ppo.ppo.ptx_coef = 0.0             # the pipeline's grpo runs without ptx
    c.ppo.ppo.advantage = "grpo"
    assert aot.select_stages(c, "ppo")["ppo"].ppo.group_size == 4
    r = aot.compile_report(c, "cpu", "ppo", flops=False)
    rows = r["stages"]["ppo"]
    assert {"sync", "rollout", "decode", "experience", "update"} == set(rows)
    assert all(row["fits"] for row in rows.values()), rows
    assert "value" not in r["stage_info"]["ppo"]["models"]
    assert r["stage_info"]["ppo"]["iteration"]["calls"] == {"sync": 1, "rollout": 1,
                                                            "experience": 1, "update": 2}
    assert "value_model" not in aot.layer_sections("ppo", aot.select_stages(c, "ppo")["ppo"])


def _unrolled_flops(stage: str, stage_cfg, n_devices_mesh) -> dict[str, float]:
    """Reference: the stage at full depth with every layer and head loop unrolled."""
    cfg = aot.flop_variant_config(stage_cfg, {})
    program = aot._builder(stage)(cfg, n_devices_mesh, model_overrides=aot.FLOP_VARIANT_OVERRIDES)
    return {name: aot.lowered_cost(step.lower())[0]["flops"]
            for name, step in aot._steps_with_bodies(program).items()}


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_layer_differencing_matches_the_unrolled_step(cpu_report, stage):
    """F0 + sum_g (L_g - 1)(F_g - F0) equals the FLOPs of the stage built at full depth with no
    layer scan and no chunk loop (PPO: policy 3 layers, RM/value 2, so two groups)."""
    stage_cfg = stage_configs(tiny_pipeline())[stage]
    mesh = aot.stage_mesh(stage, stage_cfg, aot.get_target("cpu"))
    reference = _unrolled_flops(stage, stage_cfg, mesh)
    rows = cpu_report["stages"][stage]
    for name, flops in reference.items():
        expected = flops
        if name == "rollout":   # the reference still loops over decode tokens: add the trips
            expected += (rows[name]["loop_trips"] - 1) * reference["decode"]
        # exact but for a few scalar ops (loop counters, optimizer bookkeeping per parameter
        # leaf): ~1e-5 of these toy models' FLOPs, ~1e-9 of a real model's
        assert rows[name]["flops"] == pytest.approx(expected, rel=2e-4), (stage, name)
    # the scanned / chunked step as compiled counts its loop bodies once: fewer FLOPs
    assert rows["train" if stage != "ppo" else "update"]["as_compiled_flops_per_device"] * 8 < \
        rows["train" if stage != "ppo" else "update"]["flops"]


# --- a toy stage whose decode loop can also be unrolled by hand ---------------------------------

def toy_build(cfg, mesh, *, model_overrides=None) -> Program:
    """A stage with a train step and a greedy KV-cache rollout (``lax.while_loop`` over
    ``toy.new_tokens`` tokens, or a Python loop when ``toy.unroll``), its body a Step."""
    from rlhf_jax.config import model_config_from
    overrides = {**dict(cfg.model_runtime), **(model_overrides or {})}
    model = Transformer(model_config_from(cfg.model, None, **overrides), mesh=mesh)
    optimizer, _ = optimizer_from(cfg.optim, 10)
    state = abstract_train_state(model, optimizer, mesh)
    b, p, n = cfg.toy.batch, cfg.toy.prompt_len, cfg.toy.new_tokens
    shard = functools.partial(batch_sharding, mesh)
    batch = abstract_batch({"input_ids": ((b, p + n), jnp.int32)}, shard)

    def loss_fn(params, data, rng):
        logits = model.apply({"params": params}, data["input_ids"])
        return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1)), {}

    train = make_train_step(loss_fn, optimizer, mesh, shardings_of(state), batch)
    cache_shape = cache_shapes(model.config, b, p + n)
    c_sh = cache_shardings(model, mesh, cache_shape)

    def decode(params, token, cache, index):
        mask = jnp.ones((b, p + n), jnp.int32)
        logits, cache = model.apply({"params": params}, token, attention_mask=mask, cache=cache,
                                    cache_index=index)
        return jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), cache

    def rollout(params, prompt):
        cache = init_cache(model.config, b, p + n)
        mask = jnp.ones((b, p + n), jnp.int32)
        _, cache = model.apply({"params": params}, prompt[:, :-1], attention_mask=mask, cache=cache,
                               cache_index=0)
        token = prompt[:, -1:]
        if cfg.toy.unroll:
            for i in range(n):
                token, cache = decode(params, token, cache, p - 1 + i)
            return token
        body = lambda i, c: decode(params, c[0], c[1], p - 1 + i)
        return jax.lax.fori_loop(0, n, body, (token, cache))[0]

    params_abs = abstract_params(model, mesh)
    p_sh = shardings_of(params_abs)
    rollout_fn = jax.jit(rollout, in_shardings=(p_sh, shard(2)), out_shardings=shard(2))
    decode_fn = jax.jit(decode, in_shardings=(p_sh, shard(2), c_sh, replicated(mesh)))
    cache_abs = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             cache_shape, c_sh)
    decode_step = Step("decode", decode_fn, (params_abs, jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=shard(2)),
                                             cache_abs, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))),
                       tokens=b)
    steps = {"train": Step("train", train, (state, batch, abstract_key(replicated(mesh))), b * (p + n)),
             "rollout": Step("rollout", rollout_fn,
                             (params_abs, jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=shard(2))),
                             tokens=b * n, loop_trips=1 if cfg.toy.unroll else n,
                             loop_body=None if cfg.toy.unroll else decode_step)}
    return Program("toy", mesh, {"policy": model}, state, {}, steps, None, None,
                   {"train": 1, "rollout": 1})


def toy_config(unroll=False):
    c = sft_config()
    c.vocab_size = 64
    c.model = ml_collections.ConfigDict(dict(MODEL, vocab_size=64, n_layers=4))
    c.model_runtime = ml_collections.ConfigDict(RUNTIME)
    c.mesh.shape = (-1, 1, 1)
    c.toy = ml_collections.ConfigDict(dict(batch=8, prompt_len=5, new_tokens=7, unroll=unroll))
    return c


def test_decode_loop_trips_match_a_hand_unrolled_rollout():
    """rollout (while loop, body counted once) + (trips - 1) x decode == the rollout written as a
    Python loop over every token, at full depth without a layer scan."""
    target = aot.get_target("cpu")
    cfg = toy_config()
    mesh = aot.stage_mesh("toy", cfg, target)
    rows, _ = aot.compile_stage("toy", cfg, target, build=toy_build)
    assert rows["rollout"]["loop_trips"] == 7 and rows["decode"]["loop_body_of"] == "rollout"
    unrolled = toy_build(toy_config(unroll=True), mesh, model_overrides=aot.FLOP_VARIANT_OVERRIDES)
    reference = aot.lowered_cost(unrolled.steps["rollout"].lower())[0]["flops"]
    # the fori_loop's counter adds a few scalar ops per trip; nothing else differs
    assert rows["rollout"]["flops"] == pytest.approx(reference, rel=2e-4)
    assert rows["rollout"]["flops"] > 6 * rows["decode"]["flops"]
    train_ref = aot.lowered_cost(unrolled.steps["train"].lower())[0]["flops"]
    assert rows["train"]["flops"] == pytest.approx(train_ref, rel=2e-4)


def test_sft_flops_are_close_to_6_n_tokens():
    """The counted FLOPs of an SFT step are 6 x parameters x tokens plus attention (sanity check
    of the unit: global FLOPs, not per device)."""
    c = tiny_pipeline(vocab=512)
    c.sft.model = ml_collections.ConfigDict(dict(MODEL, d_model=64, d_ff=256, n_layers=2))
    cfg = stage_configs(c)["sft"]
    mesh = aot.stage_mesh("sft", cfg, aot.get_target("cpu"))
    build = aot._builder("sft")
    program = build(cfg, mesh)
    counted = aot.count_flops("sft", cfg, mesh, build, program)     # lowers only
    n_params = sum(x.size for x in jax.tree.leaves(program.state.params))
    ratio = counted["train"]["flops"] / (6 * n_params * program.steps["train"].tokens)
    assert 0.9 < ratio < 1.6, ratio


# --- errors and the CLI ------------------------------------------------------------------------

def _args(config, topology="cpu", stage="all", out=None):
    return argparse.Namespace(config=config, topology=topology, stage=stage, out=out)


@pytest.fixture()
def tiny_config_file(tmp_path):
    path = tmp_path / "tiny_compile.py"
    path.write_text(f"""
import ml_collections
from rlhf_jax.config import sft_config

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.vocab_size = 96
    c.sft = sft_config()
    c.sft.model = ml_collections.ConfigDict({MODEL!r})
    c.sft.model_runtime = ml_collections.ConfigDict({RUNTIME!r})
    c.sft.mesh.shape = (2, 4, 1)
    c.sft.data.max_prompt_len, c.sft.data.max_response_len = 6, 6
    c.sft.train.batch_size = 8
    return c
""")
    return str(path)


@pytest.mark.parametrize("topology,stage,overrides,message", [
    ("v9z:2x2", "sft", [], "unknown topology"),
    ("cpu", "ppo", [], "stage 'ppo' is not in the config"),
    ("cpu", "sft", ["sft.mesh.shape=(3,1,1)"], "mesh shape"),
    ("cpu", "sft", ["sft.train.batch_size=4"], "must be a multiple"),
    ("cpu", "sft", ["sft.no_such=1"], "no field"),
])
def test_bad_input_is_one_error_line(tiny_config_file, topology, stage, overrides, message):
    with pytest.raises(UserError) as e:     # the CLI: one line, exit 2
        aot.run(_args(tiny_config_file, topology, stage), overrides)
    text = str(e.value)
    assert message in text and "\n" not in text, text


def test_cli_writes_report_and_fails_when_a_step_does_not_fit(tiny_config_file, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert aot.run(_args(tiny_config_file, out=str(out)), []) == 0
    report = json.loads(out.read_text())
    assert report["fits"] and set(report["stages"]) == {"sft"}
    assert "sft" in capsys.readouterr().out
    # the same report against a 10 kB device: every step fails, one line each, naming buffers
    small = aot.compile_report(load_config(tiny_config_file), "cpu", "sft", flops=False,
                               hbm_bytes=10_000)
    assert not small["fits"]
    lines = aot.not_fitting(small)
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0].startswith("sft/train does not fit on cpu: needs ")
    assert "per device, 9.8 KiB available; largest buffers: " in lines[0]
    assert any(b["kind"] == "argument" and b["name"].startswith("state") for b in
               aot.largest_arguments(train_step_of(tiny_config_file)))


def train_step_of(path):
    cfg = stage_configs(load_config(path))["sft"]
    mesh = aot.stage_mesh("sft", cfg, aot.get_target("cpu"))
    return aot._builder("sft")(cfg, mesh).steps["train"]


# --- a real TPU topology (libtpu compiles for it on this CPU machine) --------------------------

def _tpu_target():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
    try:
        return aot.get_target("v5e:2x2")
    except aot.CompileError as e:
        pytest.skip(f"no TPU topology here: {e}")


def test_tiny_pipeline_on_v5e_2x2():
    target = _tpu_target()
    assert target.num_devices == 4 and target.platform == "tpu"
    assert 15 * 2**30 < target.hbm_bytes_per_device <= 16 * 2**30      # the compiler's own limit
    c = tiny_pipeline()
    c.sft.mesh.shape, c.rm.mesh.shape, c.ppo.mesh.shape = (1, 4, 1), (4, 1, 1), (2, 1, 2)
    c.sft.model_runtime.dtype = c.rm.model_runtime.dtype = c.ppo.model_runtime.dtype = "bfloat16"
    report = aot.compile_report(c, "v5e:2x2", "all")
    assert report["fits"] and report["num_devices"] == 4
    assert report["peak_flops_per_device"] == 197e12
    for rows in report["stages"].values():
        for row in rows.values():
            assert row["fits"] and row["flops"] > 0
            assert 0 < row["mfu_serial"] <= row["mfu_overlapped"] <= 1
            assert row["step_s_serial"] >= row["step_s_overlapped"] >= row["step_time_at_peak_s"]
            assert row["comm_s"] is not None and isinstance(row["collectives"], list)
    decode, rollout = report["stages"]["ppo"]["decode"], report["stages"]["ppo"]["rollout"]
    assert decode["hbm_traffic_per_device"] > 0   # (TPU pads tiny arrays: argument_bytes is more)
    assert rollout["hbm_traffic_per_device"] >= 4 * decode["hbm_traffic_per_device"]   # 5 tokens
    iteration = report["stage_info"]["ppo"]["iteration"]
    assert 0 < iteration["mfu_serial"] <= iteration["mfu_overlapped"] <= 1
    # data 2 x tensor 2: the tensor-parallel matmuls all-reduce, so there is traffic.
    assert iteration["comm_s"] > 0 and iteration["collectives"]
