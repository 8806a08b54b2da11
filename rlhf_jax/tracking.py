"""Experiment trackers behind :class:`rlhf_jax.metrics.MetricsWriter`: TensorBoard, Weights &
Biases, or none (the JSONL files alone).

A config's ``tracker`` field picks one. ``MetricsWriter`` keeps ``metrics.jsonl`` itself (what a
crash must not lose) and hands every record to a :class:`TrackerThread`, which opens the
tracker lazily and writes on a worker thread: importing tensorboardX or starting a W&B run costs
seconds, which would otherwise sit before the first compile, and each flush on the loop's
critical path. The tracker opens on the first record, after a resuming loop has said from which
step it resumes (``resume``), since both trackers need that when they start:

* **tensorboard** (``workdir/tb``): scalars, tables as markdown text, the run's flattened config
  as hparams and as a text table; a resumed run opens its writer with ``purge_step``, so
  TensorBoard hides the points of the steps being replayed and shows each step once.
* **wandb**: one W&B run per workdir (its id kept in ``workdir/wandb_id``, resumed with
  ``resume="allow"``), offline unless ``WANDB_API_KEY`` is set or ``WANDB_MODE`` says otherwise
  (``wandb sync workdir/wandb/offline-run-*`` uploads it later); the project is
  ``$WANDB_PROJECT`` or ``rlhf_jax``. W&B history only grows (steps must increase), so a resumed
  run skips the steps its first life already logged: a resume is bit-exact, so those points
  hold the same values. Tables become ``wandb.Table``; summaries go to ``run.summary``.
* **none**: nothing beyond the JSONL files.

A ``gs://`` workdir: both trackers write a local directory (``storage.Mirror``) that is uploaded
at most every ``UPLOAD_SECONDS`` and on close.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhf_jax import storage
from rlhf_jax.errors import ConfigError

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb", "none")
TENSORBOARD_SUBDIR = "tb"
WANDB_ID_FILENAME = "wandb_id"
WANDB_DEFAULT_PROJECT = "rlhf_jax"
# Seconds between uploads of a tracker's files to a URL workdir: each upload rewrites whole
# files, and TensorBoard polls on about this scale anyway.
UPLOAD_SECONDS = 30.0


def check(tracker: Any) -> None:
    """ConfigError unless ``tracker`` is a known tracker whose package is installed."""
    if tracker not in TRACKERS:
        raise ConfigError(f"tracker={tracker!r}: expected one of "
                          + ", ".join(repr(t) for t in TRACKERS))
    package = {"tensorboard": "tensorboardX", "wandb": "wandb"}.get(tracker)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"tracker={tracker!r}: the {package} package is not installed; "
                          'pip install -e ".[tracking]" (or pass --tracker none)')


def flat_config(config: Any) -> dict[str, Any]:
    """A config (ConfigDict or mapping) as ``{"section.field": value}``, tuples as lists."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = list(node) if isinstance(node, tuple) else node
    visit(data, "")
    return out


def wandb_run_id(workdir: str) -> tuple[str, bool]:
    """The W&B run id of ``workdir`` (kept in ``workdir/wandb_id``, made on first use) and
    whether it was there already (a resumed run)."""
    path = storage.join(workdir, WANDB_ID_FILENAME)
    if storage.exists(path):
        run_id = storage.read_text(path).strip()
        if run_id:
            return run_id, True
    run_id = uuid.uuid4().hex[:12]
    storage.write_text(path, run_id + "\n")
    return run_id, False


class TrackerThread:
    """Records for a tracker, written by a worker thread (see the module docstring).

    The worker imports ``package`` at once; ``open_tracker(resume_step, logged_step)`` makes
    the tracker on the worker's first record;
    ``resume`` (called before any record) sets its arguments: the checkpoint step a run resumes
    from and the last step an earlier life logged. ``close`` drains the queue, closes the
    tracker, uploads ``mirror`` (a URL workdir's local files) and re-raises anything the thread
    hit.
    """

    def __init__(self, open_tracker: Callable[[int | None, int], Any], mirror: storage.Mirror,
                 package: str) -> None:
        self._package = package
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._open = open_tracker
        self._resume: tuple[int | None, int] = (None, 0)
        self._mirror = mirror
        self._thread = threading.Thread(target=self._run, name="tracker", daemon=True)
        self._thread.start()

    def resume(self, step: int, logged_step: int) -> None:
        self._queue.put(("resume", step, logged_step))

    def put(self, method: str, *args: Any) -> None:
        """Call ``tracker.<method>(*args)`` on the worker thread."""
        self._queue.put((method, *args))

    def _run(self) -> None:
        tracker = None
        uploaded = time.monotonic()
        try:
            # At once, while the loop compiles (XLA releases the GIL), not at the first record.
            importlib.import_module(self._package)
            while (item := self._queue.get()) is not None:
                method, *args = item
                if method == "resume":
                    self._resume = (args[0], args[1])
                    continue
                if tracker is None:
                    tracker = self._open(*self._resume)
                getattr(tracker, method)(*args)
                if self._queue.empty():
                    tracker.flush()
                    if time.monotonic() - uploaded >= UPLOAD_SECONDS:
                        uploaded = time.monotonic()
                        self._upload()
        except BaseException as e:     # surfaced by close()
            self._error = e
        finally:
            if tracker is not None:
                try:
                    tracker.close()
                except BaseException as e:     # noqa: BLE001  # surfaced by close()
                    self._error = self._error or e

    def _upload(self) -> None:
        try:
            self._mirror.sync()
        except Exception as e:    # noqa: BLE001  # the next upload (or close's) tries again
            log.warning("uploading tracker files to %s failed: %s", self._mirror.target, e)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._mirror.close()
        if self._error is not None:
            # The directory in the text: the CLI's disk-full line names the path it finds there.
            raise RuntimeError(f"writing tracker files to {self._mirror.target} failed: "
                               f"{self._error}") from self._error


def _hparam_value(value: Any) -> bool | int | float | str:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoard:
    """TensorBoard events in ``directory`` (tensorboardX); tables are shown as the markdown
    text ``render_table(rows)`` makes of them."""

    def __init__(self, directory: str, config: Mapping[str, Any] | None,
                 resume_step: int | None, render_table: Callable[[Sequence[Mapping]], str]
                 ) -> None:
        from tensorboardX import SummaryWriter
        from tensorboardX.summary import hparams

        self._render_table = render_table
        # Events of steps after the checkpoint (logged before a kill) are hidden from here on.
        # tensorboardX names a file by the second it opened it in: the suffix keeps a writer of
        # the same second from overwriting its predecessor's file, and their order by name.
        self.writer = SummaryWriter(logdir=directory, filename_suffix=f".{time.time_ns()}",
                                    purge_step=None if resume_step is None else resume_step + 1)
        if config:
            # In this run's own event file (add_hparams would start a run directory of its own).
            events = self.writer._get_file_writer()
            for summary in hparams({k: _hparam_value(v) for k, v in config.items()}, {}):
                events.add_summary(summary)
            self.writer.add_text("config", render_table(
                [{"field": k, "value": str(v)} for k, v in config.items()]), global_step=0)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def table(self, step: int, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        self.writer.add_text(name, self._render_table(rows), global_step=step)

    def summary(self, step: int, values: Mapping[str, float],
                tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        self.scalars(step, values)
        for name, rows in tables.items():
            self.table(step, name, rows)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str | None:
    """Offline unless a key is set; ``WANDB_MODE`` (None here: wandb reads it) decides first."""
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Wandb:
    """A W&B run whose files are in ``directory/wandb`` (the workdir ``target``'s, mirrored);
    steps up to ``logged_step`` (what an earlier life of the same run logged) are skipped."""

    def __init__(self, directory: str, target: str, config: Mapping[str, Any] | None, *,
                 run_id: str, name: str, logged_step: int) -> None:
        import wandb
        self._wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT, dir=directory,
            id=run_id, name=name or None, resume="allow", mode=wandb_mode(),
            config=dict(config or {}),
            # Console capture would copy the progress bar and every log line into the run;
            # quiet: no history sparklines at the end of every stage (one line of ours instead).
            settings=wandb.Settings(console="off", quiet=True))
        self._offline = self.run.settings.mode == "offline"
        self._run_dir = storage.join(target, os.path.relpath(self.run.settings.sync_dir, directory))
        # Online, the server also knows where the run got to (run.step: its next step).
        self.logged_step = max(logged_step, self.run.step - 1)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if step > self.logged_step:
            self.run.log(dict(values), step=step)

    def _table(self, rows: Sequence[Mapping[str, Any]]):
        columns = list(dict.fromkeys(key for row in rows for key in row))
        cell = lambda v: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
        return self._wandb.Table(columns=columns,
                                 data=[[cell(row.get(c)) for c in columns] for row in rows])

    def table(self, step: int, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if step > self.logged_step:
            self.run.log({name: self._table(rows)}, step=step)

    def summary(self, step: int, values: Mapping[str, float],
                tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        self.run.summary.update(dict(values))
        for name, rows in tables.items():
            self.table(step, name, rows)

    def flush(self) -> None:
        """W&B's own service process writes and uploads."""

    def close(self) -> None:
        self.run.finish()
        # finish() returns before W&B's service process has written the run's last records;
        # the files must be whole now (a URL workdir uploads them next), and the next stage's
        # run starts its own service.
        self._wandb.teardown()
        if self._offline:
            log.info("W&B run %s (offline) in %s; `wandb sync` it to upload", self.run.id,
                     self._run_dir)


def open_thread(tracker: str, workdir: str, config: Any, name: str,
                render_table: Callable[[Sequence[Mapping]], str]) -> TrackerThread | None:
    """The worker thread for ``tracker`` on ``workdir`` (None for "none"); ``name`` names a
    W&B run, ``render_table`` turns a table into TensorBoard's markdown."""
    check(tracker)
    flat = flat_config(config) if config is not None else None
    if tracker == "tensorboard":
        # Never downloaded: a resumed run's writer starts a new event file beside the old.
        mirror = storage.Mirror(storage.join(workdir, TENSORBOARD_SUBDIR), download=False)
        return TrackerThread(
            lambda resume_step, _: TensorBoard(mirror.local, flat, resume_step, render_table),
            mirror, "tensorboardX")
    if tracker == "wandb":
        run_id, resumed = wandb_run_id(workdir)
        # W&B writes <dir>/wandb/: a mirror of the workdir itself, holding only that.
        mirror = storage.Mirror(workdir, download=False)
        return TrackerThread(
            lambda _, logged: Wandb(mirror.local, workdir, flat, run_id=run_id, name=name,
                                    logged_step=logged if resumed else 0), mirror, "wandb")
    return None
