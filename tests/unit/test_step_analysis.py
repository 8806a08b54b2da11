"""``rlhf_jax.step_analysis``: the compiler options, memory formula, cost summary and the two
MFUs that ``rlhf-jax compile`` and ``rlhf-jax profile`` share, checked against numbers worked
out by hand for tiny jitted functions on the 8 simulated CPU devices."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import compile as aot
from rlhf_jax import profile, runtime, step_analysis
from rlhf_jax.program import Step

F32 = 4
M, K, N = 64, 32, 16          # x [M, K] rows sharded over 8 devices, w [K, N] replicated


def matmul_step() -> Step:
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    x = jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("d")))
    w = jax.ShapeDtypeStruct((K, N), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    return Step("matmul", jax.jit(lambda x, w: x @ w), (x, w), tokens=M)


def add_step(donate: bool) -> Step:
    s = jax.ShapeDtypeStruct((256,), jnp.float32)
    fn = jax.jit(lambda state, delta: state + delta, donate_argnums=(0,) if donate else ())
    return Step("add", fn, (s, s))


def compiled(step: Step):
    result = step_analysis.compile_step(step, "cpu")
    assert result.error is None and result.lower_s >= 0 and result.compile_s > 0
    return result.executable


# --- compiler options ---------------------------------------------------------------------------

class _Recorder:
    """A Step stand-in whose lowering records the options it is compiled with."""

    def __init__(self):
        self.options = []

    def lower(self):
        return self

    def compile(self, compiler_options=None):
        self.options.append(compiler_options)
        return "executable"


def test_steps_compile_with_the_options_training_uses():
    assert step_analysis.compiler_options("cpu") == runtime.CPU_COMPILER_OPTIONS
    assert step_analysis.compiler_options("tpu") is None
    assert step_analysis.compiler_options("gpu") is None
    ours, training = _Recorder(), _Recorder()
    assert step_analysis.compile_step(ours, jax.default_backend()).executable == "executable"
    program = types.SimpleNamespace(steps={"update": training})
    assert runtime.compile_ahead(program, ["update"])["update"].result() == "executable"
    assert ours.options == training.options == [runtime.CPU_COMPILER_OPTIONS]


def test_a_failed_compile_is_returned_not_raised():
    class Broken:
        def lower(self):
            raise ValueError("no")
    result = step_analysis.compile_step(Broken(), "cpu")
    assert result.executable is None and isinstance(result.error, ValueError)


# --- memory -------------------------------------------------------------------------------------

def test_memory_of_a_sharded_matmul_by_hand():
    mem = step_analysis.memory_summary(compiled(matmul_step()))
    args = (M // 8) * K * F32 + K * N * F32          # a row shard of x, all of w
    out = (M // 8) * N * F32                           # a row shard of x @ w
    assert mem["argument_bytes"] == args == 3072
    assert mem["output_bytes"] == out == 512
    assert mem["alias_bytes"] == 0 and mem["temp_bytes"] == 0 and mem["code_bytes"] == 0
    assert mem["peak_bytes_per_device"] == args + out == 3584


@pytest.mark.parametrize("donate, peak", [(True, 2 * 1024), (False, 3 * 1024)])
def test_a_donated_argument_holds_the_output(donate, peak):
    """state + delta, 256 float32 each: donating state lets the result reuse its 1 KiB."""
    mem = step_analysis.memory_summary(compiled(add_step(donate)))
    assert mem["argument_bytes"] == 2048 and mem["output_bytes"] == 1024
    assert mem["alias_bytes"] == (1024 if donate else 0)
    assert mem["peak_bytes_per_device"] == peak


def _analysis(**fields):
    base = dict(argument_size_in_bytes=1000, output_size_in_bytes=300, alias_size_in_bytes=200,
                temp_size_in_bytes=50, generated_code_size_in_bytes=7)
    return types.SimpleNamespace(memory_analysis=lambda: types.SimpleNamespace(**{**base, **fields}))


@pytest.mark.parametrize("xla_peak, peak", [
    (900, 1000 + 300 - 200 + 50 + 7),     # the reserved sum is larger
    (5000, 5000 + 7),                     # XLA's heap simulation is larger
    (None, 1000 + 300 - 200 + 50 + 7),    # not given
])
def test_peak_formula(xla_peak, peak):
    extra = {} if xla_peak is None else {"peak_memory_in_bytes": xla_peak}
    mem = step_analysis.memory_summary(_analysis(**extra))
    assert mem["peak_bytes_per_device"] == peak
    assert mem["xla_peak_memory_in_bytes"] == xla_peak
    assert (mem["argument_bytes"], mem["output_bytes"], mem["alias_bytes"], mem["temp_bytes"],
            mem["code_bytes"]) == (1000, 300, 200, 50, 7)


def test_no_memory_analysis_is_none():
    def raises():
        raise NotImplementedError
    assert step_analysis.memory_summary(types.SimpleNamespace(memory_analysis=raises)) is None
    assert step_analysis.memory_summary(types.SimpleNamespace(memory_analysis=lambda: None)) is None


# --- cost ---------------------------------------------------------------------------------------

def test_cost_of_a_sharded_matmul_by_hand():
    step = matmul_step()
    per_device = step_analysis.cost_summary(compiled(step))
    assert per_device["flops"] == 2 * (M // 8) * K * N == 8192
    assert per_device["bytes_accessed"] == 3072 + 512          # read both shards, write one
    whole = step_analysis.cost_summary(step.lower())            # unpartitioned: all rows
    assert whole["flops"] == 2 * M * K * N


def test_cost_summary_reads_dicts_lists_and_nothing():
    raw = {"flops": 10.0, "bytes accessed": 20.0, "utilization0{}": 1.0}
    assert step_analysis.cost_summary(raw) == {"flops": 10.0, "bytes_accessed": 20.0,
                                               "transcendentals": None}
    assert step_analysis.cost_summary([raw])["flops"] == 10.0
    assert step_analysis.cost_summary(None) == dict.fromkeys(
        ("flops", "bytes_accessed", "transcendentals"))

    def raises():
        raise NotImplementedError
    assert step_analysis.cost_summary(types.SimpleNamespace(cost_analysis=raises))["flops"] is None


# --- MFU ----------------------------------------------------------------------------------------

def test_the_two_mfus():
    # 2 devices at 5 TFLOP/s: 10 TFLOP/s; a step of 4 TFLOP model math, 6 TFLOP executed, in 1 s
    assert step_analysis.mfu_model(4e12, 1.0, 10e12) == pytest.approx(0.4)
    assert step_analysis.mfu_hardware(6e12, 1.0, 10e12) == pytest.approx(0.6)
    for mfu in (step_analysis.mfu_model, step_analysis.mfu_hardware):
        assert mfu(None, 1.0, 1e12) is None and mfu(1e12, 0.0, 1e12) is None
        assert mfu(1e12, 1.0, None) is None
        flops, peak = 3.7e13, 7 * 197e12
        assert mfu(flops, flops / peak, peak) == 1.0     # the time at peak: exactly 1


# --- compile and profile read a step the same way -----------------------------------------------

def test_compile_and_profile_report_the_same_memory_and_cost():
    step = matmul_step()
    row = aot.compile_step(step, aot.get_target("cpu"))
    phase, _ = profile._compile_step(step, 8, "cpu")
    mem = step_analysis.memory_summary(compiled(step))
    assert phase["memory_per_device"] == mem
    assert {k: row[k] for k in mem} == mem
    assert row["as_compiled_flops_per_device"] == phase["flops_per_device"] == 8192
    assert phase["flops"] == 8 * 8192


def test_a_step_compiled_before_in_this_process_is_reused():
    """A stage run twice in one process (PPO then PPO-ptx, a test's reference run) compiles each
    step once; another mesh's devices or other compiler options compile it again."""
    lowerings = []

    class Step:
        def __init__(self, scale):
            self.scale = scale

        def lower(self):
            lowerings.append(self.scale)
            return jax.jit(lambda x: x * self.scale).lower(jax.ShapeDtypeStruct((3,), jnp.float32))

    first = runtime.compiled_step(Step(2.0), None, (0,))
    assert runtime.compiled_step(Step(2.0), None, (0,)) is first        # same lowering: reused
    assert runtime.compiled_step(Step(3.0), None, (0,)) is not first    # other program
    assert runtime.compiled_step(Step(2.0), None, (1,)) is not first    # other devices
    assert runtime.compiled_step(Step(2.0), {"xla_backend_optimization_level": 0},
                                 (0,)) is not first
    np.testing.assert_array_equal(first(jnp.ones(3)), 2.0 * np.ones(3))
    assert lowerings == [2.0, 2.0, 3.0, 2.0, 2.0]        # lowered every time: that is the key
