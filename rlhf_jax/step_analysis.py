"""What ``rlhf-jax compile`` and ``rlhf-jax profile`` read from a compiled step, defined once.

Both commands compile a ``Program``'s ``Step`` (``rlhf_jax.program``) and report its memory,
its FLOPs and a utilization; this module holds each of those definitions so that the two reports
mean the same thing by the same key:

* :func:`compile_step`: lower and compile a step with the compiler options training uses
  (:func:`compiler_options`), timing both.
* :func:`memory_summary`: the per-device bytes of ``Compiled.memory_analysis()`` and the one
  peak formula (``peak_bytes_per_device``).
* :func:`cost_summary`: per-device ``flops`` / ``bytes_accessed`` / ``transcendentals`` of
  ``cost_analysis()`` (a ``while`` loop's body counted once).
* :func:`mfu_model` and :func:`mfu_hardware`: the two utilizations, named by the FLOPs they
  count. ``compile`` reports ``mfu_model`` (model FLOPs at the roofline time), ``profile``
  ``mfu_hardware`` (XLA's executed FLOPs at the measured time); neither writes a bare ``mfu``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any


def compiler_options(platform: str) -> dict[str, Any] | None:
    """The XLA options training compiles its steps with on ``platform`` (the platform of the
    devices the step runs on, not the host's): ``runtime.cpu_compiler_options()`` on CPU
    (as ``runtime.compile_ahead``), the compiler's defaults elsewhere."""
    from rlhf_jax.runtime import cpu_compiler_options
    return cpu_compiler_options() if platform == "cpu" else None


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """A compiled step and what compiling it took. ``executable`` is None and ``error`` set when
    lowering or compiling raised (an out-of-memory compile is a result for ``compile``)."""
    executable: Any
    lower_s: float
    compile_s: float
    error: Exception | None = None

    def unwrap(self) -> Any:
        """The executable; raises the error of a failed compile."""
        if self.error is not None:
            raise self.error
        return self.executable


def compile_step(step: Any, platform: str) -> CompiledStep:
    """Lower ``step`` (``step.lower()``: a ``program.Step``) and compile it for ``platform`` with
    :func:`compiler_options`; exceptions are returned in ``error``, not raised."""
    t0 = time.perf_counter()
    lower_s = 0.0
    try:
        lowered = step.lower()
        lower_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        executable = lowered.compile(compiler_options=compiler_options(platform))
    except Exception as e:  # noqa: BLE001 - the caller decides what a failed compile means
        return CompiledStep(None, lower_s, time.perf_counter() - t0, e)
    return CompiledStep(executable, lower_s, time.perf_counter() - t0)


def memory_summary(compiled: Any) -> dict[str, int | None] | None:
    """Per-device bytes of a compiled step, from ``compiled.memory_analysis()`` (None where the
    backend has none).

    ``argument_bytes``, ``output_bytes``, ``alias_bytes`` (the outputs that reuse a donated
    argument's buffer: the new train state written over the old), ``temp_bytes`` (XLA's packed
    block of every temporary), ``code_bytes`` (generated code), ``xla_peak_memory_in_bytes``
    (XLA's heap simulation, None where not given), and

        ``peak_bytes_per_device = max(xla_peak_memory_in_bytes,
        argument_bytes + output_bytes - alias_bytes + temp_bytes) + code_bytes``

    what the program reserves on a device: its arguments, its outputs less those aliased onto
    donated arguments, its temporaries and its code. (XLA:TPU's own fit check adds up the same
    terms; the heap simulation can be lower, and the larger is taken.)
    """
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        return None
    if m is None:
        return None
    fields = {"argument_bytes": "argument_size_in_bytes", "output_bytes": "output_size_in_bytes",
              "alias_bytes": "alias_size_in_bytes", "temp_bytes": "temp_size_in_bytes",
              "code_bytes": "generated_code_size_in_bytes"}
    out: dict[str, int | None] = {k: int(getattr(m, attr, 0) or 0) for k, attr in fields.items()}
    xla_peak = getattr(m, "peak_memory_in_bytes", None)
    out["xla_peak_memory_in_bytes"] = None if xla_peak is None else int(xla_peak)
    reserved = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    out["peak_bytes_per_device"] = max(int(xla_peak or 0), reserved) + out["code_bytes"]
    return out


def cost_summary(analysed: Any) -> dict[str, float | None]:
    """``{"flops", "bytes_accessed", "transcendentals"}`` of a ``Compiled`` or ``Lowered``'s
    ``cost_analysis()``, or of that analysis's dict itself; None for what it does not give.

    XLA counts the body of a ``while`` loop (a layer ``scan``, the decode loop) once. Of a
    ``Compiled`` step the numbers are per device and of the optimized program (remat
    recomputation and work fusion duplicates included); of a ``Lowered`` one, of the whole
    unpartitioned, unoptimized program.
    """
    if hasattr(analysed, "cost_analysis"):
        try:
            analysed = analysed.cost_analysis()
        except Exception:  # noqa: BLE001 - some backends (libtpu's compile-only client) have none
            analysed = None
    if isinstance(analysed, (list, tuple)):    # older jax: one dict per computation
        analysed = analysed[0] if analysed else None
    cost = analysed or {}
    keys = {"flops": "flops", "bytes_accessed": "bytes accessed",
            "transcendentals": "transcendentals"}
    return {k: float(cost[name]) if name in cost else None for k, name in keys.items()}


def _utilization(flops: float | None, seconds: float | None,
                 peak_flops_per_s: float | None) -> float | None:
    if flops is None or not seconds or not peak_flops_per_s or seconds <= 0:
        return None
    return flops / peak_flops_per_s / seconds     # (time at peak) / time: exactly 1 at the peak


def mfu_model(model_flops: float | None, seconds: float | None,
              peak_flops_per_s: float | None) -> float | None:
    """Model FLOPs utilization: ``model_flops / (seconds * peak_flops_per_s)``.

    ``model_flops``: the step's math counted once, over all its devices (``compile``'s
    ``flops``: the unoptimized program, loop trips included), with no rematerialization and no
    duplicated work; ``peak_flops_per_s``: the peak of all the devices the step runs on. None
    where a term is unknown or the time is zero."""
    return _utilization(model_flops, seconds, peak_flops_per_s)


def mfu_hardware(executed_flops: float | None, seconds: float | None,
                 peak_flops_per_s: float | None) -> float | None:
    """Hardware FLOPs utilization: ``executed_flops / (seconds * peak_flops_per_s)``.

    ``executed_flops``: what the devices execute, XLA's count of the compiled program (per
    device times the devices, loop trips included): remat recomputation, fusion duplicates and
    replicated work counted (so usually above :func:`mfu_model` of the same step and time).
    ``peak_flops_per_s``: the peak of all the devices the step runs on."""
    return _utilization(executed_flops, seconds, peak_flops_per_s)
