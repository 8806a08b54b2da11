"""How a stage runs on the machine: logging, mesh, compilation cache, compile-ahead, side thread,
step keys.

It knows nothing of models, data or checkpoints, only ``sharding`` and ``storage`` below it, so
the stages, the CLI, ``profile`` and ``step_analysis`` share it without importing a stage.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from rlhf_jax import storage
from rlhf_jax.sharding import make_mesh

log = logging.getLogger(__name__)


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr at ``level`` (a logging level name). In a multi-process job only process 0
    logs below WARNING: the others would repeat its every line. Call it again once
    ``jax.distributed`` is initialized; before that the process index is unknown, and asking
    for it would start the backend too early."""
    # transformers announces on import that it found no PyTorch (this package needs none): its
    # "advisory" warnings are off unless the user set the variable.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # force: a library imported earlier (absl, orbax) may have installed a root handler already,
    # which would turn basicConfig into a no-op and hide every INFO line.
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets", "fsspec", "gcsfs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if jax.distributed.is_initialized() and jax.process_index() != 0:
        root = logging.getLogger()
        root.setLevel(max(root.level, logging.WARNING))


def enable_compilation_cache(directory: str) -> None:
    """Persist compiled executables under ``directory`` (JAX's persistent compilation cache).

    Stages that compile the same step (SFT and SFT-ptx, PPO and PPO-ptx, every sampler) and a
    re-run of a pipeline then load executables instead of compiling them again.
    """
    storage.makedirs(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# XLA:CPU spends most of a step's compile time in LLVM; at -O1 instead of -O2 the PPO steps of
# the speed benchmark compiled 15-20% faster (experience: 2.4 s -> 1.3 s) and ran within noise
# of -O2 (bench/ppo_speed.py workload, 3 alternating pairs on a 2-core EPYC).
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def compile_ahead(program: Any, names: Sequence[str]) -> dict[str, Any]:
    """Start lowering and compiling ``program``'s steps ``names`` on worker threads.

    Returns ``{name: Future}`` of ``jax.stages.Compiled`` executables. The stage meanwhile
    restores weights and reads data, and XLA compiles the steps side by side (it releases the
    GIL), instead of one after the other inside the first iteration. A loop that calls these
    executables cannot recompile: a changed shape or sharding is an error, not a silent compile.
    """
    import concurrent.futures

    options = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="compile")
    futures = {name: pool.submit(lambda step: step.lower().compile(compiler_options=options),
                                 program.steps[name]) for name in names}
    pool.shutdown(wait=False)
    return futures


class SideThread:
    """Runs jobs on one extra thread where that buys compute, else inline at ``submit``.

    On a CPU backend JAX runs an executable on the calling thread, so two independent programs
    called from one thread use one core at a time; from two threads they use two. Accelerators
    queue programs asynchronously anyway, and a multi-process run must launch its programs in
    the same order on every process, so there (and when ``enabled`` is False) a job runs at once.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = jax.default_backend() == "cpu" and jax.process_count() == 1
        self._pool = None
        if enabled:
            import concurrent.futures
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="side")

    def submit(self, fn: Callable, *args: Any):
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        import concurrent.futures
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(fn(*args))
        return done

    def __enter__(self) -> SideThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def setup_mesh(cfg: Any) -> Mesh:
    mesh = make_mesh(tuple(cfg.mesh.shape))
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
             jax.process_count())
    return mesh


def step_rng(seed: int, step: int) -> jax.Array:
    """The dropout/sampling key of a step: a pure function of (seed, step), so resume is exact."""
    return jax.random.fold_in(jax.random.key(seed), step)
