"""Metric logging, progress display, phase timing, plots and tables for the training loops.

Every stage (SFT, reward model, PPO) logs through the same small set of tools:

* :class:`MetricsWriter` appends one JSON line per logging step to ``workdir/metrics.jsonl``
  and hands scalars, tables and the run's config to its tracker (``rlhf_jax.tracking``:
  TensorBoard under ``workdir/tb/``, Weights & Biases, or none); a ``gs://`` workdir gets the
  same files (``rlhf_jax.storage``).
* :class:`ProgressBar` is a tqdm bar with a tokens/s readout.
* :class:`StepTimer` accumulates wall-clock seconds per named phase of a step.
* :func:`plot_curves`, :func:`plot_win_rates` and :func:`format_table` turn results into
  figures and markdown.

On a multi-host pod every process runs the same training loop, but only process 0 should
touch the filesystem or the terminal, so the writers and the bar default to
``enabled = jax.process_index() == 0`` and become no-ops elsewhere.

Non-finite values in JSONL: JSON has no NaN/Infinity literals, so non-finite floats are
written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (always these three,
never ``null``), which keeps the file valid JSON while still telling NaN from +/-inf apart.
:func:`read_jsonl_metrics` turns those strings back into floats.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from rlhf_jax import storage, tracking

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"

# How non-finite floats are spelled in JSONL (the same spellings JavaScript uses).
_NON_FINITE_TO_STRING = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_STRING_TO_NON_FINITE = {text: float(key) for key, text in _NON_FINITE_TO_STRING.items()}
_RESERVED_KEYS = ("step", "time")


def _is_main_process() -> bool:
    """True on the process that owns logging (process 0 of a multi-host job)."""
    return jax.process_index() == 0


def _to_python_scalar(name: str, value: Any) -> int | float:
    """Convert a host-side scalar (Python, numpy, or fetched jax value) to int or float.

    Integer and bool dtypes stay exact as ``int`` (step counts, token totals); everything else
    becomes ``float``. Arrays must hold exactly one element: metrics are scalars, and larger
    arrays belong in :meth:`MetricsWriter.write_table` or should be reduced by the caller.
    """
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(
            f"metric {name!r} must be a scalar, got an array of shape {array.shape}; "
            "reduce it (mean, max, ...) before logging"
        )
    item = array.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    if isinstance(item, float):
        return item
    raise TypeError(f"metric {name!r} has non-numeric type {type(item).__name__}")


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by their string spelling so ``json.dumps`` emits valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE_TO_STRING[repr(value)]
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    return value


def _restore_non_finite(value: Any) -> Any:
    """Inverse of :func:`_json_safe` for values read back from JSONL."""
    if isinstance(value, str) and value in _STRING_TO_NON_FINITE:
        return _STRING_TO_NON_FINITE[value]
    if isinstance(value, dict):
        return {key: _restore_non_finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_restore_non_finite(item) for item in value]
    return value


def _append_json_line(path: str, record: Mapping[str, Any]) -> None:
    """Append one JSON object as a line and flush it, so a crash loses at most that line."""
    line = json.dumps(_json_safe(record), allow_nan=False)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()


class MetricsWriter:
    """Writes scalar metrics to ``workdir/metrics.jsonl`` and to the run's tracker.

    Args:
        workdir: run directory; created if missing.
        config: the run's config: its ``tracker`` field picks the tracker ("tensorboard",
            the default, under ``workdir/tb``; "wandb"; "none", see ``rlhf_jax.tracking``), which
            also records the flattened config; its ``name`` names a W&B run.
        tracker: overrides ``config.tracker``.
        enabled: whether this process writes anything. Defaults to ``jax.process_index() == 0``
            so a multi-host pod produces a single log. A disabled writer accepts every call and
            does nothing (it does not even fetch values from the devices).

    The JSONL file is opened in append mode, so a run resumed after a kill keeps its earlier
    lines. A resuming loop calls :meth:`discard_after` with the step it resumed from, which drops
    the lines of the steps it is about to replay, so every step appears once; the tracker shows
    each step once too.

    A URL workdir (``gs://...``) is written through local mirrors (``storage.Mirror``) of only
    the files the writer owns, never the rest of the workdir (checkpoints): a JSONL file is
    downloaded before the writer first appends to it (a resumed run keeps its lines) and
    uploaded whole after every record, so a crash loses at most the last one, as locally;
    the tracker's files are uploaded at most every ``tracking.UPLOAD_SECONDS`` and on close.
    """

    def __init__(self, workdir: str, *, config: Any = None, tracker: str | None = None,
                 enabled: bool | None = None) -> None:
        self.workdir = storage.absolute(workdir)
        self.enabled = _is_main_process() if enabled is None else enabled
        self.metrics_path = storage.join(self.workdir, METRICS_FILENAME)
        get = config.get if config is not None else {}.get
        self.tracker = tracker if tracker is not None else get("tracker", "tensorboard")
        tracking.check(self.tracker)
        self._tracker = self._files = None
        if self.enabled:
            self._files = storage.Mirror(self.workdir, download=False)
            self._files.pull(METRICS_FILENAME)
            self._tracker = tracking.open_thread(
                self.tracker, self.workdir, config,
                get("name") or storage.basename(self.workdir), format_table)

    def _track(self, method: str, *args: Any) -> None:
        if self._tracker is not None:
            self._tracker.put(method, *args)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log scalar ``metrics`` for ``step``.

        Values may be Python numbers, numpy scalars/arrays or jax arrays of one element. The
        jax values are fetched with a single ``jax.device_get`` (which waits for them to be
        computed), so call this at logging intervals, not every step. Under multi-host the
        arrays must be fully replicated (or otherwise addressable from process 0).
        """
        if not self.enabled:
            return
        for reserved in _RESERVED_KEYS:
            if reserved in metrics:
                raise ValueError(f"metric name {reserved!r} is reserved by MetricsWriter")
        host_metrics = jax.device_get(dict(metrics))
        scalars = {name: _to_python_scalar(name, value) for name, value in host_metrics.items()}
        _append_json_line(self._files.path(METRICS_FILENAME),
                          {"step": int(step), "time": time.time(), **scalars})
        self._files.sync()
        self._track("scalars", int(step), scalars)

    def write_table(self, step: int, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append ``rows`` (e.g. generated samples) to ``workdir/<name>.jsonl`` and the tracker.

        Each row becomes one JSON line ``{"step": step, **row}``; the tracker gets the whole
        table (TensorBoard: a markdown table under tag ``name``; W&B: a ``wandb.Table``).
        ``name`` may contain ``/``, which becomes a subdirectory of ``workdir``.
        """
        if not self.enabled:
            return
        host_rows = [jax.device_get(dict(row)) for row in rows]
        table_path = self._files.pull(f"{name}.jsonl")
        os.makedirs(os.path.dirname(table_path), exist_ok=True)
        for row in host_rows:
            _append_json_line(table_path, {"step": int(step), **row})
        self._files.sync()
        if host_rows:
            self._track("table", int(step), name, host_rows)

    def write_summary(self, step: int, values: Mapping[str, float],
                      tables: Mapping[str, Sequence[Mapping[str, Any]]] = {}) -> None:
        """Give the tracker a run's results (W&B: its summary; TensorBoard: scalars at
        ``step``) and ``tables`` of rows; nothing goes to JSONL (the caller keeps the results)."""
        if self.enabled:
            self._track("summary", int(step), dict(values),
                        {name: list(rows) for name, rows in tables.items()})

    def discard_after(self, step: int, tables: Sequence[str] = ()) -> None:
        """Drop the records of steps after ``step`` from ``metrics.jsonl`` and the ``tables``.

        Called when a run resumes from checkpoint ``step`` (0: from scratch), before the first
        write: the steps after it are run again and would otherwise be logged twice. Each file
        is rewritten atomically; lines cut short by a kill go too. The tracker learns the step
        and the last step logged before (see ``rlhf_jax.tracking``).
        """
        if not self.enabled:
            return
        logged = 0
        for name in [METRICS_FILENAME] + [f"{table}.jsonl" for table in tables]:
            path = self._files.pull(name)
            if os.path.exists(path):
                logged = max(logged, _truncate_jsonl_after(path, int(step)))
        self._files.sync()
        if self._tracker is not None:
            self._tracker.resume(int(step), logged)

    def close(self) -> None:
        """Write out and close the tracker and upload what a URL workdir lacks; safe to call
        more than once."""
        tracker, files = self._tracker, self._files
        self._tracker = self._files = None
        try:
            if tracker is not None:
                tracker.close()
        finally:
            if files is not None:
                files.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _lines(path: str) -> Iterator[tuple[str | None, bool]]:
    """``(text, ended by a newline)`` per line of ``path``; text is None where the bytes are
    not UTF-8 (a damaged disk or a foreign writer), so one bad line cannot hide the others."""
    lines = storage.read_bytes(path).split(b"\n")
    last = lines.pop()          # b"" when the file ends with a newline
    for i, line in enumerate(lines + [last] if last else lines):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        yield text, i < len(lines)


def _record(text: str | None) -> Any:
    """The JSON value of a line, or None when it has none."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _truncate_jsonl_after(path: str, step: int) -> int:
    """Keep the parsable lines of ``path`` whose step is at most ``step``; damaged lines (not
    UTF-8, not JSON) go with a warning, a last line cut short by a kill silently. Returns the
    highest step the file had (0: none)."""
    kept, changed, damaged, highest = [], False, 0, 0
    for text, complete in _lines(path):
        if not complete:
            changed = True      # even if it parses: the next append would run into it
        record = _record(text)
        if record is None:
            if text is None or text.strip():
                changed = True
                damaged += complete
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            highest = max(highest, record["step"])
            if record["step"] > step:
                changed = True
                continue
        kept.append(text + "\n")
    if damaged:
        log.warning("%s: dropped %d damaged line(s) (not UTF-8 or not JSON)", path, damaged)
    if changed:
        storage.write_text(path, "".join(kept))
    return highest


def read_jsonl_metrics(path: str) -> list[dict]:
    """Read a JSONL metrics/table file written by :class:`MetricsWriter`.

    Non-finite spellings (``"NaN"``, ``"Infinity"``, ``"-Infinity"``) become floats again.
    Lines that do not parse (a line cut short by a crash mid-write, bytes that are not UTF-8)
    are skipped with a warning rather than making the whole log unreadable.
    """
    records = []
    skipped = 0
    for text, _ in _lines(path):
        if text is not None and not text.strip():
            continue
        record = _record(text)
        if record is None:
            skipped += 1
        else:
            records.append(_restore_non_finite(record))
    if skipped:
        warnings.warn(f"skipped {skipped} unparsable line(s) in {path}", stacklevel=2)
    return records


def latest_per_step(records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Keep the last record for each step, sorted by step.

    After a resume, the steps between the last checkpoint and the kill are logged again; the
    later lines describe the run that actually continued.
    """
    by_step: dict[int, dict] = {}
    for record in records:
        if "step" in record:
            by_step[record["step"]] = dict(record)
    return [by_step[step] for step in sorted(by_step)]


# Seconds between redraws of a bar whose stream is not a terminal (a log file, CI): there each
# redraw is one more line to scroll past. A terminal keeps tqdm's own rate.
NON_TTY_MININTERVAL = 5.0


class _LogLines:
    """A bar's stream off a terminal: each redraw becomes a line of its own. tqdm starts a
    redraw with a carriage return and ends none with a newline, which a terminal overwrites in
    place, but a log keeps: a log line written meanwhile would continue the bar's line."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:        # not a bar's blank-out (leave=False) nor the newline of its close
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


def progress(iterable: Any = None, *, enabled: bool | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, shown on process 0 only (``enabled`` overrides); ``kwargs`` go to
    tqdm. When stderr is not a terminal each redraw is a line (``_LogLines``), at most one every
    ``NON_TTY_MININTERVAL`` seconds, and a bar opened while another is shown stays hidden: tqdm
    would reach the second bar's line with newlines and cursor-up codes."""
    import sys
    enabled = _is_main_process() if enabled is None else enabled
    stream = kwargs.pop("file", None) or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        stream = _LogLines(stream)
        kwargs.setdefault("mininterval", NON_TTY_MININTERVAL)
        enabled = enabled and all(bar.disable for bar in list(getattr(tqdm, "_instances", ())))
    return tqdm(iterable, file=stream, disable=not enabled, dynamic_ncols=True, **kwargs)


class ProgressBar:
    """A tqdm progress bar for training loops, with a running tokens/s readout.

    Args:
        total_steps: number of steps in the run (tqdm uses it for the ETA).
        desc: label shown left of the bar.
        initial: step to start from, e.g. the restored step when resuming.
        enabled: show the bar; defaults to process 0 only.
        unit, unit_scale: what the bar counts; each step is ``unit_scale`` units (PPO: an
            iteration is a rollout batch of episodes, so the rate reads episodes/s).

    ``update(n, tokens=..., **postfix)`` advances the bar and shows the postfix values (loss,
    kl, ...); they stay shown until replaced (``set_postfix`` sets them without advancing).
    Throughput is total tokens passed to ``update`` divided by the wall-clock time since the bar
    was created, so it includes every phase of the step (and compilation). Off a terminal the
    bar redraws at most every ``NON_TTY_MININTERVAL`` seconds (see :func:`progress`).
    Passing jax arrays in ``postfix`` forces a device sync; pass values you already fetched.
    """

    def __init__(
        self,
        total_steps: int,
        desc: str = "",
        initial: int = 0,
        enabled: bool | None = None,
        unit: str = "step",
        unit_scale: int = 1,
    ) -> None:
        self.enabled = _is_main_process() if enabled is None else enabled
        self._bar = progress(total=total_steps, desc=desc, initial=initial, enabled=self.enabled,
                             unit=unit, unit_scale=unit_scale if unit_scale != 1 else False)
        self._start_time = time.perf_counter()
        self.tokens_seen = 0
        # Counted here rather than read from tqdm: a disabled tqdm bar does not count.
        self._step = int(initial)
        self._postfix: dict[str, str] = {}

    @property
    def step(self) -> int:
        """Current step (``initial`` plus all updates), also when the bar is disabled."""
        return self._step

    @property
    def tokens_per_second(self) -> float:
        """Tokens passed to :meth:`update` per second of wall clock since creation."""
        elapsed = time.perf_counter() - self._start_time
        return self.tokens_seen / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1, *, tokens: int | None = None, **postfix: Any) -> None:
        """Advance by ``n`` steps; ``tokens`` adds to the throughput count; ``postfix`` is shown."""
        if tokens is not None:
            self.tokens_seen += int(tokens)
        self._postfix.update({name: _format_postfix_value(value) for name, value in postfix.items()})
        shown = dict(self._postfix)
        if self.tokens_seen:
            shown["tok/s"] = f"{self.tokens_per_second:,.0f}"
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)
        self._step += n

    def set_postfix(self, **postfix: Any) -> None:
        """Values shown from now on (until replaced), e.g. the loss at each logging step.

        Lets a loop update the bar every step without fetching device values every step.
        """
        self._postfix.update({name: _format_postfix_value(value) for name, value in postfix.items()})

    def close(self) -> None:
        """Close the underlying tqdm bar."""
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _format_postfix_value(value: Any) -> str:
    """Compact text for a postfix value: 4 significant digits for floats."""
    if isinstance(value, str):
        return value
    array = np.asarray(jax.device_get(value))
    if array.size == 1:
        item = array.reshape(()).item()
        return f"{item:.4g}" if isinstance(item, float) else str(item)
    return str(value)


def parse_steps(spec: str, field: str = "profile_steps") -> tuple[int, int] | None:
    """``"A:B"`` -> ``(A, B)`` with 0 <= A < B; ``""`` -> None; anything else a ConfigError."""
    from rlhf_jax.errors import ConfigError
    if not spec:
        return None
    start, sep, stop = str(spec).partition(":")
    if not (sep and start.strip().isdigit() and stop.strip().isdigit()
            and int(start) < int(stop)):
        raise ConfigError(f"{field}={spec!r}: expected 'A:B' with 0 <= A < B (steps A .. B-1)")
    return int(start), int(stop)


class TraceWindow:
    """An XProf trace (``jax.profiler``) of steps ``A .. B-1`` of a training loop, written under
    ``directory`` for TensorBoard's profile plugin / XProf; ``StepTimer`` names each phase inside
    it. Call ``step(i)`` at the start of step ``i`` and ``close()`` after the loop (or on any exit):
    a trace still open when the loop ends (B past the last step) is stopped and written.
    Only process 0 traces. The profiler writes local files only: a URL ``directory`` gets the
    trace from a local one on ``close``."""

    def __init__(self, spec: str, directory: str) -> None:
        self.window = parse_steps(spec)
        self.directory = directory
        self.active = False
        self._annotation = None
        self._mirror: storage.Mirror | None = None

    def step(self, i: int) -> None:
        if self.window is None or jax.process_index() != 0:
            return
        self._end_annotation()
        start, stop = self.window
        if i == start and not self.active:
            self._mirror = storage.Mirror(self.directory, download=False)
            jax.profiler.start_trace(self._mirror.local, create_perfetto_trace=True)
            self.active = True
        elif i >= stop and self.active:
            self.close()
        if self.active:
            self._annotation = jax.profiler.StepTraceAnnotation("step", step_num=i)
            self._annotation.__enter__()

    def _end_annotation(self) -> None:
        if self._annotation is not None:
            self._annotation.__exit__(None, None, None)
            self._annotation = None

    def close(self) -> None:
        self._end_annotation()
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            self._mirror.close()


class StepTimer:
    """Accumulates wall-clock seconds per named phase of a training step.

    Usage::

        timer = StepTimer()
        with timer("rollout"):
            rollout = jax.block_until_ready(generate(...))
        metrics.update(timer.pop())   # {"time/rollout_s": 1.23}

    JAX dispatches work asynchronously: a jitted call returns before the device has finished.
    The timer only measures host wall clock, so the caller must block on the phase's results
    (``jax.block_until_ready``) inside the ``with`` block, otherwise the device time is charged
    to whichever later phase happens to wait for it.
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the enclosed block and add it to phase ``name`` (even if it raises)."""
        start = time.perf_counter()
        try:
            with jax.profiler.TraceAnnotation(name):    # the phase's name in an XProf trace
                yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def peek(self) -> dict[str, float]:
        """Accumulated seconds as ``{"time/<name>_s": seconds}`` without resetting."""
        return {f"time/{name}_s": seconds for name, seconds in self._seconds.items()}

    def pop(self) -> dict[str, float]:
        """Accumulated seconds as ``{"time/<name>_s": seconds}``, then reset all phases."""
        timings = self.peek()
        self._seconds.clear()
        return timings


def _new_figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas.

    Using the object API instead of pyplot leaves the global backend alone and avoids pyplot's
    figure registry, so plotting works headless on TPU hosts and never leaks figures.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _as_plot_value(value: Any) -> float:
    """A numeric value for plotting; missing or non-numeric values become NaN (a gap)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def plot_curves(
    jsonl_path: str,
    keys: Sequence[str],
    out_png: str,
    title: str | None = None,
) -> list[str]:
    """Plot each metric in ``keys`` against step, one subplot per key, into ``out_png``.

    Keys that never appear in the file are skipped. Steps logged twice (after a resume) use
    the later value. Returns the keys actually plotted; if none is present, no file is written.
    """
    records = latest_per_step(read_jsonl_metrics(jsonl_path))
    present = [key for key in keys if any(key in record for record in records)]
    if not present:
        warnings.warn(f"none of {list(keys)} found in {jsonl_path}; no plot written", stacklevel=2)
        return []
    columns = min(3, len(present))
    rows = math.ceil(len(present) / columns)
    figure = _new_figure(4.0 * columns, 3.0 * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, key in zip(axes, present):
        points = [(record["step"], _as_plot_value(record[key])) for record in records if key in record]
        steps, values = zip(*points)
        axis.plot(steps, values, marker="." if len(points) < 50 else None)
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in axes[len(present):]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    _save_figure(figure, out_png)
    return present


def plot_win_rates(
    results: Mapping[str, tuple[float, float, float]],
    out_png: str,
    title: str,
) -> None:
    """Bar chart of win rates with confidence intervals: ``name -> (rate, ci_low, ci_high)``.

    A dashed line at 0.5 marks parity with the baseline.
    """
    names = list(results)
    rates = np.array([results[name][0] for name in names], dtype=float)
    lows = np.array([results[name][1] for name in names], dtype=float)
    highs = np.array([results[name][2] for name in names], dtype=float)
    # Asymmetric error bars (Wilson/bootstrap intervals are not centred on the rate).
    errors = np.stack([np.clip(rates - lows, 0, None), np.clip(highs - rates, 0, None)])
    figure = _new_figure(max(4.0, 1.2 * len(names) + 2.0), 4.0)
    axis = figure.subplots()
    positions = np.arange(len(names))
    axis.bar(positions, rates, yerr=errors, capsize=6, color="tab:blue", alpha=0.8)
    axis.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    for position, rate in zip(positions, rates):
        axis.annotate(f"{rate:.2f}", (position, rate), textcoords="offset points",
                      xytext=(8, 3), fontsize=8)
    axis.set_xticks(positions, names, rotation=20, ha="right")
    axis.set_ylim(0.0, 1.0)
    axis.set_ylabel("win rate")
    axis.set_title(title)
    _save_figure(figure, out_png)


def _save_figure(figure, out_png: str) -> None:
    """Write ``figure`` as PNG (a local path or a URL), replacing any old one whole
    (``storage.write_bytes``: a kill never leaves a truncated PNG behind)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=110, format="png")
    storage.write_bytes(out_png, buffer.getvalue())


def _scalar_item(value: Any) -> Any:
    """Unwrap 0-d numpy/jax arrays and numpy scalars into Python values; leave others alone."""
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def _is_number(value: Any) -> bool:
    value = _scalar_item(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_cell(value: Any, max_width: int | None) -> str:
    """Text of one markdown cell.

    Floats use 4 decimals when that is readable (1e-3 <= |x| < 1e6) and scientific notation
    otherwise, so tiny KL values and huge token counts both stay legible. Text is made safe for
    a single markdown row: ``|`` is escaped and newlines become ``<br>``.
    """
    value = _scalar_item(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        text = str(value)
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            text = str(value)
        elif value == 0 or 1e-3 <= abs(value) < 1e6:
            text = f"{value:.4f}"
        else:
            text = f"{value:.3e}"
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")
    if max_width is not None and len(text) > max_width:
        text = text[: max(max_width - 1, 0)] + "…"
    return text


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    max_width: int | None = None,
) -> str:
    """Render ``rows`` as a padded markdown table.

    Args:
        rows: one mapping per row; missing cells are left blank.
        columns: column order; defaults to every key in order of first appearance.
        max_width: cut cells longer than this (with "…"), handy for long generated samples.

    Columns whose values are all numbers are right-aligned (``---:``).
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = list(columns)
    if not columns:
        return ""
    cells = [[_format_cell(row.get(column), max_width) for column in columns] for row in rows]
    numeric = [
        all(_is_number(row[column]) for row in rows if row.get(column) is not None)
        and any(row.get(column) is not None for row in rows)
        for column in columns
    ]
    widths = [
        max([len(column), 3] + [len(row_cells[index]) for row_cells in cells])
        for index, column in enumerate(columns)
    ]

    def render(values: Sequence[str]) -> str:
        padded = [
            value.rjust(width) if is_numeric else value.ljust(width)
            for value, width, is_numeric in zip(values, widths, numeric)
        ]
        return "| " + " | ".join(padded) + " |"

    separator = "| " + " | ".join(
        "-" * (width - 1) + ":" if is_numeric else "-" * width
        for width, is_numeric in zip(widths, numeric)
    ) + " |"
    lines = [render(columns), separator] + [render(row_cells) for row_cells in cells]
    return "\n".join(lines)
