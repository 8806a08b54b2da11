"""Multi-host runs: ``rlhf_jax.distributed`` and 2 processes x 4 devices == 1 process x 8 devices.

The equivalence test starts ``tests/multihost_worker.py`` three times at once: twice as the two
processes of one job (4 CPU devices each, gloo collectives over loopback) and once alone with 8
devices. Both runs train SFT, the RM and one PPO-ptx iteration through the stages' ``train``
functions and evaluate the result, on the same (1, 4, 2) mesh; every process saves what it saw
and the tests compare. Each launch has a deadline, so a hung collective fails instead of hanging.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multihost_worker as worker
from rlhf_jax import distributed
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import read_jsonl_metrics

from paths import TESTS, free_port
REPO = os.path.dirname(TESTS)

DEADLINE_S = 420
# Fewer LLVM passes: compiling is most of these runs' time, and both runs use the same flags.
WORKER_XLA_FLAGS = "--xla_backend_optimization_level=0"

# What the two runs may differ by: the same programs, but partitioned for a different device
# assignment, so float reductions may be ordered differently.
ATOL, RTOL = 2e-5, 2e-5
# Parameters the loss does not depend on get gradients of pure rounding noise, which Adam scales
# up to about lr per step, so the runs legitimately part there by up to lr x steps: the attention
# key bias (softmax is shift invariant), and in the RM the score head's bias and the final norm's
# bias (the ranking loss sees only reward differences), hence also the demonstration mean.
K_BIAS = "['layer_0']['attn']['k']['bias']"
GRADIENT_FREE_ATOL = {
    f"sft/params{K_BIAS}": 1e-3 * 3,                               # lr x steps
    f"rm/params{K_BIAS}": 3e-4 * 2,
    "rm/params['score_head']['bias']": 3e-4 * 2,
    "rm/params['final_norm']['bias']": 3e-4 * 2,
    "rm/norm/mean": 3e-4 * 2,
    f"policy/params{K_BIAS}": 3e-3 * 4,                            # 2 epochs x 2 minibatches
}


# --- distributed.initialize ----------------------------------------------------------------------

TIMEOUTS = {"initialization_timeout": 330, "heartbeat_timeout_seconds": 300,
            "shutdown_timeout_seconds": 300}
TPU_ENV = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
           "MEGASCALE_NUM_SLICES")


@pytest.fixture
def recorded(monkeypatch):
    """Calls to jax.distributed.initialize and jax.config.update, recorded instead of made."""
    calls = []
    for name in TPU_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize",
                        lambda *args, **kwargs: calls.append(("initialize", args, kwargs)))
    monkeypatch.setattr(jax.config, "update", lambda *args: calls.append(("config", args, {})))
    return calls


def test_initialize_without_flags_is_a_single_process(recorded):
    distributed.initialize()
    assert recorded == []
    assert not distributed.on_tpu_pod()


def test_initialize_explicit_uses_gloo_on_cpu(recorded, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    distributed.initialize("10.0.0.1:1234", 4, 3)
    assert recorded == [("config", ("jax_cpu_collectives_implementation", "gloo"), {}),
                        ("initialize", ("10.0.0.1:1234", 4, 3), TIMEOUTS)]


@pytest.mark.parametrize("env", [{"TPU_WORKER_HOSTNAMES": "t1v-a-w-0,t1v-a-w-1"},
                                 {"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"},
                                 {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080"}])
def test_initialize_auto_detects_a_tpu_pod(recorded, monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    distributed.initialize()
    assert recorded == [("initialize", (), TIMEOUTS)]


def test_single_host_tpu_vm_is_not_a_pod(recorded, monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    distributed.initialize()
    assert recorded == []


@pytest.mark.parametrize("args, message", [
    (("h:1", None, None), "--num_processes, --process_id"),
    ((None, 2, 0), "--coordinator_address"),
    (("h:1", 2, None), "--process_id"),
    (("h", 2, 0), "HOST:PORT"),
    (("h:1", 0, 0), "at least 1"),
    (("h:1", 2, 2), "0 .. 1"),
])
def test_initialize_rejects_incomplete_or_bad_flags(recorded, args, message):
    with pytest.raises(ConfigError, match=message) as info:
        distributed.initialize(*args)
    assert "\n" not in str(info.value)
    assert recorded == []


def test_cli_flags_round_trip(recorded, monkeypatch):
    import argparse
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    distributed.initialize_from_args(parser.parse_args([]))
    assert recorded == []
    distributed.initialize_from_args(parser.parse_args(
        ["--coordinator_address", "h:5", "--num_processes", "2", "--process_id", "1",
         "--distributed_timeout", "20"]))
    assert recorded[-1] == ("initialize", ("h:5", 2, 1), {
        "initialization_timeout": 50, "heartbeat_timeout_seconds": 20,
        "shutdown_timeout_seconds": 20})


def test_fetch_single_process():
    x = jax.device_put(np.arange(8.0), jax.sharding.NamedSharding(
        jax.make_mesh((8,), ("d",)), jax.sharding.PartitionSpec("d")))
    out = distributed.fetch({"x": x, "n": 3})
    np.testing.assert_array_equal(out["x"], np.arange(8.0))
    assert distributed.is_main()


# --- 2 processes x 4 devices vs 1 process x 8 devices ----------------------------------------------


def _launch(root, name: str, devices: int, *multi: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=WORKER_XLA_FLAGS,
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = str(root / f"{name}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(TESTS, "multihost_worker.py"), "--data", str(root / "data"),
             "--workdir", str(root / name.split("_")[0]), "--devices", str(devices), *multi],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


def _tail(path: str, n: int = 40) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    worker.write_data(str(root / "data"))
    address = f"127.0.0.1:{free_port()}"
    launched = {"single_0": _launch(root, "single_0", 8)}
    for i in range(2):
        launched[f"multi_{i}"] = _launch(root, f"multi_{i}", 4, "--coordinator_address", address,
                                         "--num_processes", "2", "--process_id", str(i))
    start = time.time()
    failed = []
    for name, (proc, log_path) in launched.items():
        try:
            proc.wait(timeout=max(1.0, DEADLINE_S - (time.time() - start)))
        except subprocess.TimeoutExpired:
            failed.append(f"{name}: no result after {DEADLINE_S} s (hung collective?)")
        else:
            if proc.returncode:
                failed.append(f"{name}: exit code {proc.returncode}")
    if failed:
        for proc, _ in launched.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        logs = "\n".join(f"--- {name} ---\n{_tail(path)}" for name, (_, path) in launched.items())
        pytest.fail("; ".join(failed) + "\n" + logs)
    print(f"\nmultihost: 3 workers finished in {time.time() - start:.1f} s")
    load = lambda name: dict(np.load(root / name.split("_")[0] / f"results_{name[-1]}.npz"))
    return {"root": root, "single": load("single_0"), "multi": load("multi_0"),
            "multi_1": load("multi_1")}


def _compare(runs, prefix: str, exact: tuple[str, ...] = ()) -> dict[str, float]:
    """Assert process 0 of the 2-process run matches the 1-process run on every ``prefix`` key;
    return the max |difference| per group of keys (and print them)."""
    ref, got = runs["single"], runs["multi"]
    keys = sorted(k for k in ref if k.startswith(prefix))
    assert keys and keys == sorted(k for k in got if k.startswith(prefix)), (prefix, keys)
    worst: dict[str, float] = {}
    for key in keys:
        a, b = np.asarray(ref[key]), np.asarray(got[key])
        assert a.shape == b.shape, key
        if a.dtype.kind in "USO" or key in exact:
            np.testing.assert_array_equal(b, a, err_msg=key)
            diff = 0.0
        else:
            atol, rtol = (GRADIENT_FREE_ATOL[key], 0.0) if key in GRADIENT_FREE_ATOL else (ATOL, RTOL)
            np.testing.assert_allclose(b, a, atol=atol, rtol=rtol, err_msg=key)
            diff = float(np.nanmax(np.abs(b.astype(np.float64) - a.astype(np.float64)),
                                   initial=0.0))
        group = key.split("/")[1]
        group = "params" if group.startswith("params") else group
        if key in GRADIENT_FREE_ATOL:
            group += " (gradient-free)"
        worst[group] = max(worst.get(group, 0.0), diff)
    print(f"\n2 processes x 4 vs 1 process x 8, {prefix} max |diff|: "
          + ", ".join(f"{g} {d:.2e}" for g, d in sorted(worst.items())))
    return worst


def test_sft_two_processes_match_one(runs):
    worst = _compare(runs, "sft/")
    assert len(runs["single"]["sft/metrics/train/loss"]) == 3
    assert set(worst) >= {"params", "metrics", "final"}


def test_rm_two_processes_match_one(runs):
    worst = _compare(runs, "rm/")
    assert set(worst) >= {"params", "metrics", "norm"}
    assert len(runs["single"]["rm/metrics/train/loss"]) == 2


def test_ppo_ptx_iteration_two_processes_match_one(runs):
    worst = _compare(runs, "ppo/", exact=("ppo/metrics/episodes",))
    _compare(runs, "policy/")
    metrics = runs["multi"]
    assert math.isfinite(float(metrics["ppo/metrics/ptx/loss"][0]))
    assert float(metrics["ppo/metrics/policy/approxkl_avg"][0]) > 0      # the update did train
    assert "metrics" in worst


def test_eval_two_processes_match_one(runs):
    _compare(runs, "eval/", exact=("eval/sequences", "eval/response_mask"))
    assert len(runs["single"]["eval/texts"]) == worker.EVAL_PROMPTS


def test_every_process_gets_the_same_results(runs):
    """Process 1 sees exactly what process 0 sees: gathered params, eval outputs, returns."""
    p0, p1 = runs["multi"], runs["multi_1"]
    shared = sorted(set(p0) & set(p1))
    assert any(k.startswith("eval/") for k in shared) and any("params" in k for k in shared)
    assert not any("/metrics/" in k for k in p1)                 # only process 0 reads logs
    for key in shared:
        np.testing.assert_array_equal(p1[key], p0[key], err_msg=key)
    # shard_batch refuses a mesh whose batch axes do not split batches across the processes.
    assert p0["checks/tensor_across_hosts_refused"] and p1["checks/tensor_across_hosts_refused"]


def test_logs_and_tables_written_once(runs):
    multi = runs["root"] / "multi"
    assert len(read_jsonl_metrics(str(multi / "sft" / "metrics.jsonl"))) == 3 + 1   # + valid
    assert len(read_jsonl_metrics(str(multi / "rm" / "metrics.jsonl"))) == 2
    assert len(read_jsonl_metrics(str(multi / "ppo" / "metrics.jsonl"))) == 1
    samples = read_jsonl_metrics(str(multi / "ppo" / "samples.jsonl"))
    single = read_jsonl_metrics(str(runs["root"] / "single" / "ppo" / "samples.jsonl"))
    assert len(samples) == 4
    assert [(s["prompt"], s["response"]) for s in samples] == \
        [(s["prompt"], s["response"]) for s in single]
