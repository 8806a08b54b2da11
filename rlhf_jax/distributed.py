"""Multi-host runs on JAX's multi-controller runtime: every host runs the same program.

Each host starts the same command with the same flags (and the same config and data paths,
which every host must be able to read). ``initialize`` joins the processes into one job before
any JAX device is touched; from then on ``jax.devices()`` lists every device of the job, the
mesh spans all of them, each process reads only its own slice of every batch
(``rlhf_jax.data.BatchIterator``), and process 0 alone writes logs, metadata and sample tables.
Checkpoints are written by all processes together, so ``--workdir`` must be a directory every
host sees (a shared filesystem or a ``gs://`` bucket).

Cloud TPU pod slice (detected from the environment the TPU VMs set, e.g. ``TPU_WORKER_HOSTNAMES``
listing several hosts, or ``MEGASCALE_*`` for multislice): no extra flags::

    gcloud compute tpus tpu-vm ssh NAME --worker=all --command \\
        "rlhf-jax ppo --config experiments/tiny_ppo.py --workdir gs://bucket/runs/ppo"

Any other cluster (GPU nodes, CPU hosts): name process 0's address and a free port, the number of
processes and each process's index; everything else is identical on every host::

    # on host I of N (I = 0 .. N-1)
    rlhf-jax sft --config experiments/tiny_sft.py --workdir /shared/runs/sft \\
        --coordinator_address host0:12345 --num_processes N --process_id I

On CPU hosts the cross-process collectives go through gloo. Without any of this, a run is a
single process using the local devices.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any

import jax
import numpy as np

from rlhf_jax.errors import EXIT_USER_ERROR, ConfigError

log = logging.getLogger(__name__)

# Set on Cloud TPU VMs: the pod's hosts (comma separated) and, for multislice, the slices'
# coordinator. One listed host means a single-host TPU VM, which needs no coordination.
_TPU_HOST_LISTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
_MEGASCALE_VARS = ("MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES")


DEFAULT_TIMEOUT_S = 300


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join this process to a multi-host job; call before anything touches a JAX device.

    * all three given: the explicit form for any cluster (``HOST:PORT`` of process 0, the
      number of processes, this process's index in ``0 .. num_processes - 1``);
    * none given on a Cloud TPU pod slice: ``jax.distributed.initialize()`` finds the rest;
    * none given elsewhere: nothing to do, a single process.

    Giving only some of the three is a :class:`~rlhf_jax.errors.ConfigError`. Calling again once
    the job is initialized does nothing.

    ``timeout_s`` bounds the failures of a job that cannot form or loses a member: joining
    (an unreachable coordinator, a peer that never starts) ends this process after ``timeout_s``
    with one line on stderr and exit code 2; a peer that dies later is noticed by the runtime's
    heartbeat within ``timeout_s`` (the runtime then aborts the process: that message is JAX's).
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    if len(missing) == len(given):
        if not on_tpu_pod():
            return
        if jax.distributed.is_initialized():
            return
        log.info("Cloud TPU pod slice detected: initializing jax.distributed from the environment")
        with _deadline(timeout_s, "the TPU pod's processes did not all join"):
            jax.distributed.initialize(**_timeouts(timeout_s))
        return
    if missing:
        have = [name for name in given if name not in missing]
        raise ConfigError(
            f"multi-host flags go together: got --{', --'.join(have)} but not "
            f"--{', --'.join(missing)} (give all three on every host, or none on a Cloud TPU pod)")
    address, n, index = _checked(coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        return
    if _cpu_platform():
        # Cross-process collectives on the CPU backend need an implementation; older JAX
        # releases default to none, and it only takes effect if set before initialize.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("joining a %d-process job as process %d (coordinator %s)", n, index, address)
    with _deadline(timeout_s, f"process {index} of {n} could not form the job with coordinator "
                              f"{address} (is process 0 running there, and every other process "
                              "started with the same flags?)"):
        jax.distributed.initialize(address, n, index, **_timeouts(timeout_s))


def _timeouts(timeout_s: float) -> dict[str, int]:
    # JAX's own join deadline is set past ours: when it fires, its C++ client aborts the process
    # with a stack trace, where ours exits with one line.
    seconds = max(1, int(timeout_s))
    return {"initialization_timeout": seconds + 30, "heartbeat_timeout_seconds": seconds,
            "shutdown_timeout_seconds": seconds}


class _deadline:
    """Exit the process (code 2, one line on stderr) unless the block finishes in ``seconds``.

    A watchdog thread, not an exception: the blocked call is inside JAX's C++ runtime, which a
    Python exception cannot interrupt."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = float(seconds), what
        self._done = threading.Event()

    def _watch(self) -> None:
        if not self._done.wait(self.seconds):
            sys.stderr.write(f"rlhf-jax: error: {self.what}: no answer within "
                             f"--distributed_timeout={self.seconds:g} s\n")
            sys.stderr.flush()
            os._exit(EXIT_USER_ERROR)

    def __enter__(self) -> None:
        threading.Thread(target=self._watch, name="distributed-deadline", daemon=True).start()

    def __exit__(self, *exc_info: Any) -> None:
        self._done.set()


def _checked(address: Any, num_processes: Any, process_id: Any) -> tuple[str, int, int]:
    address = str(address)
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--coordinator_address={address!r}: expected HOST:PORT "
                          "(process 0's address and a free port)")
    try:
        n, index = int(num_processes), int(process_id)
    except (TypeError, ValueError):
        raise ConfigError(f"--num_processes={num_processes!r} and --process_id={process_id!r} "
                          "must be integers") from None
    if n < 1:
        raise ConfigError(f"--num_processes={n}: expected at least 1")
    if not 0 <= index < n:
        raise ConfigError(f"--process_id={index}: expected 0 .. {n - 1} (--num_processes={n})")
    return address, n, index


def on_tpu_pod() -> bool:
    """Whether the environment is a multi-host Cloud TPU slice (or a multislice job)."""
    for name in _TPU_HOST_LISTS:
        hosts = [h for h in os.environ.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return True
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    try:
        return int(os.environ.get("MEGASCALE_NUM_SLICES", "1")) > 1
    except ValueError:
        return False


def _cpu_platform() -> bool:
    """Whether JAX will (or may) run on the CPU backend. Read from the configuration, not the
    devices: initialize must come before any backend exists."""
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return not platforms or "cpu" in platforms.lower().split(",")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The three multi-host flags, for a command-line parser (see the module docstring)."""
    group = parser.add_argument_group(
        "multi-host", "same command on every host; not needed on a single host or a Cloud TPU pod")
    group.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                       help="process 0's address and a free port")
    group.add_argument("--num_processes", type=int, default=None, metavar="N",
                       help="number of processes in the job")
    group.add_argument("--process_id", type=int, default=None, metavar="I",
                       help="this process's index, 0 .. N-1")
    group.add_argument("--distributed_timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       metavar="S", help="seconds to wait for every process to join, and for "
                       "the runtime to notice a process that died (default %(default)g); past "
                       "it a process exits with one line and code 2")


def initialize_from_args(args: argparse.Namespace) -> None:
    """``initialize`` with the flags ``add_arguments`` defined (absent ones count as not given)."""
    initialize(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
               getattr(args, "process_id", None),
               getattr(args, "distributed_timeout", DEFAULT_TIMEOUT_S))


def is_main() -> bool:
    """True on process 0, the one that writes logs, metadata and sample tables."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def on_main(write: Any, name: str) -> None:
    """Call ``write()`` on process 0 alone (one writer per file of a shared workdir), then wait
    for every process, so the file is there wherever it is read next."""
    if is_main():
        write()
    barrier(name)


# Long enough for process 0 to compile the largest step it shares (see ``publish``).
RECEIVE_TIMEOUT_S = 3600


def _key_value_store() -> Any:
    # The coordination service's key-value store, which JAX itself uses to hand a compiled
    # binary from one host to the others (jax_share_binary_between_hosts).
    from jax._src import distributed as jax_distributed
    return jax_distributed.global_state.client


def publish(key: str, data: bytes) -> None:
    """Process 0 hands ``data`` to every process that calls ``receive(key)``, whenever it does:
    no collective, so processes may be at different points, on any thread."""
    _key_value_store().key_value_set_bytes(f"rlhf_jax/{key}", data, allow_overwrite=True)


def receive(key: str, timeout_s: float = RECEIVE_TIMEOUT_S) -> bytes:
    """What process 0 ``publish``ed under ``key``, waiting for it up to ``timeout_s``."""
    return _key_value_store().blocking_key_value_get_bytes(f"rlhf_jax/{key}",
                                                           int(timeout_s * 1000))


def fetch(tree: Any) -> Any:
    """The global values of a pytree of (possibly multi-host) arrays, as numpy, on every process.

    A batch-sharded array of a multi-host job spans devices this process cannot read, so
    ``jax.device_get`` fails on it; such leaves are all-gathered. That is a collective: every
    process must call ``fetch`` with the same tree. Single-process values are fetched as usual.
    """
    def needs_gather(x: Any) -> bool:
        return (isinstance(x, jax.Array) and not x.is_fully_addressable
                and not x.is_fully_replicated)

    leaves, treedef = jax.tree.flatten(tree)
    if not any(needs_gather(x) for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    out = [multihost_utils.process_allgather(x, tiled=True) if needs_gather(x)
           else np.asarray(jax.device_get(x)) for x in leaves]
    return jax.tree.unflatten(treedef, out)
