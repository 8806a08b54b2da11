"""One run per workdir: a lock file that a second run on a live workdir cannot take.

``WORKDIR/.lock`` holds the holder's host, pid, start time and a heartbeat the holder refreshes
every ``lease_s / 4`` seconds from a daemon thread. A second run fails at once with a one-line
:class:`~rlhf_jax.errors.UserError` naming the holder. A lock is stale, and taken over with a
warning, when its process is gone (same host, pid not alive) or its heartbeat is older than
``lease_s`` (another host: the holder was killed or lost its machine).

Creating the file is exclusive: ``O_CREAT | O_EXCL`` locally, an ``ifGenerationMatch=0``
precondition on GCS (gcsfs's ``"xb"`` mode). A stale local lock is first renamed aside (only one
taker's rename succeeds), then created again exclusively. Object stores have no rename, so two
runs taking over the same stale GCS lock in the same instant could both succeed: the lease is
documented, not airtight there.

Multi-host: process 0 takes and refreshes the lock; every process learns the outcome, so all
of them stop with the same one-line error.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from rlhf_jax import errors, storage

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
DEFAULT_LEASE_S = 120.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # alive, owned by someone else
        return True
    return True


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when this call created it."""
    if storage.is_url(path):
        import fsspec
        fs, _, (target,) = fsspec.get_fs_token_paths(path)
        # GCS refuses the "xb" write of an existing object (HTTP 412); emulators may not, and the
        # check below keeps them right for one writer at a time.
        fs.invalidate_cache(target)     # another process may have created it since we last looked
        if fs.exists(target):
            return False
        try:
            with fs.open(target, "xb") as f:
                f.write(data)
        except (FileExistsError, OSError) as error:
            if isinstance(error, FileExistsError) or "412" in str(error):
                return False
            raise
        return True
    storage.makedirs(os.path.dirname(path))
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def describe(holder: dict) -> str:
    age = time.time() - float(holder.get("heartbeat", holder.get("started", 0)))
    return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('started', 0))))}"
            f", last heartbeat {age:.0f} s ago")


class WorkdirLock:
    """Context manager holding ``WORKDIR/.lock`` for the life of a run (see the module doc)."""

    def __init__(self, workdir: str, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.path = storage.join(storage.absolute(workdir), LOCK_NAME)
        self.lease_s = float(lease_s)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _record(self, started: float) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "started": started, "heartbeat": time.time(),
                           "lease_s": self.lease_s}).encode()

    def _read(self) -> dict | None:
        try:
            holder = json.loads(storage.read_text(self.path))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            # A lock cut short by a kill while it was written: its writer died before it ran.
            return {}
        return holder if isinstance(holder, dict) else {}

    def stale_reason(self, holder: dict) -> str:
        """Why ``holder`` no longer holds the workdir ("" when it still does)."""
        if not holder:
            return "the lock file is damaged (its writer was killed while writing it)"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"]):
            return f"process {holder['pid']} on this host is gone"
        age = time.time() - float(holder.get("heartbeat", 0))
        lease = float(holder.get("lease_s", self.lease_s))
        if age > lease:
            return f"its heartbeat is {age:.0f} s old (lease {lease:.0f} s)"
        return ""

    def _take_over(self) -> None:
        if storage.is_url(self.path):
            storage.remove(self.path)
            return
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, aside)      # only one taker can move a given file
        except FileNotFoundError:
            return
        os.remove(aside)

    def acquire(self) -> None:
        started = time.time()
        for _ in range(3):
            if _create_exclusive(self.path, self._record(started)):
                break
            holder = self._read()
            if holder is None:
                continue
            reason = self.stale_reason(holder)
            if not reason:
                raise errors.UserError(
                    f"{storage.dirname(self.path)}: another run is using this workdir "
                    f"({describe(holder)}); wait for it, stop it, or use another --workdir")
            log.warning("%s: taking over a stale lock (%s)", self.path, reason)
            self._take_over()
        else:
            raise errors.UserError(f"{self.path}: could not take the workdir lock (other runs "
                                   "kept taking it); check what else uses this workdir")
        self.held = True
        self._started = started
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                holder = self._read()
                if holder and holder.get("token") != self.token:
                    log.error("%s: another run took over this workdir's lock (%s)", self.path,
                              describe(holder))
                    return
                storage.write_bytes(self.path, self._record(self._started))
            except OSError as error:   # transient storage trouble: the next beat retries
                log.warning("%s: could not refresh the lock (%s)", self.path, error)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder and holder.get("token") == self.token:
            storage.remove(self.path)
        self.held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


class RunLock:
    """:class:`WorkdirLock` for a (possibly multi-host) run: process 0 holds it, and every process
    raises the same UserError when it cannot be taken."""

    def __init__(self, workdir: str, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.lock = WorkdirLock(workdir, lease_s=lease_s)

    def __enter__(self) -> RunLock:
        import jax
        message = ""
        if jax.process_index() == 0:
            try:
                self.lock.acquire()
            except errors.UserError as error:
                message = str(error)
        if jax.process_count() > 1:
            message = _broadcast_text(message)
        if message:
            raise errors.UserError(message)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.lock.release()


def _broadcast_text(text: str, size: int = 512) -> str:
    """Process 0's ``text`` on every process (truncated to ``size`` UTF-8 bytes)."""
    import numpy as np
    from jax.experimental import multihost_utils
    raw = np.zeros(size, np.uint8)
    data = text.encode()[:size]
    raw[:len(data)] = np.frombuffer(data, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return bytes(out[out > 0].astype(np.uint8)).decode(errors="replace")
