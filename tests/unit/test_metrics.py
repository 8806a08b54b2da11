"""Tests for rlhf_jax.metrics: JSONL/TensorBoard logging, tables, progress bar, timer, plots."""

import json
import math
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import metrics, storage, tracking
from rlhf_jax.metrics import (
    MetricsWriter,
    ProgressBar,
    StepTimer,
    format_table,
    latest_per_step,
    plot_curves,
    plot_win_rates,
    read_jsonl_metrics,
)


def tensorboard_event_files(workdir) -> list[str]:
    tb_dir = os.path.join(workdir, "tb")
    return [name for name in os.listdir(tb_dir) if name.startswith("events.out.tfevents")]


def test_write_appends_json_lines_and_tensorboard_events(tmp_path):
    with MetricsWriter(str(tmp_path), enabled=True) as writer:
        writer.write(1, {"loss": jnp.float32(2.5), "objective/kl": np.float64(0.125), "tokens": 4096})
        writer.write(2, {"loss": 1.5, "objective/kl": jnp.array([0.25]), "done": True})

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["loss"] == 2.5 and first["objective/kl"] == 0.125
    assert first["tokens"] == 4096 and isinstance(first["tokens"], int)
    assert isinstance(first["time"], float)
    records = read_jsonl_metrics(str(tmp_path / "metrics.jsonl"))
    assert [record["step"] for record in records] == [1, 2]
    assert records[1]["objective/kl"] == 0.25 and records[1]["done"] == 1

    event_files = tensorboard_event_files(tmp_path)
    assert event_files
    assert os.path.getsize(tmp_path / "tb" / event_files[0]) > 0


def test_non_finite_values_are_valid_json_and_round_trip(tmp_path):
    with MetricsWriter(str(tmp_path), enabled=True) as writer:
        writer.write(0, {"a": float("nan"), "b": np.inf, "c": -jnp.inf})
    raw = json.loads((tmp_path / "metrics.jsonl").read_text())  # strict JSON would reject NaN
    assert (raw["a"], raw["b"], raw["c"]) == ("NaN", "Infinity", "-Infinity")
    record = read_jsonl_metrics(str(tmp_path / "metrics.jsonl"))[0]
    assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf


def test_write_rejects_non_scalars_and_reserved_names(tmp_path):
    with MetricsWriter(str(tmp_path), enabled=True) as writer:
        with pytest.raises(ValueError, match="scalar"):
            writer.write(0, {"per_token": np.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write(0, {"step": 1.0})


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricsWriter(str(workdir), enabled=False) as writer:
        writer.write(0, {"loss": 1.0})
        writer.write_table(0, "samples", [{"prompt": "p"}])
    assert not workdir.exists()


def test_write_table_appends_rows_with_step(tmp_path):
    rows = [{"prompt": "Say hi", "response": "hi | there\nbye", "reward": np.float32(0.5)}]
    with MetricsWriter(str(tmp_path), enabled=True) as writer:
        writer.write_table(3, "samples", rows)
        writer.write_table(4, "samples", rows)
        writer.write_table(4, "eval/samples", rows)
    table = read_jsonl_metrics(str(tmp_path / "samples.jsonl"))
    assert [row["step"] for row in table] == [3, 4]
    assert table[0]["response"] == "hi | there\nbye" and table[0]["reward"] == 0.5
    assert (tmp_path / "eval" / "samples.jsonl").exists()


def test_read_skips_a_line_cut_short_by_a_crash(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 2, "loss": 0.5}\n')
    with pytest.warns(UserWarning, match="1 unparsable"):
        records = read_jsonl_metrics(str(path))
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_read_skips_a_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 1.0}\n{"step": 2, "note": "\xff\xfe"}\n'
                     b'{"step": 3, "loss": 0.5}\n')
    with pytest.warns(UserWarning, match="1 unparsable"):
        records = read_jsonl_metrics(str(path))
    assert records == [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 0.5}]


def test_resume_drops_damaged_lines_with_a_warning(tmp_path, caplog):
    """A resume rewrites metrics.jsonl without the lines that are not UTF-8 or not JSON (which
    once stopped it with a UnicodeDecodeError), says so, and keeps every other line."""
    path = tmp_path / "metrics.jsonl"
    good = b'{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.7}\n'
    path.write_bytes(good[:25] + b'{"step": 1, "x": "\xc3("}\n{not json}\n' + good[25:]
                     + b'{"step": 3, "loss": 0.5}\n{"step": 4, "lo')
    with caplog.at_level("WARNING", logger="rlhf_jax.metrics"):
        with MetricsWriter(str(tmp_path), enabled=True) as writer:
            writer.discard_after(2)
    assert path.read_bytes() == good
    assert "dropped 2 damaged line(s)" in caplog.text   # not the last line a kill cut short


def test_latest_per_step_keeps_last_occurrence_sorted():
    records = [{"step": 2, "x": 1}, {"step": 1, "x": 2}, {"step": 2, "x": 3}, {"note": "no step"}]
    assert latest_per_step(records) == [{"step": 1, "x": 2}, {"step": 2, "x": 3}]


@pytest.mark.parametrize("enabled", [False, True])
def test_progress_bar_tracks_steps_and_tokens(enabled, capsys):
    with ProgressBar(10, "sft", initial=2, enabled=enabled) as bar:
        bar.update(loss=jnp.float32(1.25), lr=3e-4)
        bar.update(2, tokens=512, loss=1.0, phase="ppo")
        assert bar.step == 5
        assert bar.tokens_seen == 512
        assert bar.tokens_per_second > 0
    error_output = capsys.readouterr().err
    if enabled:
        assert "sft" in error_output and "loss=1" in error_output
    else:
        assert error_output == ""


def test_step_timer_accumulates_and_resets():
    timer = StepTimer()
    with timer("rollout"):
        sum(range(1000))
    with timer("rollout"):
        sum(range(1000))
    with pytest.raises(RuntimeError):
        with timer("update"):
            raise RuntimeError("phase failed")
    assert set(timer.peek()) == {"time/rollout_s", "time/update_s"}
    timings = timer.pop()
    assert all(seconds >= 0 for seconds in timings.values())
    assert timer.pop() == {}


def test_plot_curves_and_win_rates_write_pngs(tmp_path):
    with MetricsWriter(str(tmp_path), enabled=True) as writer:
        for step in range(5):
            writer.write(step, {"loss": 1.0 / (step + 1), "objective/kl": 0.01 * step})
    curves_png = tmp_path / "plots" / "curves.png"
    plotted = plot_curves(str(tmp_path / "metrics.jsonl"), ["loss", "missing", "objective/kl"],
                          str(curves_png), title="SFT")
    assert plotted == ["loss", "objective/kl"]
    assert curves_png.stat().st_size > 0

    with pytest.warns(UserWarning, match="no plot"):
        assert plot_curves(str(tmp_path / "metrics.jsonl"), ["missing"], str(tmp_path / "none.png")) == []
    assert not (tmp_path / "none.png").exists()

    wins_png = tmp_path / "wins.png"
    plot_win_rates({"SFT": (0.5, 0.45, 0.55), "PPO": (0.7, 0.62, 0.77)}, str(wins_png), "vs SFT")
    assert wins_png.stat().st_size > 0


def test_format_table_golden():
    rows = [
        {"model": "sft", "win_rate": 0.5, "kl": 0.0, "n": 200},
        {"model": "ppo|ptx", "win_rate": 0.71234, "kl": 0.000012, "n": 1200000},
        {"model": "ppo", "win_rate": np.float32(0.25), "n": 7, "note": "line1\nline2"},
    ]
    expected = "\n".join([
        "| model    | win_rate |        kl |       n | note           |",
        "| -------- | -------: | --------: | ------: | -------------- |",
        "| sft      |   0.5000 |    0.0000 |     200 |                |",
        "| ppo\\|ptx |   0.7123 | 1.200e-05 | 1200000 |                |",
        "| ppo      |   0.2500 |           |       7 | line1<br>line2 |",
    ])
    assert format_table(rows) == expected


def test_format_table_column_selection_and_truncation():
    rows = [{"prompt": "a very long prompt", "score": 2}]
    assert format_table(rows, ["score", "prompt"], max_width=6) == "\n".join([
        "| score | prompt |",
        "| ----: | ------ |",
        "|     2 | a ver… |",
    ])
    assert format_table([]) == ""


def test_progress_bar_postfix_stays_until_replaced():
    bar = ProgressBar(10, desc="t", enabled=True)
    bar.set_postfix(loss=1.5)
    bar.update(tokens=8)
    assert bar._bar.postfix is not None and "loss=1.5" in bar._bar.postfix
    bar.update(loss=0.25)
    assert "loss=0.25" in bar._bar.postfix and bar.step == 2
    bar.close()


def _gcs_files(root) -> list[str]:
    """Every object under ``root``, as paths relative to it."""
    out = []
    for name in storage.listdir(root):
        path = storage.join(root, name)
        out += [f"{name}/{f}" for f in _gcs_files(path)] if storage.isdir(path) else [name]
    return out


def test_writer_on_gcs_mirrors_only_its_files_and_resumes(gcs_path, monkeypatch):
    monkeypatch.setattr(tracking, "UPLOAD_SECONDS", 0.0)   # upload on every flush
    checkpoint = storage.join(gcs_path, "checkpoints", "7", "state")
    storage.write_text(checkpoint, "not the writer's")
    with MetricsWriter(gcs_path, enabled=True) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": float(step)})
        writer.write_table(2, "eval/samples", [{"prompt": "p"}])
        # Uploaded after every record, before close; the checkpoint was never downloaded.
        assert [r["step"] for r in read_jsonl_metrics(writer.metrics_path)] == [1, 2, 3]
        assert sorted(os.listdir(writer._files.local)) == ["eval", "metrics.jsonl"]
        deadline = time.monotonic() + 10     # the TensorBoard thread uploads on its own
        while not storage.exists(storage.join(gcs_path, "tb")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert storage.exists(storage.join(gcs_path, "tb"))
    events = [f for f in _gcs_files(storage.join(gcs_path, "tb")) if "tfevents" in f]
    assert len(events) == 1 and storage.read_bytes(storage.join(gcs_path, "tb", events[0]))

    with MetricsWriter(gcs_path, enabled=True) as writer:    # resumed from the step-2 checkpoint
        writer.discard_after(2, tables=["eval/samples", "absent"])
        writer.write(3, {"loss": 0.5})
        writer.write_table(3, "eval/samples", [{"prompt": "q"}])
    records = read_jsonl_metrics(storage.join(gcs_path, "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 0.5)]
    table = read_jsonl_metrics(storage.join(gcs_path, "eval", "samples.jsonl"))
    assert [(r["step"], r["prompt"]) for r in table] == [(2, "p"), (3, "q")]
    assert storage.read_text(checkpoint) == "not the writer's"
    assert not storage.exists(storage.join(gcs_path, "absent.jsonl"))


def test_figures_are_written_to_gcs(gcs_path):
    with MetricsWriter(gcs_path, enabled=True) as writer:
        writer.write(0, {"loss": 1.0})
        writer.write(1, {"loss": 0.5})
    curves = storage.join(gcs_path, "plots", "curves.png")
    assert plot_curves(storage.join(gcs_path, "metrics.jsonl"), ["loss"], curves) == ["loss"]
    wins = storage.join(gcs_path, "wins.png")
    plot_win_rates({"SFT": (0.5, 0.45, 0.55)}, wins, "vs SFT")
    for png in (curves, wins):
        assert storage.read_bytes(png).startswith(b"\x89PNG\r\n")
