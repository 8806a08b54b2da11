"""Kill anywhere: a CLI command SIGKILLed at seeded moments and restarted until it completes must
end with an uninterrupted run's outputs, bit for bit, and log each step once.

:func:`reference_run` runs the command uninterrupted and notes, polling its workdir every few
milliseconds, when it passed each *milestone* (its workdir lock taken, each metrics row, each
pipeline stage's ``DONE``) and each *write* it made: a checkpoint (orbax's ``*tmp*`` directory
under ``checkpoints/``) or a model (a ``<dir>.saving`` / ``<dir>.replaced`` staging directory
beside ``model/``, ``lora/``...; orbax ``*tmp*`` entries inside ``lora/``).

:func:`kill_plan` draws the kills with ``numpy.random.Generator(seed)``: moments uniform over
the reference's wall time, and targeted kills during chosen checkpoint and model writes. A
moment is placed by progress, not by the clock: "``delay`` seconds after milestone *i*, and no
later than milestone *i + 1*". A restart resumes from a checkpoint and loads compiled steps
from the cache the reference filled, so its clock runs differently, but it is killed at the same
point of the work. A targeted kill lands as soon as the write is seen in progress.

:func:`run_with_kills` runs the command once per planned kill, SIGKILLs it there, and then once
more, to completion. Each attempt that is not killed must exit 0, and each restart that finds a
dead attempt's workdir lock must take it over.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax.metrics import read_jsonl_metrics

from paths import REPO, TESTS
# test_reliability's tiny data, models and CLI helpers, also from the integration tier.
if os.path.join(TESTS, "e2e") not in sys.path:
    sys.path.insert(0, os.path.join(TESTS, "e2e"))
from test_reliability import (WORDS, assert_same_tree, cli_env, comparable, data,  # noqa: E402,F401
                              load_params, ppo_args, sft_args)

POLL_S = 0.005
STAGING_SUFFIXES = (".saving", ".replaced")
LOCK_TAKEOVER = "taking over a stale lock"
WRITE_PROBE = ".rlhf_jax-write-test-"     # reliability.check_writable's probe files


# --- what a workdir shows -------------------------------------------------------------------------

class Watcher:
    """Polls a workdir (``nested``: a pipeline's, one directory per stage) for milestones and
    for checkpoint and model writes in progress.

    Keys, relative to the workdir: ``("lock", "sft")``, ``("metrics", "sft", 12)`` (the last row
    of sft/metrics.jsonl), ``("done", "sft")``, ``("checkpoint", "sft", 10)``,
    ``("model", "sft/model")``. Only what this attempt did counts: a lock or metrics file it has
    not written is a dead attempt's, and so is a tmp or staging directory there at its start,
    until it is removed or changed. A directory's writes count once this attempt holds its
    lock: before taking it, a stage probes every directory below it for writability, which
    changes a leftover's ctime without writing anything. (Inode numbers alone cannot tell a
    leftover from the directory the next save creates in its place: ext4 hands the freed
    number straight back.)
    """

    def __init__(self, workdir: str, nested: bool = False) -> None:
        self.workdir, self.nested = workdir, nested
        self._since = 0
        self._stale: dict[str, tuple] = {}   # path -> (stage directory, (inode, ctime)) at start
        self._locked: set[str] = set()            # stage directories this attempt holds
        self._last_steps: dict[str, tuple] = {}   # metrics path -> (size, mtime_ns, last step)

    def begin(self) -> None:
        self._since = time.time_ns()
        self._locked = set()
        self._stale = {path: (directory, stat) for directory, name in self._stages()
                       for path, stat, _ in self._writes_in(directory, name)}

    def _stages(self) -> list[tuple[str, str]]:
        """(directory, name) of the workdir and, nested, of each stage directory."""
        dirs = [(self.workdir, ".")]
        if self.nested:
            dirs += [(e.path, e.name) for e in _scan(self.workdir) if e.is_dir()]
        return dirs

    def _writes_in(self, directory: str, name: str) -> list[tuple[str, tuple, tuple]]:
        """(path, (inode, ctime), key) of each write-like entry of a stage directory."""
        prefix = "" if name == "." else name + "/"
        found = []
        for entry in _scan(directory):
            if entry.name.endswith(STAGING_SUFFIXES):
                found.append((entry, ("model", prefix + entry.name.rsplit(".", 1)[0])))
        for entry in _scan(os.path.join(directory, "checkpoints")):
            if _is_tmp(entry.name):
                step = entry.name.split(".", 1)[0]
                found.append((entry, ("checkpoint", name, int(step) if step.isdigit() else -1)))
        for entry in _scan(os.path.join(directory, "lora")):
            if _is_tmp(entry.name):         # adapters written in place
                found.append((entry, ("model", prefix + "lora")))
        return [(entry.path, _stat(entry), key) for entry, key in found]

    def poll(self) -> tuple[set[tuple], set[tuple]]:
        """(milestones passed now, writes in progress now), this attempt's only."""
        milestones, writes = set(), set()
        for directory, name in self._stages():
            lock = _mtime_ns(os.path.join(directory, ".lock"))
            if lock is not None and lock >= self._since:
                milestones.add(("lock", name))
                if directory not in self._locked:
                    self._locked.add(directory)
                    self._refresh(directory)
            if os.path.exists(os.path.join(directory, "DONE")):
                milestones.add(("done", name))
            step = self._last_step(os.path.join(directory, "metrics.jsonl"))
            if step is not None:
                milestones.add(("metrics", name, step))
            if directory in self._locked:
                found = self._writes_in(directory, name)
                present = {path for path, _, _ in found}
                for path in [p for p, (d, _) in self._stale.items()
                             if d == directory and p not in present]:
                    del self._stale[path]         # removed: a new one by that name is new
                writes |= {key for path, stat, key in found
                           if not self._is_stale(path, stat, key)}
        return milestones, writes

    def _refresh(self, directory: str) -> None:
        """Note the leftovers' ctimes after the lock: the writability probes are over."""
        for path, stat, _ in self._writes_in(directory, "."):
            if path in self._stale and self._stale[path][1][0] == stat[0]:
                self._stale[path] = (directory, stat)

    def _is_stale(self, path: str, stat: tuple, key: tuple) -> bool:
        if path not in self._stale:
            return False
        old = self._stale[path][1]
        # orbax removes tmp leftovers when the checkpointer opens, long before its next save;
        # a changed ctime there is that removal, not a write.
        same = old[0] == stat[0] if key[0] == "checkpoint" else old == stat
        if not same:
            del self._stale[path]
        return same

    def _last_step(self, path: str) -> int | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if st.st_mtime_ns < self._since:
            return None
        cached = self._last_steps.get(path)
        if cached is None or cached[:2] != (st.st_size, st.st_mtime_ns):
            cached = (st.st_size, st.st_mtime_ns, _last_step(path))
            self._last_steps[path] = cached
        return cached[2]


def _is_tmp(name: str) -> bool:
    return "tmp" in name and not name.startswith(WRITE_PROBE)


def _stat(entry) -> tuple:
    try:
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return (None, None)
    return (st.st_ino, st.st_ctime_ns)


def _scan(directory: str) -> list:
    try:
        return list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _last_step(path: str) -> int | None:
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue      # a row being written
    return None


class Progress:
    """How far along the reference's milestones an attempt is: the index of the latest one it
    has passed (-1: none). Progress is monotone, so passing a milestone passes every earlier
    one: a run resumed at step 12 has passed the reference's rows up to 12."""

    def __init__(self, milestones: list[tuple]) -> None:
        self.index = {key: i for i, key in enumerate(milestones)}
        self.rows: dict[str, tuple[list[int], list[int]]] = {}
        for i, key in enumerate(milestones):
            if key[0] == "metrics":
                steps, indices = self.rows.setdefault(key[1], ([], []))
                steps.append(key[2])
                indices.append(i)

    def __call__(self, seen: set[tuple]) -> int:
        best = -1
        for key in seen:
            if key[0] == "metrics":
                steps, indices = self.rows.get(key[1], ([], []))
                at = bisect.bisect_right(steps, key[2])
                if at:
                    best = max(best, indices[at - 1])
            else:
                best = max(best, self.index.get(key, -1))
        return best


# --- the runs -----------------------------------------------------------------------------------

def _start(argv: list[str], log):
    # Its own process group, so the kill takes whatever it started along.
    return subprocess.Popen([sys.executable, "-m", "rlhf_jax.cli", *argv], env=cli_env(),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, text=True,
                            start_new_session=True)


def _kill(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(log, n: int = 3000) -> str:
    log.seek(0)
    return log.read()[-n:]


@contextlib.contextmanager
def _attempt(argv: list[str], watcher: Watcher):
    """Start ``argv`` (stderr to a file: a pipe nobody reads would fill and block it) and yield
    ``(process, log)``; whatever still runs at the end is killed."""
    with tempfile.TemporaryFile("w+") as log:
        watcher.begin()
        proc = _start(argv, log)
        try:
            yield proc, log
        finally:
            _kill(proc)


def _polls(proc, watcher: Watcher, log, deadline: float):
    """``(seconds since the start, milestones, writes)`` every ``POLL_S`` while ``proc`` runs."""
    began = time.time()
    while proc.poll() is None:
        assert time.time() < deadline, f"still running at the deadline:\n{_tail(log)}"
        milestones, writes = watcher.poll()
        yield time.time() - began, milestones, writes
        time.sleep(POLL_S)


@dataclasses.dataclass
class Reference:
    seconds: float
    milestones: list[tuple[float, tuple]]     # (seconds from the start, key), in order
    writes: list[tuple[float, tuple]]         # each write's first sighting


def reference_run(argv: list[str], workdir: str, *, nested: bool = False,
                  timeout: float = 400) -> Reference:
    """Run ``argv`` uninterrupted, noting when each milestone and write is first seen."""
    watcher = Watcher(workdir, nested)
    seen: dict[tuple, float] = {}
    writes: dict[tuple, float] = {}
    start = time.time()
    with _attempt(argv, watcher) as (proc, log):
        for now, milestones, in_progress in _polls(proc, watcher, log, start + timeout):
            for key in milestones:
                seen.setdefault(key, now)
            for key in in_progress:
                writes.setdefault(key, now)
        seconds = time.time() - start
        assert proc.returncode == 0, _tail(log)
    for key in watcher.poll()[0]:     # what the last poll missed (the final DONE)
        seen.setdefault(key, seconds)
    order = lambda items: sorted(((t, key) for key, t in items.items()), key=lambda e: e[0])
    return Reference(seconds, order(seen), order(writes))


@dataclasses.dataclass(frozen=True)
class Kill:
    """Either ``delay`` seconds after milestone ``after`` is passed (-1: after the start) and
    no later than the next one, or, with ``write``, as soon as that write is in progress (for
    a checkpoint: that step's or a later one's). ``at``: the reference second it stands for."""
    at: float
    after: int = -1
    delay: float = 0.0
    write: tuple | None = None


def kill_plan(reference: Reference, seed: int, *, moments: int, checkpoints: int = 1,
              models: int = 1) -> list[Kill]:
    """``moments`` kills uniform over the reference's wall time, ``checkpoints`` during
    checkpoint writes (not a stage's last one where it has more: a resume past it, after an
    earlier kill, would never write it again) and ``models`` during model writes, in the
    reference's order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    times = [t for t, _ in reference.milestones]
    plan = []
    for at in rng.uniform(0.0, reference.seconds, moments):
        after = bisect.bisect_right(times, at) - 1
        plan.append(Kill(float(at), after, float(at - (times[after] if after >= 0 else 0.0))))
    by_stage: dict[str, list] = {}
    for write in reference.writes:
        if write[1][0] == "checkpoint":
            by_stage.setdefault(write[1][1], []).append(write)
    for kind, n, writes in (
            ("checkpoint", checkpoints, [w for ws in by_stage.values() for w in ws[:-1] or ws]),
            ("model", models, [w for w in reference.writes if w[1][0] == "model"])):
        assert len(writes) >= n, f"the reference made {len(writes)} {kind} writes; {n} wanted"
        for i in rng.choice(len(writes), n, replace=False):
            plan.append(Kill(writes[i][0], write=writes[i][1]))
    return sorted(plan, key=lambda k: k.at)


@dataclasses.dataclass
class Report:
    kills: int = 0
    during_checkpoint: int = 0
    during_model: int = 0
    attempts: int = 0
    lock_takeovers: int = 0
    missed: int = 0           # planned kills the run outran (it completed first)
    seconds: float = 0.0
    log: list = dataclasses.field(default_factory=list)  # (attempt second, kill, writes going on)

    def line(self, stage: str) -> str:
        return (f"kill-anywhere {stage}: {self.kills} kills ({self.during_checkpoint} during a "
                f"checkpoint write, {self.during_model} during a model write, {self.missed} "
                f"missed), {self.attempts - 1} restarts, {self.lock_takeovers} stale locks "
                f"taken over, {self.seconds:.1f} s")


class _Trigger:
    """When one planned kill is due in an attempt."""

    def __init__(self, kill: Kill, progress: Progress) -> None:
        self.kill, self.progress = kill, progress
        self.passed_at: float | None = None

    def due(self, milestones: set[tuple], writes: set[tuple], elapsed: float) -> bool:
        kill = self.kill
        if kill.write is not None:
            return any(key[:2] == kill.write[:2] and (key[0] == "model" or key[2] >= kill.write[2])
                       for key in writes)
        reached = self.progress(milestones)
        if reached > kill.after:
            return True
        if self.passed_at is None and reached == kill.after:
            self.passed_at = elapsed
        return (kill.after < 0 and elapsed >= kill.delay) or (
            self.passed_at is not None and elapsed - self.passed_at >= kill.delay)


def _locks(workdir: str, nested: bool) -> list[str]:
    dirs = [workdir] + ([e.path for e in _scan(workdir) if e.is_dir()] if nested else [])
    return [os.path.join(d, ".lock") for d in dirs if os.path.exists(os.path.join(d, ".lock"))]


def run_with_kills(argv: list[str], workdir: str, reference: Reference, plan: list[Kill], *,
                   nested: bool = False, timeout: float = 600) -> Report:
    """Run ``argv`` once per planned kill, SIGKILLing it there, then to completion."""
    report = Report()
    watcher = Watcher(workdir, nested)
    progress = Progress([key for _, key in reference.milestones])
    start = time.time()
    for kill in [*plan, None]:
        locks = _locks(workdir, nested)
        trigger = _Trigger(kill, progress) if kill is not None else None
        killed = False
        with _attempt(argv, watcher) as (proc, log):
            for elapsed, milestones, writes in _polls(proc, watcher, log, start + timeout):
                if trigger is not None and trigger.due(milestones, writes, elapsed):
                    _kill(proc)
                    killed = True
                    report.log.append((round(elapsed, 2), kill, sorted(writes)))
                    report.kills += 1
                    report.during_checkpoint += any(k[0] == "checkpoint" for k in writes)
                    report.during_model += any(k[0] == "model" for k in writes)
                    break
            stderr = _tail(log, 10**7)
        report.attempts += 1
        report.lock_takeovers += stderr.count(LOCK_TAKEOVER)
        if killed:
            continue
        assert proc.returncode == 0, \
            f"attempt {report.attempts}, after {report.kills} kills:\n{stderr[-3000:]}"
        assert stderr.count(LOCK_TAKEOVER) >= len(locks), \
            f"{locks} left by killed attempts, not taken over:\n{stderr[-3000:]}"
        report.missed = len(plan) - report.kills
        break
    report.seconds = time.time() - start
    assert not _locks(workdir, nested), "the finished run left a workdir lock behind"
    return report


# --- what must be equal -------------------------------------------------------------------------

def metrics_rows(path: str) -> list[dict]:
    """The rows of a metrics file, every line of which must be whole (the reader would skip a
    torn one)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                raise AssertionError(f"{path}:{number}: not a whole row ({error}): {line!r}")
    return read_jsonl_metrics(path)


def assert_same_metrics(got_dir: str, want_dir: str) -> None:
    got = metrics_rows(os.path.join(got_dir, "metrics.jsonl"))
    want = metrics_rows(os.path.join(want_dir, "metrics.jsonl"))
    shape = lambda rows: [(r["step"], sorted(c)) for r, c in zip(rows, comparable(rows))]
    assert shape(got) == shape(want), f"{got_dir}/metrics.jsonl: its rows (step, keys) are not " \
        "the uninterrupted run's"
    assert comparable(got) == comparable(want), f"{got_dir}/metrics.jsonl: values differ"


def assert_same_outputs(got_dir: str, want_dir: str) -> list[str]:
    """The reference's model directories (model/, model_ema/, lora/) in the killed run's
    workdir, their params equal leaf by leaf and their other files byte by byte, and the same
    metrics rows (and samples); returns what was compared."""
    compared = []
    for name in ("model", "model_ema"):
        if os.path.exists(os.path.join(want_dir, name)):
            assert_same_tree(load_params(os.path.join(got_dir, name)),
                             load_params(os.path.join(want_dir, name)))
            assert_same_files(os.path.join(got_dir, name), os.path.join(want_dir, name))
            compared.append(name)
    if os.path.exists(os.path.join(want_dir, "lora")):
        adapters = lambda d: jax.device_get(
            ckpt_lib.load_pytree(os.path.join(d, "lora", "adapters")))
        assert_same_tree(adapters(got_dir), adapters(want_dir))
        assert_same_files(os.path.join(got_dir, "lora"), os.path.join(want_dir, "lora"))
        compared.append("lora")
    assert compared, f"{want_dir}: no model to compare"
    assert_same_metrics(got_dir, want_dir)
    if os.path.exists(os.path.join(want_dir, "samples.jsonl")):
        assert_same_samples(os.path.join(got_dir, "samples.jsonl"),
                            os.path.join(want_dir, "samples.jsonl"))
    return compared


def assert_same_files(got_dir: str, want_dir: str) -> None:
    """The same entries, and each file beside the params (config, extras, tokenizer) the same
    bytes."""
    assert sorted(os.listdir(got_dir)) == sorted(os.listdir(want_dir)), got_dir
    for name in os.listdir(want_dir):
        if os.path.isfile(os.path.join(want_dir, name)):
            read = lambda d: open(os.path.join(d, name), "rb").read()
            assert read(got_dir) == read(want_dir), os.path.join(got_dir, name)


def assert_same_samples(got_path: str, want_path: str) -> None:
    """A PPO samples table: each step's rows those of the reference, each step logged once.
    A resumed run also logs samples at its first iteration, so steps the reference did not log
    may be there too."""
    got, want = ({} for _ in range(2))
    for path, table in ((got_path, got), (want_path, want)):
        steps = []
        for row in metrics_rows(path):
            table.setdefault(row["step"], []).append(row)
            steps.append(row["step"])
        assert steps == sorted(steps), f"{path}: a step logged twice: {steps}"
    for step, rows in want.items():
        assert got.get(step) == rows, f"{got_path}: the samples of step {step} differ"


def leftovers(workdir: str) -> list[str]:
    """Staging directories beside the outputs and unfinished checkpoints a finished run left
    behind (there should be none)."""
    return sorted(os.path.join(root, name) for root, dirs, _ in os.walk(workdir)
                  for name in dirs if name.endswith(STAGING_SUFFIXES)
                  or (os.path.basename(root) == "checkpoints" and _is_tmp(name)))
