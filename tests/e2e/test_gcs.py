"""A run whose every input and output lives in a GCS bucket (an emulator on loopback), on
2 processes x 4 devices, SIGKILLed once after a committed PPO checkpoint and resumed bit-exactly.

Launch 1 trains SFT and the RM and one PPO-ptx iteration, then both processes SIGKILL themselves
once checkpoint 1 is committed. Launch 2 (the same command) skips SFT and the RM by their DONE
markers, resumes PPO from checkpoint 1, and then trains the same PPO stage again from scratch,
uninterrupted, as the reference. The resumed policy must equal the reference bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import multihost_worker
from paths import TESTS, free_port
from rlhf_jax import storage

REPO = os.path.dirname(TESTS)
DEADLINE_S = 240
# XLA:CPU's MLIR fusion emitters take about 2/3 of each step's compile time at these sizes (PPO's
# five steps: 9.4 s with them, 3.4 s without; SFT's and the RM's train steps ~1.9 s -> ~0.9 s).
# Both launches and the reference compile with the same flags, so they still agree bit for bit.
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def _launch(root, tag: str, data: str, workdir: str, env: dict, *extra: str) -> list:
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, **env, JAX_PLATFORMS="cpu",
               XLA_FLAGS=XLA_FLAGS, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=REPO + os.pathsep + TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS_EXTRA", None)
    procs = []
    for i in range(2):
        log_path = str(root / f"{tag}_{i}.log")
        with open(log_path, "w") as log:
            procs.append((subprocess.Popen(
                [sys.executable, os.path.join(TESTS, "gcs_worker.py"), "--data", data,
                 "--workdir", workdir, "--coordinator_address", address, "--num_processes", "2",
                 "--process_id", str(i), *extra],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log_path))
    start = time.time()
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(1.0, DEADLINE_S - (time.time() - start)))
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
    return [(proc.returncode, open(path, errors="replace").read()) for proc, path in procs]


def _explain(results) -> str:
    return "\n".join(f"--- process {i} (exit {rc}) ---\n{text[-3000:]}"
                     for i, (rc, text) in enumerate(results))


@pytest.mark.smoke     # the README's quick command runs this one end-to-end test
def test_gcs_workdir_two_processes_killed_and_resumed_bit_exactly(gcs_emulator, gcs_path,
                                                                   tmp_path):
    t0 = time.time()
    local = tmp_path / "data"
    multihost_worker.write_data(str(local))
    data, workdir = storage.join(gcs_path, "data"), storage.join(gcs_path, "run")
    storage.upload(str(local), data)
    start = time.time()
    print(f"\ngcs: data written and uploaded in {start - t0:.1f} s")

    killed = _launch(tmp_path, "killed", data, workdir, gcs_emulator, "--kill_after", "1")
    assert [rc for rc, _ in killed] == [-9, -9], _explain(killed)
    assert all("killed after checkpoint 1" in text for _, text in killed), _explain(killed)
    assert storage.exists(storage.join(workdir, "sft", "DONE"))
    assert storage.exists(storage.join(workdir, "rm", "DONE"))
    assert not storage.exists(storage.join(workdir, "ppo", "DONE"))
    assert "1" in storage.listdir(storage.join(workdir, "ppo", "checkpoints"))
    after_kill = time.time()

    resumed = _launch(tmp_path, "resumed", data, workdir, gcs_emulator)
    assert [rc for rc, _ in resumed] == [0, 0], _explain(resumed)
    print(f"\ngcs: killed run {after_kill - start:.1f} s, resumed + reference "
          f"{time.time() - after_kill:.1f} s")
    assert not any(name.startswith("gs:") for name in os.listdir(REPO))   # nothing went local

    results = [json.loads(storage.read_text(storage.join(workdir, f"results_{i}.json")))
               for i in range(2)]
    main, other = results
    assert main["resumed/digest"] == main["reference/digest"]              # bit-exact
    assert other["resumed/digest"] == main["resumed/digest"]
    assert set(main["timings"]) == {"sft", "rm", "ppo"}                    # all via markers
    assert main["resumed/metrics"] == main["reference/metrics"]            # every iteration once
    assert [row["step"] for row in main["resumed/metrics"]] == [1, 2]
    assert "resumed/metrics" not in other                                 # only process 0 logs

    # One writer per run: process 0 logs at INFO, the other only warnings and errors.
    main_log, other_log = (text for _, text in resumed)
    assert "resumed from gs://" in main_log and "stage sft         already done" in main_log
    assert not [line for line in other_log.splitlines() if " INFO " in line or
                line.startswith("INFO")], other_log[-2000:]
