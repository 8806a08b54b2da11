"""How a stage runs on the machine: logging, mesh, compilation cache, compile-ahead, side thread,
step keys.

It knows nothing of models, data or checkpoints, only ``sharding`` and ``storage`` below it, so
the stages, the CLI, ``profile`` and ``step_analysis`` share it without importing a stage.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
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


def cpu_compiler_options() -> dict[str, Any] | None:
    """``CPU_COMPILER_OPTIONS``, unless ``XLA_FLAGS`` sets the optimization level: the user's
    flag wins (per-compile options would override it)."""
    if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return None
    return dict(CPU_COMPILER_OPTIONS)


def compile_ahead(program: Any, names: Sequence[str]) -> dict[str, Any]:
    """Start lowering and compiling ``program``'s steps ``names`` on worker threads.

    Returns ``{name: Future}`` of ``jax.stages.Compiled`` executables. The stage meanwhile
    restores weights and reads data, and XLA compiles the steps side by side (it releases the
    GIL), instead of one after the other inside the first iteration. A loop that calls these
    executables cannot recompile: a changed shape or sharding is an error, not a silent compile.
    A step this process compiled before (the same stage run again, PPO's steps in PPO-ptx) is
    reused, and a multi-process CPU job compiles each step once (see ``compiled_step``).
    """
    import concurrent.futures

    options = cpu_compiler_options() if jax.default_backend() == "cpu" else None
    devices = tuple(d.id for d in program.mesh.devices.flat) if hasattr(program, "mesh") else ()
    pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="compile")
    futures = {name: pool.submit(compiled_step, program.steps[name], options, devices)
               for name in names}
    pool.shutdown(wait=False)
    return futures


# Executables this process compiled, by what they compile (most recent last): a process that
# runs a stage twice (a test's reference run, PPO then PPO-ptx in one pipeline) compiles once.
_COMPILED: collections.OrderedDict[str, Any] = collections.OrderedDict()
_COMPILED_LOCK = threading.Lock()
_COMPILED_KEEP = 32


def compiled_step(step: Any, options: dict | None, devices: Sequence[int] = ()) -> Any:
    """``step.lower().compile(options)``, or the executable this process already compiled from
    the same lowering, or (a multi-process CPU job) the one process 0 compiled.

    JAX's persistent cache serves only process 0 of a multi-process CPU job: each process's
    topology fingerprint enters the cache key and only process 0 writes entries. The others
    would compile every step in every run, on the same cores, while process 0 waits for them
    at the first collective. There process 0 compiles (or loads) each step and hands the
    executable to the others. On accelerators the keys agree across hosts and JAX's cache is
    enough.
    """
    import hashlib
    import json
    lowered = step.lower()
    text = lowered.as_text() if hasattr(lowered, "as_text") else None
    if text is None:        # not a jax.stages.Lowered: nothing to key it by
        return lowered.compile(compiler_options=options)
    key = hashlib.sha256("\0".join([
        jax.__version__, os.environ.get("XLA_FLAGS", ""), json.dumps(options, sort_keys=True),
        repr(tuple(devices)), text]).encode()).hexdigest()
    with _COMPILED_LOCK:
        if key in _COMPILED:
            _COMPILED.move_to_end(key)
            return _COMPILED[key]
    compiled = None
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        compiled = _shared_by_process_0(lowered, options, f"executable/{key}")
    if compiled is None:
        compiled = lowered.compile(compiler_options=options)
    with _COMPILED_LOCK:
        _COMPILED[key] = compiled
        while len(_COMPILED) > _COMPILED_KEEP:
            _COMPILED.popitem(last=False)
    return compiled


def _shared_by_process_0(lowered: Any, options: dict | None, key: str) -> Any:
    """Process 0 compiles and publishes; the others load what it published. None where this
    process must compile for itself.

    Only a freshly compiled executable serializes whole: one JAX loaded from its persistent
    cache re-serializes without some of its kernels ("Function ... not found" when run). So
    process 0 also keeps what it compiled in ``<cache dir>/rlhf_jax_shared/``, and a later run
    hands those bytes on.
    """
    from rlhf_jax import distributed
    if jax.process_index() != 0:
        data = distributed.receive(key)
        return _loaded(data, lowered) if data else None
    kept = _shared_store(key)
    try:
        if kept and storage.exists(kept):
            data = storage.read_bytes(kept)
            compiled = _loaded(data, lowered)
        else:
            hits = _cache_hits()
            compiled = lowered.compile(compiler_options=options)
            data = b"" if _cache_hits() > hits else _serialized(compiled)
            if data and kept:
                storage.write_bytes(kept, data)
    except BaseException:
        distributed.publish(key, b"")       # the others compile (and fail) for themselves
        raise
    distributed.publish(key, data)
    return compiled


def _loaded(data: bytes, lowered: Any) -> Any:
    """The executable ``_serialized`` made, loaded for this process's devices."""
    from jax.experimental import serialize_executable
    return serialize_executable.deserialize_and_load(
        data, jax.tree_util.tree_structure(lowered.args_info), lowered.out_tree)


def _serialized(compiled: Any) -> bytes:
    from jax.experimental import serialize_executable
    try:
        return serialize_executable.serialize(compiled)[0]
    except Exception as e:      # e.g. a host callback in the program: each process compiles
        log.debug("a compiled step cannot be shared: %s", e)
        return b""


def _shared_store(key: str) -> str | None:
    directory = jax.config.jax_compilation_cache_dir
    return storage.join(directory, "rlhf_jax_shared", key.replace("/", "_")) if directory else None


_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_thread_hits = threading.local()
_hit_listener_lock = threading.Lock()
_hit_listener_installed = False


def _cache_hits() -> int:
    """Persistent-cache loads so far on this thread (JAX reports a load on the compiling thread)."""
    global _hit_listener_installed
    with _hit_listener_lock:
        if not _hit_listener_installed:
            def count(event: str, **_: Any) -> None:
                if event == _CACHE_HIT_EVENT:
                    _thread_hits.count = getattr(_thread_hits, "count", 0) + 1
            jax.monitoring.register_event_listener(count)
            _hit_listener_installed = True
    return getattr(_thread_hits, "count", 0)


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
