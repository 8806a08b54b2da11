"""`rlhf-jax profile` on the tiny pipeline config's micro sizes: reports, traces, PPO's phases,
a workdir's weights, one-line CLI errors."""
from __future__ import annotations

import gzip
import json
import os
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from rlhf_jax import profile, storage
from rlhf_jax.config import apply_overrides, load_config
from rlhf_jax.errors import UserError
from rlhf_jax.model_io import save_our_checkpoint
from rlhf_jax.runtime import setup_mesh
from rlhf_jax.sharding import make_mesh

from paths import REPO
TINY = os.path.join(REPO, "experiments", "instructgpt_tiny.py")
MICRO = TINY + ":micro"


@pytest.fixture(scope="module")
def peak():
    p = profile.measure_matmul_peak(make_mesh((-1, 1, 1)), n=1024, repeats=8)
    assert p["flops_per_s"] > 0 and p["devices"] == jax.device_count() and p["n"] % p["devices"] == 0
    return p


def _check_phase(p, name=""):
    assert p["compile_s"] > 0 and p["median_s"] > 0 and p["min_s"] <= p["median_s"]
    if name == "sync":                # PPO's weight copy into the sampler: bytes, no FLOPs
        assert p["bytes_accessed"] > 0 and not p["flops"]
        return
    assert p["flops"] > 0 and p["bytes_accessed"] > 0 and p["flops_per_s"] > 0
    # XLA's count of the compiled step (a scan body once) beside the counted model FLOPs
    assert p.get("as_compiled_flops", p["flops"]) == pytest.approx(
        p["flops_per_device"] * jax.device_count())
    mem = p["memory_per_device"]      # step_analysis.memory_summary: compile's keys and peak
    assert mem["peak_bytes_per_device"] >= mem["argument_bytes"] > 0
    assert mem["peak_bytes_per_device"] >= mem["xla_peak_memory_in_bytes"] + mem["code_bytes"]
    assert p["tokens_per_s"] > 0
    assert 0 < p["mfu_hardware"] < 1.5, p["mfu_hardware"]
    assert "mfu" not in p


def _args(**kw):
    base = dict(config=MICRO, stage="sft", steps=2, warmup=1, from_workdir=None, trace=None,
                out=None)
    return SimpleNamespace(**{**base, **kw})


def _constant_params(abstract, value):
    """A saved "trained" model without any device work: every weight ``value``."""
    return jax.tree.map(lambda a: np.full(a.shape, value, a.dtype), abstract)


def _all_equal(tree, value):
    return all(np.all(np.asarray(x) == value) for x in jax.tree.leaves(tree))


@pytest.mark.heavy     # the quick tier's profile: scanned layers counted every layer, bad input
def test_cli_rm_from_a_workdir_table_json_and_trace(tmp_path, capsys):
    """RM from <workdir>/sft/model (an LM: the RM keeps a fresh score head), through the CLI."""
    cfg = load_config(MICRO)
    sft_cfg = profile.stage_config(cfg, "sft")
    sft = profile.build_program("sft", sft_cfg, setup_mesh(sft_cfg))
    save_our_checkpoint(str(tmp_path / "run" / "sft" / "model"), sft.models["policy"],
                        _constant_params(sft.state.params, 0.25))
    out, trace = tmp_path / "sub" / "rm.json", tmp_path / "trace"
    args = _args(stage="rm", out=str(out), trace=str(trace), from_workdir=str(tmp_path / "run"))
    assert profile.run(args, ["rm.train.batch_size=8"]) == 0
    table = capsys.readouterr().out
    assert "matmul peak" in table and "train" in table and "eval" in table
    report = json.loads(out.read_text())
    assert report["stage"] == "rm" and report["weights"] == str(tmp_path / "run")
    assert report["overrides"] == ["rm.train.batch_size=8"]
    assert list(report["phases"]) == ["train", "eval"]
    for name, p in report["phases"].items():
        _check_phase(p, name)
        assert len(p["times_s"]) == 2
    train = report["phases"]["train"]
    k, t = cfg.rm.data.max_k, cfg.rm.data.max_prompt_len + cfg.rm.data.max_response_len
    assert train["tokens"] == 8 * k * t and train["flops"] > report["phases"]["eval"]["flops"]
    assert report["iteration"]["seconds"] == pytest.approx(train["median_s"])
    assert report["devices"] == jax.device_count() and report["peak"]["devices"] == jax.device_count()
    # The trace: an xplane for TensorBoard's profile plugin and a Perfetto json.gz, phases named.
    tr = report["trace"]
    assert tr["xplane"] and tr["perfetto"]
    assert all(os.path.getsize(trace / f) > 0 for f in tr["files"])
    with gzip.open(trace / tr["perfetto"][0], "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"train", "eval", "rm"} <= names


@pytest.mark.slow     # the full tier profiles a workdir through the RM test above
def test_ppo_from_a_workdir_has_six_phases_and_counts_the_decode_loop(tmp_path, peak):
    cfg = load_config(MICRO)
    ppo_cfg = profile.stage_config(cfg, "ppo")
    assert ppo_cfg.ppo.ptx_coef == cfg.ppo_ptx_coef > 0 and ppo_cfg.name == "ppo_ptx"
    program = profile.build_program("ppo", ppo_cfg, setup_mesh(ppo_cfg))
    save_our_checkpoint(str(tmp_path / "sft_ptx" / "model"), program.models["policy"],
                        _constant_params(program.state.policy.params, 0.25))
    save_our_checkpoint(str(tmp_path / "rm" / "model"), program.models["reward"],
                        _constant_params(program.frozen.reward, 0.75))

    wd_cfg = profile.stage_config(cfg, "ppo", str(tmp_path))
    assert wd_cfg.policy_from == str(tmp_path / "sft_ptx" / "model")
    # Zeros in the right shardings stand in for init_state (no init compiles: a faster test).
    zeros = lambda tree: jax.tree.map(
        lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), tree)
    state, frozen = profile.load_workdir_weights(program, wd_cfg, zeros(program.state),
                                                 zeros(program.frozen))
    assert _all_equal(state.policy.params, 0.25) and _all_equal(frozen.reference, 0.25)
    assert _all_equal(state.value.params, 0.75) and _all_equal(frozen.reward, 0.75)

    calls = profile.calls_per_iteration("ppo", wd_cfg, program)
    report = profile.profile_program(program, steps=1, warmup=1, peak=peak, state=state,
                                     frozen=frozen, calls_per_iteration=calls)
    assert list(report["phases"]) == ["sync", "rollout", "experience", "update", "value_update",
                                      "ptx"]
    for name, p in report["phases"].items():
        _check_phase(p, name)
    rollout = report["phases"]["rollout"]
    assert rollout["loop_trips"] == cfg.ppo.data.max_response_len
    assert rollout["flops_per_device"] > rollout["loop_trips"] * rollout["loop_body_flops_per_device"]
    updates = cfg.ppo.ppo.rollout_batch_size // cfg.ppo.ppo.minibatch_size
    it = report["iteration"]
    assert it["calls"] == {"sync": 1, "rollout": 1, "experience": 1, "update": updates,
                           "value_update": updates}
    assert it["seconds"] == pytest.approx(sum(
        n * report["phases"][k]["median_s"] for k, n in it["calls"].items()))
    assert report["phases"]["ptx"]["included_in"] == "update"
    assert report["phases"]["ptx"]["flops"] < report["phases"]["update"]["flops"]
    assert "(" in profile.format_table(report)     # ptx's share shown inside update's
    json.dumps(report)



def test_lora_ppo_from_a_workdir_fills_the_frozen_bases_and_keeps_fresh_adapters(tmp_path):
    """Policy and value LoRA: the trained state is adapters (and the value's head), so the
    workdir's policy is the frozen base only and the RM's head becomes the value's head."""
    cfg = apply_overrides(load_config(MICRO), ["ppo.ppo.lora.rank=2", "ppo.ppo.value_lora.rank=2"])
    ppo_cfg = profile.stage_config(cfg, "ppo")
    program = profile.build_program("ppo", ppo_cfg, setup_mesh(ppo_cfg))
    assert program.plan.roles.policy.lora_rank == program.plan.roles.value.lora_rank == 2
    save_our_checkpoint(str(tmp_path / "sft_ptx" / "model"), program.models["policy"],
                        _constant_params(program.frozen.reference, 0.25))
    save_our_checkpoint(str(tmp_path / "rm" / "model"), program.models["reward"],
                        _constant_params(program.frozen.reward, 0.75))
    wd_cfg = profile.stage_config(cfg, "ppo", str(tmp_path))
    zeros = lambda tree: jax.tree.map(
        lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), tree)
    state, frozen = profile.load_workdir_weights(program, wd_cfg, zeros(program.state),
                                                 zeros(program.frozen))
    assert _all_equal(frozen.reference, 0.25) and _all_equal(frozen.reward, 0.75)
    assert _all_equal(state.policy.params, 0.0) and _all_equal(state.value.params["adapters"], 0.0)
    assert _all_equal(state.value.params["score_head"], 0.75)


@pytest.mark.heavy     # the quick tier's profile: scanned layers counted every layer, bad input
def test_dpo_random_weights_times_ref_logps_update_eval(peak):
    """The pipeline config's dpo section (policy and reference: the SFT architecture)."""
    report = profile.profile_stage(load_config(MICRO), "dpo", steps=1, warmup=1, peak=peak)
    assert report["stage"] == "dpo" and report["weights"] == "random"
    assert list(report["phases"]) == ["ref_logps", "update", "eval"]
    for name, p in report["phases"].items():
        _check_phase(p, name)
    it = report["iteration"]
    assert it["calls"] == {"ref_logps": 1, "update": 1}      # eval: not every batch
    assert it["seconds"] == pytest.approx(report["phases"]["ref_logps"]["median_s"]
                                          + report["phases"]["update"]["median_s"])
    json.dumps(report)


@pytest.mark.heavy     # the quick tier's profile: scanned layers counted every layer, bad input
def test_grpo_ppo_random_weights_has_no_value_update(peak):
    """--config.ppo.ppo.advantage=grpo: the pipeline's grpo stage (no ptx, its group_size)."""
    cfg = apply_overrides(load_config(MICRO), ["ppo.ppo.advantage=grpo"])
    stage_cfg = profile.stage_config(cfg, "ppo")
    assert stage_cfg.name == "grpo" and stage_cfg.ppo.ptx_coef == 0
    assert stage_cfg.ppo.group_size == cfg.group_size
    report = profile.profile_stage(cfg, "ppo", steps=1, warmup=1, peak=peak)
    assert list(report["phases"]) == ["sync", "rollout", "experience", "update"]
    for name, p in report["phases"].items():
        _check_phase(p, name)
    updates = cfg.ppo.ppo.rollout_batch_size // cfg.ppo.ppo.minibatch_size
    assert report["iteration"]["calls"] == {"sync": 1, "rollout": 1, "experience": 1,
                                            "update": updates}
    assert "value" not in report["models"]


def test_graft_keeps_a_fresh_head_and_rejects_other_architectures():
    lm = {"embed": {"embedding": np.ones((5, 2))}, "final_norm": {"scale": np.ones(2)}}
    rm = {"embed": {"embedding": np.zeros((5, 2))}, "final_norm": {"scale": np.zeros(2)},
          "score_head": {"kernel": np.full((2, 1), 3.0), "bias": np.zeros(1)}}
    grafted = profile._graft(lm, rm, "x")
    assert np.all(grafted["embed"]["embedding"] == 1) and np.all(grafted["score_head"]["kernel"] == 3)
    with pytest.raises(ValueError, match="do not match"):
        profile._graft({"embed": {"embedding": np.ones((6, 2))}, "final_norm": lm["final_norm"]},
                       rm, "x")


@pytest.mark.parametrize("kw, overrides, message", [
    (dict(config="experiments/nope.py"), [], "does not exist"),
    (dict(steps=0), [], "--steps"),
    (dict(warmup=-1), [], "--warmup"),
    (dict(from_workdir="/nonexistent/run"), [], "--from-workdir"),
    (dict(), ["sft.nope=1"], "no field"),
    (dict(), ["sft.train.batch_size=3"], "batch_size"),
])
def test_cli_bad_input_is_one_line(kw, overrides, message, tmp_path):
    with pytest.raises(UserError) as e:
        profile.run(_args(**kw), overrides)
    text = str(e.value)
    assert message in text and "\n" not in text


def test_cli_missing_stage_and_unfinished_workdir(tmp_path):
    single = tmp_path / "sft_only.py"
    single.write_text("from rlhf_jax.config import sft_config\n"
                      "def get_config(arg=None):\n    return sft_config()\n")
    with pytest.raises(UserError, match="the config has no 'ppo' stage"):
        profile.run(_args(config=str(single), stage="ppo"), [])
    with pytest.raises(UserError, match=r"--from-workdir .*sft_ptx/model not found"):
        profile.run(_args(stage="ppo", from_workdir=str(tmp_path)), [])


def test_scanned_layers_are_counted_every_layer(peak):
    """XLA's cost analysis may count a scan body once (it did, ~L-fold under, before this
    count; XLA:CPU at jax 0.10.2 now unrolls small scans); the profile counts FLOPs as
    ``compile`` does (layer differencing on unscanned variants), so a scanned and an unscanned
    build report the same model FLOPs whatever XLA does with the loop."""
    base = load_config(MICRO)
    reports = {}
    for scan in (False, True):
        cfg = apply_overrides(base, ["sft.model.n_layers=4",
                                     f"sft.model_runtime.scan_layers={scan}"])
        reports[scan] = profile.profile_stage(cfg, "sft", steps=1, warmup=0, peak=peak,
                                              phases=["eval"])["phases"]["eval"]
    scanned, unrolled = reports[True], reports[False]
    assert scanned["model_flops"] == pytest.approx(unrolled["model_flops"], rel=1e-6)
    assert unrolled["as_compiled_flops"] == pytest.approx(unrolled["model_flops"], rel=0.25)
    assert scanned["flops"] == scanned["model_flops"]          # no remat: executed = model
    assert scanned["mfu_model"] == pytest.approx(scanned["mfu_hardware"])


def test_trace_and_report_to_gcs(gcs_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache"))
    step = jax.jit(lambda x: x @ x)
    trace_dir = storage.join(gcs_path, "trace")
    t = profile.write_trace("sft", {"train": step}, {"train": SimpleNamespace(fn=step)},
                            {"train": (np.ones((8, 8), np.float32),)}, ["train"], trace_dir)
    assert t["dir"] == trace_dir and t["xplane"] and t["perfetto"]
    local = storage.local_copy(trace_dir)
    assert all(os.path.getsize(os.path.join(local, f)) > 0 for f in t["files"])

    # The CLI's checks and the report file on a URL (the profiling itself is the tests' above).
    monkeypatch.setattr(profile, "profile_stage", lambda *a, **kw: {"stage": "sft"})
    monkeypatch.setattr(profile, "format_table", lambda report: "table")
    with pytest.raises(UserError, match="--from-workdir .*: no such directory"):
        profile.run(_args(from_workdir=storage.join(gcs_path, "none")), [])
    with pytest.raises(UserError, match="--out .*: is a directory"):
        profile.run(_args(out=gcs_path), [])
    out = storage.join(gcs_path, "reports", "sft.json")
    assert profile.run(_args(out=out, trace=trace_dir), []) == 0
    assert json.loads(storage.read_text(out))["stage"] == "sft"
    assert f"report: {out}" in capsys.readouterr().out
