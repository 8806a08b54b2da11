"""A workdir and its inputs on gs:// (a GCS emulator on loopback): the pipeline's DONE markers,
the writability probe, the CLI's saved config, a sweep's points and summary, and the checks of
URL inputs. Stages are stand-ins: what is tested is where files go, not training."""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import pytest

from rlhf_jax import cli, compile as aot, pipeline, reliability, storage, sweep, validate
from rlhf_jax.config import load_config, sft_config
from rlhf_jax.errors import ConfigError, UserError

from paths import EXPERIMENTS
PIPELINE_MICRO = os.path.join(EXPERIMENTS, "instructgpt_tiny.py") + ":micro"
PTX_SWEEP_MICRO = os.path.join(EXPERIMENTS, "sweep_ptx.py") + ":micro"


@pytest.fixture(autouse=True)
def nothing_local(tmp_path, monkeypatch):
    """A URL taken for a local path would land in ./gs:/... of the working directory."""
    monkeypatch.chdir(tmp_path)
    yield
    assert os.listdir(tmp_path) == []


def test_stage_marker_is_written_then_honoured(gcs_path):
    timings: dict = {}
    pipeline.run_stage(gcs_path, "sft", lambda: {"loss": 1.0}, timings)
    done = json.loads(storage.read_text(storage.join(gcs_path, "sft", "DONE")))
    assert done["result"] == {"loss": 1.0} and timings == {"sft": done["seconds"]}
    again: dict = {}
    pipeline.run_stage(gcs_path, "sft", lambda: pytest.fail("a finished stage ran again"), again)
    assert again == {"sft": done["seconds"]}


def test_a_method_finished_after_eval_is_reported(gcs_path, caplog):
    pipeline.run_stage(gcs_path, "eval", lambda: {}, {})
    time.sleep(1.1)                 # the emulator keeps mtimes in whole seconds
    pipeline.run_stage(gcs_path, "dpo", lambda: {}, {})
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.pipeline"):
        pipeline._warn_if_evaluated_before(gcs_path, ("dpo", "grpo"))
    assert "dpo finished after eval" in caplog.text


def test_check_writable_probes_the_bucket(gcs_path):
    reliability.check_writable(gcs_path, storage.join(gcs_path, "sft", "model"))
    assert not storage.exists(gcs_path)            # the probe object is deleted again
    with pytest.raises(UserError) as error:
        reliability.check_writable("gs://no-such-bucket-xyz/run")
    message = str(error.value)
    assert message.startswith("gs://no-such-bucket-xyz/run: not writable (") and "\n" not in message


def test_cli_saves_the_config_and_eval_reads_it_back(gcs_path, monkeypatch):
    trained, evaluated = {}, {}
    monkeypatch.setattr(cli, "_call", lambda target: lambda cfg, workdir: trained.update(
        cfg=cfg, workdir=workdir) or {})
    monkeypatch.setattr(pipeline, "evaluate_workdir",
                        lambda cfg, workdir: evaluated.update(cfg=cfg, workdir=workdir))
    assert cli.main(["pipeline", "--config", PIPELINE_MICRO, "--workdir", gcs_path,
                     "--compilation-cache", "none"]) == 0
    assert trained["workdir"] == gcs_path
    as_json = lambda cfg: json.loads(json.dumps(cfg.to_dict(), sort_keys=True, default=str))
    saved = json.loads(storage.read_text(storage.join(gcs_path, "config_pipeline.json")))
    assert saved == as_json(trained["cfg"])
    assert cli.main(["eval", "--workdir", gcs_path, "--config.seed=7"]) == 0
    assert as_json(evaluated["cfg"]) == {**saved, "seed": 7}


def test_compile_writes_its_report_to_a_url(gcs_path, monkeypatch):
    monkeypatch.setattr(aot, "compile_report", lambda *args, **kwargs: {"steps": {}})
    monkeypatch.setattr(aot, "format_table", lambda report: "table")
    monkeypatch.setattr(aot, "not_fitting", lambda report: [])
    out = storage.join(gcs_path, "reports", "compile.json")
    args = argparse.Namespace(config=PIPELINE_MICRO, topology="cpu", stage="sft", out=out)
    assert aot.run(args, ["seed=1"]) == 0
    assert json.loads(storage.read_text(out)) == {
        "steps": {}, "config": PIPELINE_MICRO, "overrides": ["seed=1"]}


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_sweep_points_get_the_shared_stages(where, tmp_path_factory, request, monkeypatch):
    """Locally a point's shared stages are links; on gs:// copies without the checkpoints."""
    root = (str(tmp_path_factory.mktemp("sweep")) if where == "local"
            else request.getfixturevalue("gcs_path"))
    spec = load_config(PTX_SWEEP_MICRO)
    shared_stages = sweep._shared_stages(spec)
    rm_metrics = {"step": 1, "train/loss": 0.5, "train/lr": 0.1}

    def fake_run(cfg, workdir, stages=None):
        if stages == shared_stages:          # the shared run: what each stage leaves behind
            for stage in stages:
                out = storage.join(workdir, stage)
                storage.write_bytes(storage.join(out, "model", "params", "0"), b"w")
                storage.write_bytes(storage.join(out, "checkpoints", "9", "state"), b"s")
                storage.write_text(storage.join(out, "metrics.jsonl"), json.dumps(rm_metrics) + "\n")
                storage.write_json(storage.join(out, "DONE"), {"seconds": 2.0, "result": {}})
            return {"stage_seconds": dict.fromkeys(stages, 2.0)}
        return {"stage_seconds": {"ppo_ptx": 1.0, "eval": 1.0}, "gold_score": {"ppo_ptx": 0.5}}
    monkeypatch.setattr(pipeline, "run", fake_run)

    summary = sweep.run(spec, root)
    point = storage.join(root, "points", spec.points[0]["name"])
    assert storage.listdir(storage.join(point, "rm")) == (
        ["DONE", "metrics.jsonl", "model"] if where == "gcs"
        else ["DONE", "checkpoints", "metrics.jsonl", "model"])
    assert os.path.islink(storage.join(point, "rm")) == (where == "local")
    assert storage.read_bytes(storage.join(point, "rm", "model", "params", "0")) == b"w"
    assert summary["points"][0]["shared_stage_seconds"] == dict.fromkeys(
        spec.points[0].get("shared", spec.shared), 2.0)
    assert storage.exists(storage.join(point, "config_pipeline.json"))
    assert json.loads(storage.read_text(storage.join(root, "sweep.json")))["points"]
    assert storage.read_text(storage.join(root, "sweep.md")).startswith("# Sweep")
    assert sweep.curves(storage.join(root, "shared"), ("rm",)) == {
        "rm": [{"step": 1, "train/loss": 0.5}]}
    # A finished copy is kept by the next run: a shared stage trained again shows through a
    # link only (either way the point's own stages, trained from the old one, are kept too).
    storage.write_json(storage.join(root, "shared", "rm", "DONE"), {"seconds": 5.0})
    sweep._link_shared(storage.join(root, "shared"), point, ("rm",))
    assert sweep.shared_stage_seconds(point, ("rm",)) == {"rm": 2.0 if where == "gcs" else 5.0}


def test_url_inputs_are_checked_like_local_ones(gcs_path):
    data = storage.join(gcs_path, "demos.jsonl")
    # Its rows are read (from the URL) and validated too: a batch's worth of demonstrations.
    storage.write_text(data, (json.dumps({"prompt": "a", "completion": "b"}) + "\n") * 20)
    cfg = sft_config()
    cfg.data.train = data
    cfg.model.vocab_size = 64     # a random start of this architecture
    validate.check(cfg)
    cfg.data.valid = storage.join(gcs_path, "missing.jsonl")
    cfg.init_from = storage.join(gcs_path, "no_model")
    with pytest.raises(ConfigError) as error:
        validate.check(cfg)
    assert str(error.value) == (
        f"config: data.valid='{gcs_path}/missing.jsonl': expected an existing JSONL file or "
        ".parquet file (or tfds:<name>[/<config>]:<split> or hf:<dataset>[/<config>]:<split>); "
        f"init_from='{gcs_path}/no_model': expected a model directory "
        "(ours, or a transformers checkpoint with config.json)")
