"""A multi-host job that cannot form ends within --distributed_timeout, with one line and exit 2,
on every live process (instead of JAX's C++ abort after five minutes)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from paths import TESTS, free_port

REPO = os.path.dirname(TESTS)
TIMEOUT_S = 3



@pytest.mark.parametrize("process_id, alone", [
    (0, "a peer that never starts"),
    (1, "an unreachable coordinator"),
])
def test_a_job_that_cannot_form_ends_in_one_line(process_id, alone):
    code = ("import sys; from rlhf_jax import distributed; "
            "distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), timeout_s=float(sys.argv[3]));"
            "print('joined')")
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", code, f"127.0.0.1:{free_port()}", str(process_id), str(TIMEOUT_S)],
        env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO, capture_output=True, text=True,
        timeout=60)
    elapsed = time.time() - start
    assert done.returncode == 2, (alone, done.stderr[-2000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"rlhf-jax: error: process {process_id} of 2 could not form "
                                "the job"), done.stderr[-2000:]
    assert "--distributed_timeout=3 s" in lines[-1] and "joined" not in done.stdout
    assert elapsed < TIMEOUT_S + 20, elapsed           # interpreter and jax import included
    assert "Check failure stack trace" not in done.stderr
