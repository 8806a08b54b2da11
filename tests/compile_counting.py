"""Counting XLA compilations while a block runs: the no-recompile checks' instrument.

The tests run with JAX's persistent compilation cache (``conftest.py``): a program another test
compiled already is loaded from it instead of compiled. A load counts as a compilation here,
since what the checks ask is whether jit had to produce an executable again."""
import contextlib

import jax.monitoring

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


class CompileCounter:
    """Counts XLA backend compilations and persistent-cache loads (every jit cache miss, eager-op
    compiles included)."""

    def __init__(self):
        self.count, self.active = 0, True

    def __call__(self, event, duration, **kwargs):
        if self.active and event == BACKEND_COMPILE:
            self.count += 1

    def loaded(self, event, **kwargs):
        if self.active and event == CACHE_HIT:
            self.count += 1


@contextlib.contextmanager
def counting_compiles():
    """``with counting_compiles() as counter:`` ``counter.count`` is the compiles so far."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    jax.monitoring.register_event_listener(counter.loaded)
    try:
        yield counter
    finally:
        counter.active = False
        jax.monitoring.unregister_event_duration_listener(counter)
        jax.monitoring.unregister_event_listener(counter.loaded)
