"""Experiment trackers (rlhf_jax.tracking) behind MetricsWriter, and quiet progress bars.

Each tracker test writes steps 1..3, closes, then resumes from the step-2 checkpoint the way a
training loop does (``discard_after(2)``) and writes steps 3..4: the tracker's own files must
hold every step once and the run's config.
"""
import glob
import io
import json
import os
import sys
import time

import ml_collections
import pytest

from rlhf_jax import metrics, pipeline, tracking, validate
from rlhf_jax.config import sft_config
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.metrics import MetricsWriter, ProgressBar, read_jsonl_metrics


def run_with_resume(workdir: str, config) -> None:
    """Steps 1..3, then a resume from checkpoint 2 that writes 3 (a new value) and 4."""
    with MetricsWriter(workdir, config=config, enabled=True) as writer:
        writer.discard_after(0)
        for step in (1, 2, 3):
            writer.write(step, {"loss": float(step)})
    with MetricsWriter(workdir, config=config, enabled=True) as writer:
        writer.discard_after(2)
        for step in (3, 4):
            writer.write(step, {"loss": 10.0 * step})
        writer.write_table(4, "samples", [{"prompt": "p", "response": "r"}])


def config_with(tracker: str) -> ml_collections.ConfigDict:
    cfg = sft_config()
    cfg.tracker = tracker
    return cfg


def test_tracker_none_writes_the_jsonl_files_only(tmp_path):
    run_with_resume(str(tmp_path), config_with("none"))
    assert [(r["step"], r["loss"]) for r in read_jsonl_metrics(str(tmp_path / "metrics.jsonl"))] \
        == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "samples.jsonl"]


def test_tensorboard_resume_purges_replayed_steps_and_records_the_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_with_resume(str(tmp_path), config_with("tensorboard"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    # Step 3 once, with the resumed run's value: the second writer's purge_step hid the first's.
    assert [(e.step, e.value) for e in events.Scalars("loss")] \
        == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    assert b"optim.lr" in hparams["_hparams_/session_start_info"]
    assert {"config/text_summary", "samples/text_summary"} <= set(events.Tags()["tensors"])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| train.batch_size" in config_text


def wandb_file_records(data: bytes) -> list:
    """The records of a W&B transaction log (.wandb): a 7-byte W&B header, then LevelDB log
    blocks of 32 KiB holding protobuf Records, each whole or in pieces."""
    from wandb.proto import wandb_internal_pb2

    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:      # a block's tail too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):       # full, or the last piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_records(workdir) -> list:
    """The records of every offline run of ``workdir``, oldest run first."""
    paths = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "*.wandb")))
    return [record for path in paths for record in wandb_file_records(open(path, "rb").read())]


def kinds(records) -> list[str]:
    return [record.WhichOneof("record_type") for record in records]


def test_wandb_offline_resume_continues_the_run_and_logs_each_step_once(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert tracking.wandb_mode() == "offline"    # no key, no mode: offline
    run_with_resume(str(tmp_path), config_with("wandb"))
    run_id = (tmp_path / "wandb_id").read_text().strip()
    runs = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(run.endswith(f"-{run_id}") for run in runs)
    records = wandb_records(str(tmp_path))
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    # The resumed life skipped step 3 (logged before the "kill"; a resume is bit-exact).
    assert [(h["_step"], h.get("loss")) for h in history] \
        == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert history[-1]["samples/_type"] == "table-file"
    configs = [{u.key: json.loads(u.value_json) for u in r.run.config.update}
               for r in records if r.WhichOneof("record_type") == "run"]
    assert configs and configs[0]["optim.lr"] == sft_config().optim.lr
    assert configs[0]["tracker"] == "wandb" and configs[0]["mesh.shape"] == [-1, 1, 1]


def test_wandb_on_a_gcs_workdir_uploads_the_run_and_its_summary(gcs_path, monkeypatch):
    pytest.importorskip("wandb")
    from rlhf_jax import storage
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsWriter(gcs_path, config=config_with("wandb"), enabled=True) as writer:
        writer.discard_after(0)
        writer.write(1, {"loss": 1.0})
        writer.write_summary(2, {"gold_score/sft": 0.25}, {"results": [{"model": "sft"}]})
    run_id = storage.read_text(storage.join(gcs_path, "wandb_id")).strip()
    runs = [name for name in storage.listdir(storage.join(gcs_path, "wandb"))
            if name.startswith("offline-run-")]
    assert len(runs) == 1 and runs[0].endswith(run_id)
    uploaded = storage.read_bytes(storage.join(gcs_path, "wandb", runs[0], f"run-{run_id}.wandb"))
    records = wandb_file_records(uploaded)       # the whole run, closed
    assert kinds(records).count("history") == 2 and kinds(records)[-1] == "exit"
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}
    assert summary["gold_score/sft"] == 0.25 and summary["results/_type"] == "table-file"


@pytest.mark.parametrize("tracker", ["mlflow", ""])
def test_a_bad_tracker_is_a_one_line_config_error(tmp_path, tracker):
    with pytest.raises(ConfigError) as error:
        MetricsWriter(str(tmp_path), config=config_with(tracker), enabled=True)
    assert str(error.value) == (f"tracker={tracker!r}: expected one of 'tensorboard', 'wandb', "
                                "'none'")
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match=rf"^config: .*tracker={tracker!r}: expected one of"):
        validate.check(config_with(tracker))


def test_a_missing_wandb_says_how_to_install_it(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r'^tracker=\'wandb\': .*pip install -e "\.\[tracking\]"'):
        MetricsWriter(str(tmp_path), tracker="wandb", enabled=True)
    assert not (tmp_path / "wandb_id").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [io.StringIO, _Terminal])
def test_a_bar_off_a_terminal_redraws_at_most_every_few_seconds(stream, monkeypatch):
    out = stream()
    monkeypatch.setattr(sys, "stderr", out)
    bar = ProgressBar(2000, desc="sft", enabled=True)
    clock = [time.time()]
    # tqdm reads its clock through this attribute: 2000 updates 10 ms apart, 20 s in all.
    bar._bar._time = lambda: clock[0]
    for _ in range(2000):
        clock[0] += 0.01
        bar.update(tokens=5)
    bar.close()
    text = out.getvalue()
    if stream is _Terminal:
        assert text.count("\r") > 100          # tqdm's own 0.1 s on a terminal, in place
    else:
        # Start, every 5 s of 20, the end: each a line of its own, with no carriage return.
        lines = text.splitlines()
        assert 3 <= len(lines) <= 6 and "\r" not in text and text.endswith("\n")
        assert all(line.startswith("sft: ") for line in lines)
    assert "2000/2000" in text


def test_ppo_bar_reads_episodes_per_second(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    with ProgressBar(4, desc="ppo", enabled=True, unit="episode", unit_scale=16) as bar:
        bar.update(2)
        assert bar.step == 2
    assert "32/64" in out.getvalue() and "episode/s" in out.getvalue()


def test_eval_results_go_to_the_tracker_as_numbers_and_tables(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    results = {"gold_score": {"sft": 0.1, "ppo": 0.2}, "kl_to_sft": {"sft": 0.0, "ppo": 3.0},
               "win_rate_vs_sft": {"ppo": {"heldout_labelers": 0.45, "n": 300,
                                           "ci95": {"heldout_labelers": [0.4, 0.5]}}},
               "behaviour": {"ppo": {"correct": 0.5}},
               "samples": {"ppo": [{"prompt": "p", "response": "r"}]}}
    values, tables = pipeline.results_for_tracker(results)
    assert values == {"gold_score/sft": 0.1, "gold_score/ppo": 0.2, "kl_to_sft/sft": 0.0,
                      "kl_to_sft/ppo": 3.0, "win_rate_vs_sft/ppo/heldout_labelers": 0.45,
                      "win_rate_vs_sft/ppo/n": 300,
                      "win_rate_vs_sft/ppo/ci95/heldout_labelers/0": 0.4,
                      "win_rate_vs_sft/ppo/ci95/heldout_labelers/1": 0.5}
    assert tables["results"][1] == {"model": "ppo", "gold_score": 0.2, "proxy_score": None,
                                    "kl_to_sft": 3.0, "capability_score": None,
                                    "win_heldout_labelers": 0.45, "win_train_labelers": None}
    assert tables["samples"] == [{"model": "ppo", "prompt": "p", "response": "r"}]
    cfg = ml_collections.ConfigDict({"sft": {"tracker": "tensorboard"}})
    for gold in (0.2, 0.3):      # evaluated twice: the second replaces the first
        results["gold_score"]["ppo"] = gold
        pipeline.track_results(cfg, str(tmp_path), results)
    events = EventAccumulator(str(tmp_path / "eval" / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("gold_score/ppo")] \
        == [(1, pytest.approx(0.3))]
    assert "results/text_summary" in events.Tags()["tensors"]


@pytest.mark.parametrize("stream", [io.StringIO, _Terminal])
def test_eval_bars_nest_on_a_terminal_and_add_no_lines_off_one(stream, monkeypatch):
    out = stream()
    monkeypatch.setattr(sys, "stderr", out)
    for _ in metrics.progress(["sft", "ppo"], desc="eval", unit="model", enabled=True):
        inner = metrics.progress(total=8, desc="sampling", unit="prompt", leave=False,
                                 enabled=True)
        inner.update(8)
        inner.close()
    if stream is _Terminal:
        assert "sampling" in out.getvalue() and out.getvalue().count("\n") > 1
    else:
        # The outer bar alone, a line per redraw: the inner one would move between lines with
        # newlines and cursor-up codes.
        assert "sampling" not in out.getvalue()
        lines = out.getvalue().splitlines()
        assert len(lines) == 2 and all(line.startswith("eval: ") for line in lines)
        assert "2/2" in out.getvalue()
        with metrics.progress(total=1, enabled=True) as alone:
            assert alone.mininterval == metrics.NON_TTY_MININTERVAL and not alone.disable
