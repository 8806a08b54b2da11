"""The workdir lock: a live holder refuses a second run; a dead or silent one is taken over."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rlhf_jax import storage
from rlhf_jax.errors import UserError
from rlhf_jax.locking import LOCK_NAME, WorkdirLock


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("gcs_path")


def _write_holder(workdir, **fields):
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": "other",
              "started": time.time(), "heartbeat": time.time(), "lease_s": 120.0} | fields
    storage.write_text(storage.join(workdir, LOCK_NAME), json.dumps(holder))


def test_a_live_holder_refuses_a_second_run_naming_it(workdir):
    with WorkdirLock(workdir):
        assert storage.exists(storage.join(workdir, LOCK_NAME))
        with pytest.raises(UserError, match=rf"another run is using this workdir \(host "
                                            rf"{socket.gethostname()} pid {os.getpid()}") as info:
            WorkdirLock(workdir).acquire()
        assert "\n" not in str(info.value)
    assert not storage.exists(storage.join(workdir, LOCK_NAME))      # released
    with WorkdirLock(workdir):                                       # and free again
        pass


@pytest.mark.parametrize("fields, reason", [
    ({"pid": 2 ** 22 + 12345}, "is gone"),                            # same host, dead pid
    ({"host": "other-host", "heartbeat": time.time() - 1000}, "heartbeat is"),
])
def test_a_stale_lock_is_taken_over(workdir, caplog, fields, reason):
    _write_holder(workdir, **fields)
    with WorkdirLock(workdir) as lock:
        holder = json.loads(storage.read_text(lock.path))
        assert holder["token"] == lock.token
    assert reason in caplog.text


def test_a_recent_lock_of_another_host_holds(workdir):
    _write_holder(workdir, host="other-host", pid=1)
    with pytest.raises(UserError, match="host other-host pid 1"):
        WorkdirLock(workdir).acquire()


def test_a_damaged_lock_is_taken_over(workdir, caplog):
    storage.write_text(storage.join(workdir, LOCK_NAME), '{"host": "x", "pi')
    with WorkdirLock(workdir):
        pass
    assert "damaged" in caplog.text


def test_the_heartbeat_keeps_a_long_run_alive(tmp_path):
    with WorkdirLock(str(tmp_path), lease_s=0.4) as lock:
        first = json.loads(storage.read_text(lock.path))["heartbeat"]
        time.sleep(0.5)
        holder = json.loads(storage.read_text(lock.path))
        assert holder["heartbeat"] > first and lock.stale_reason(holder) == ""


def test_a_sigkilled_holder_is_taken_over(tmp_path):
    code = ("import sys, time; from rlhf_jax.locking import WorkdirLock; "
            "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with WorkdirLock(str(tmp_path)):
        pass
