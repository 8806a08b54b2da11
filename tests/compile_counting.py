"""Counting XLA backend compilations while a block runs: the no-recompile checks' instrument."""
import contextlib

import jax.monitoring

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations (every jit cache miss, eager-op compiles included)."""

    def __init__(self):
        self.count, self.active = 0, True

    def __call__(self, event, duration, **kwargs):
        if self.active and event == BACKEND_COMPILE:
            self.count += 1


@contextlib.contextmanager
def counting_compiles():
    """``with counting_compiles() as counter:`` ``counter.count`` is the compiles so far."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        yield counter
    finally:
        counter.active = False
        jax.monitoring.unregister_event_duration_listener(counter)
