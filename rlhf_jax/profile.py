"""``rlhf-jax profile``: time a stage's compiled steps on the machine at hand.

For each step of a stage's ``Program`` (SFT/RM: train, eval; PPO: rollout, experience, update,
value_update, ptx, no value_update with ``ppo.advantage`` grpo / rloo; DPO: ref_logps, update,
eval) this reports compile time, XLA's FLOPs and bytes accessed (``cost_analysis``), per-device
memory (``memory_analysis``), the median wall time of a call after warm-up, achieved FLOP/s,
``mfu_hardware`` against a matmul peak measured in the same run on the same devices, and
tokens/s. Steps are compiled with the compiler options training uses, and memory, cost and
utilization are read as ``rlhf-jax compile`` reads them (``rlhf_jax.step_analysis``). Weights are
random, of the config's shapes (no data, no checkpoint needed), or a pipeline workdir's trained
models; the batches are always random tokens with all-ones masks. ``--trace DIR`` also writes a
``jax.profiler`` trace with every phase named (TensorBoard's profile plugin reads the
``.xplane.pb``, https://ui.perfetto.dev the ``perfetto_trace.json.gz``). ``--from-workdir``,
``--trace`` and ``--out`` may be URLs (``gs://...``, ``rlhf_jax.storage``).

Library use (the CLI only adds argument checks and printing)::

    cfg = load_config("experiments/instructgpt_tiny.py")
    report = profile_stage(cfg, "ppo", steps=3)      # a JSON-able dict
    print(format_table(report))

What the numbers mean:

* ``flops``: XLA's count for the compiled program, per device times the devices it runs on, so
  what the hardware executes (remat recomputation and replicated work included). A step with a
  data-dependent ``while`` loop (the rollout's decode) is counted with its loop body
  ``loop_trips`` times (the most it can run).
* ``mfu_hardware`` (``step_analysis.mfu_hardware``): those executed FLOPs / (median seconds x
  the measured peak): hardware FLOPs utilization, not the model FLOPs utilization
  (``mfu_model``) that ``rlhf-jax compile`` estimates.
* ``memory_per_device`` (``step_analysis.memory_summary``): arguments, outputs, aliased
  outputs, temporaries, code, XLA's ``xla_peak_memory_in_bytes`` and ``peak_bytes_per_device``,
  the same per-device peak as ``rlhf-jax compile``'s.
* ``peak``: the fastest of jitted square matmuls (512, 1024 and 2048 wide on CPU; 2048 to 8192
  on accelerators) in the model's compute dtype, rows sharded over the same devices the steps
  use, measured before and after the steps. On a CPU with simulated devices
  (``--xla_force_host_platform_device_count``) they share the host's cores, and so does the
  peak: ``mfu_hardware`` stays "of this machine", whatever the device count. On a shared
  machine contention slows steps and peak alike but not always at the same moments; the host's
  load average is recorded, and an ``mfu_hardware`` over 100% means the peak was measured under
  more contention.
* per-iteration time (PPO): ``calls_per_iteration`` times the median of each phase: one rollout
  and one experience pass per iteration, ``epochs * rollout_batch_size / minibatch_size`` update
  steps. ``ptx`` is the pretraining-gradient pass alone, already inside ``update``; it is timed on
  its own only to show its share, and is not added to the iteration. DPO: one ``ref_logps``
  and one ``update`` per batch; ``eval`` is timed but not part of the iteration.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import registry, step_analysis, storage
from rlhf_jax.errors import UserError

log = logging.getLogger(__name__)

# Steps run each iteration (in this order); anything else a Program has runs after them.
# (PPO with ppo.advantage grpo / rloo has no value_update; DPO: ref_logps, update, eval.)
PHASE_ORDER = ("sync", "rollout", "experience", "ref_logps", "update", "value_update", "ptx", "train",
               "eval")
# Steps whose time is already inside another step's (not added to the iteration).
INCLUDED_IN = {"ptx": "update"}


# --- the library: report dicts ---------------------------------------------------------------

def measure_matmul_peak(mesh: Mesh, *, n: int | None = None, dtype: Any = "float32",
                        repeats: int = 5, min_seconds: float = 0.5) -> dict[str, Any]:
    """Best FLOP/s of square matmuls whose rows are sharded over all of ``mesh``.

    ``[m, m] @ [m, m]`` for m = n/4, n/2 and n: the left operand and the result split by rows
    over every device of the mesh, the right operand replicated, so each device multiplies
    ``m / devices`` rows: the devices the profiled steps use, working together. Each size runs at
    least ``repeats`` calls and ``min_seconds``; the peak is the fastest call of the best size
    (on CPU a 512-wide matmul often beats a 2048-wide one). ``n`` defaults to 2048 on CPU and
    8192 on accelerators. The matmuls are compiled with the steps' compiler options.
    """
    devices = int(mesh.devices.size)
    platform_name = mesh.devices.flat[0].platform
    n = n or (2048 if platform_name == "cpu" else 8192)
    dtype = jnp.dtype(dtype)
    rows = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    replicated = NamedSharding(mesh, PartitionSpec())
    times: dict[str, list[float]] = {}
    for m in sorted({max(devices, int(math.ceil(k / devices) * devices))
                     for k in (n // 4, n // 2, n)}):
        k1, k2 = jax.random.split(jax.random.key(m))
        a = jax.jit(lambda k: jax.random.normal(k, (m, m), dtype), out_shardings=rows)(k1)
        b = jax.jit(lambda k: jax.random.normal(k, (m, m), dtype), out_shardings=replicated)(k2)
        matmul = jax.jit(lambda x, y: x @ y, out_shardings=rows).lower(a, b).compile(
            compiler_options=step_analysis.compiler_options(platform_name))   # as the steps
        jax.block_until_ready(matmul(a, b))        # warm-up
        times[str(m)] = []
        start = time.perf_counter()
        while (len(times[str(m)]) < max(1, repeats)
               or (time.perf_counter() - start < min_seconds and len(times[str(m)]) < 100)):
            t0 = time.perf_counter()
            jax.block_until_ready(matmul(a, b))
            times[str(m)].append(time.perf_counter() - t0)
        del a, b
    return _peak_summary(times, dtype.name, devices, platform_name)


def merge_peaks(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two measurements of the same matmuls as one (the fastest calls of either)."""
    times = {m: list(a["times_s"].get(m, [])) + list(b["times_s"].get(m, []))
             for m in {**a["times_s"], **b["times_s"]}}
    return _peak_summary(times, a["dtype"], a["devices"], a["platform"], measurements=2)


def _peak_summary(times: dict[str, list[float]], dtype: str, devices: int, platform_name: str,
                  measurements: int = 1) -> dict[str, Any]:
    by_size = {m: 2.0 * int(m) ** 3 / min(ts) for m, ts in times.items()}
    best = max(by_size, key=by_size.get)
    shared = (f"; the {devices} simulated CPU devices share this host's {os.cpu_count()} cores"
              if platform_name == "cpu" and devices > 1 else "")
    when = ", before and after the steps" if measurements > 1 else ""
    return {
        "flops_per_s": by_size[best],
        "median_flops_per_s": 2.0 * int(best) ** 3 / statistics.median(times[best]),
        "per_device_flops_per_s": by_size[best] / devices,
        "n": int(best), "dtype": dtype, "devices": devices, "platform": platform_name,
        "by_size_flops_per_s": by_size,
        "times_s": times,
        "how": f"best of {'/'.join(times)}-wide {dtype} matmuls ({best} won, "
               f"{len(times[best])} calls{when}), rows sharded over {devices} device(s){shared}",
    }


def profile_program(program: Any, *, steps: int = 5, warmup: int = 1,
                    trace_dir: str | None = None, state: Any = None, frozen: Any = None,
                    peak: dict[str, Any] | None = None, peak_dtype: Any = "float32",
                    calls_per_iteration: dict[str, float] | None = None,
                    trace_iterations: int = 2, seed: int = 0,
                    phases: Sequence[str] | None = None,
                    model_flops: dict[str, float] | None = None) -> dict[str, Any]:
    """Compile, measure and time every step of ``program``; returns the report dict.

    ``state``/``frozen`` default to ``program.init_state`` (random weights). Every iteration
    calls each step once, in ``PHASE_ORDER``; the first ``warmup`` iterations are not timed.
    A step that donates its first argument (train/update: the state) has its returned state fed
    back to every step that was given that state (or part of it, like its params). ``phases``
    limits the report to those steps (a compute-bound update without the rollout's decode loop);
    the iteration total then covers only them.

    ``model_flops`` (``{step: FLOPs per call}``, from ``compile.count_flops``: every loop's
    trips counted) replaces XLA's count of the compiled step, which counts a ``scan`` body once
    (an L-layer scanned model reads ~L times too few FLOPs); the executed FLOPs behind
    ``mfu_hardware`` are then those with remat's recompute (``compile.REMAT_FACTOR``) in the
    steps that take a gradient, and ``mfu_model`` is reported beside it.
    """
    from rlhf_jax.compile import GRADIENT_STEPS, REMAT_FACTOR
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
    names = _ordered(program.steps)
    if phases:
        unknown = sorted(set(phases) - set(names))
        if unknown:
            raise ValueError(f"--phases {','.join(unknown)}: the {program.stage} stage has steps "
                             f"{', '.join(names)}")
        names = [n for n in names if n in phases]
    n_devices = int(program.mesh.devices.size)
    platform_name = program.mesh.devices.flat[0].platform
    if state is None and frozen is None:
        state, frozen = program.init_state(jax.random.key(seed))
    load_before = _load_average()
    measure_peak = peak is None
    if measure_peak:
        peak = measure_matmul_peak(program.mesh, dtype=peak_dtype)

    phases: dict[str, dict[str, Any]] = {}
    executables = {}
    for name in names:
        step = program.steps[name]
        phase, executables[name] = _compile_step(step, n_devices, platform_name)
        phases[name] = phase

    keys = jax.random.split(jax.random.key(seed + 1), len(names))
    args = {name: tuple(program.random_args(name, state, frozen, key))
            for name, key in zip(names, keys)}
    times: dict[str, list[float]] = {name: [] for name in names}
    for it in range(warmup + steps):
        for name in names:
            out, dt = _call(executables, program.steps[name], name, args[name])
            if it >= warmup:
                times[name].append(dt)
            args = _feed_back(args, name, out)
            del out

    if measure_peak:
        # Once more after the steps: on a shared machine the best of both is the closer to the
        # machine's real peak (mfu_hardware over 100% means even that was measured under
        # contention).
        sizes = [int(m) for m in peak["times_s"]]
        peak = merge_peaks(peak, measure_matmul_peak(program.mesh, n=max(sizes),
                                                     dtype=peak["dtype"]))
    peak_flops = peak.get("flops_per_s")
    calls = calls_per_iteration or {}
    for name in names:
        p = phases[name]
        median = statistics.median(times[name])
        p["times_s"] = times[name]
        p["median_s"] = median
        p["min_s"] = min(times[name])
        if model_flops and (model_flops.get(name) or 0) > 0:    # (a weight copy has none)
            p["as_compiled_flops"] = p["flops"]
            p["model_flops"] = model_flops[name]
            remat = any(m.config.remat for m in program.models.values())
            p["flops"] = p["model_flops"] * (REMAT_FACTOR if remat and name in GRADIENT_STEPS
                                             else 1.0)
            p["mfu_model"] = step_analysis.mfu_model(p["model_flops"], median, peak_flops)
        p["flops_per_s"] = p["flops"] / median if p["flops"] is not None else None
        p["mfu_hardware"] = step_analysis.mfu_hardware(p["flops"], median, peak_flops)
        p["tokens_per_s"] = p["tokens"] / median if p["tokens"] else None
        p["calls_per_iteration"] = calls.get(name)
        p["included_in"] = INCLUDED_IN.get(name) if INCLUDED_IN.get(name) in phases else None

    report: dict[str, Any] = {
        "stage": program.stage,
        "backend": jax.default_backend(),
        "device_kind": program.mesh.devices.flat[0].device_kind,
        "devices": n_devices,
        "mesh": {k: int(v) for k, v in program.mesh.shape.items()},
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                 "processes": jax.process_count(),
                 "load_average_1min": {"before": load_before, "after": _load_average()}},
        "jax_version": jax.__version__,
        "steps": steps, "warmup": warmup,
        "peak": peak,
        "phases": phases,
        "iteration": _iteration(phases, peak_flops),
        "measured_memory": _device_memory_stats(program.mesh),
        "calls_per_iteration": dict(program.calls_per_iteration),
    }
    if trace_dir:
        report["trace"] = write_trace(program.stage, executables, program.steps, args, names,
                                      trace_dir, iterations=trace_iterations)
    return _jsonable(report)


def write_trace(stage: str, executables: dict, steps: dict, args: dict, names: Sequence[str],
                trace_dir: str, iterations: int = 2) -> dict[str, Any]:
    """A ``jax.profiler`` trace of ``iterations`` iterations, each a ``StepTraceAnnotation``
    (``<stage>``, step_num) holding one ``TraceAnnotation`` per phase (its step's name). The
    profiler writes local files only: a URL ``trace_dir`` gets them when the trace is done."""
    with storage.writable_local(trace_dir) as local:
        before = set(_files_under(local))
        jax.profiler.start_trace(local, create_perfetto_trace=True)
        try:
            for i in range(max(1, iterations)):
                with jax.profiler.StepTraceAnnotation(stage, step_num=i):
                    for name in names:
                        with jax.profiler.TraceAnnotation(name):
                            out, _ = _call(executables, steps[name], name, args[name])
                        args = _feed_back(args, name, out)
                        del out
        finally:
            jax.profiler.stop_trace()
        files = sorted(set(_files_under(local)) - before)
    return {
        "dir": trace_dir,
        "files": files,
        "xplane": [f for f in files if f.endswith(".xplane.pb")],
        "perfetto": [f for f in files if f.endswith("perfetto_trace.json.gz")],
        "iterations": max(1, iterations),
        "open_with": f"tensorboard --logdir {trace_dir} (profile plugin); or load the "
                     "perfetto_trace.json.gz at https://ui.perfetto.dev",
    }


def stage_config(cfg: Any, stage: str, workdir: str | None = None) -> Any:
    """The config of ``stage`` (architectures filled in) from an experiment config; with a
    pipeline ``workdir`` its model paths point at that run's trained models."""
    import ml_collections

    from rlhf_jax.compile import ppo_advantage
    from rlhf_jax.config import stage_configs
    from rlhf_jax.registry import GROUP_ADVANTAGES
    configs = stage_configs(cfg, methods=True)
    if stage not in configs:
        raise ValueError(f"the config has no {stage!r} stage (it has: {', '.join(configs) or 'none'})")
    c = configs[stage]
    group = stage == "ppo" and ppo_advantage(c) in GROUP_ADVANTAGES
    if group and "ppo" in cfg and "sft" in cfg:
        # The pipeline's grpo / rloo stages are ppo without ptx, named after their estimator.
        c = ml_collections.ConfigDict(c.to_dict())
        c.name = ppo_advantage(c)
        c.ppo.ptx_coef = 0.0
    elif stage == "ppo" and "ppo" in cfg and cfg.get("ppo_ptx_coef") and not c.ppo.ptx_coef:
        # A pipeline config runs PPO and PPO-ptx; profile PPO-ptx (all four phases). Set
        # --config.ppo_ptx_coef=0 to profile plain PPO.
        c = ml_collections.ConfigDict(c.to_dict())
        c.ppo.ptx_coef = float(cfg.ppo_ptx_coef)
        c.name = "ppo_ptx"
    if workdir:
        c = _with_workdir_models(c, stage, workdir, cfg)
    return c


def build_program(stage: str, stage_cfg: Any, mesh: Mesh, **kwargs: Any) -> Any:
    """The stage's ``build(stage_cfg, mesh, **kwargs)`` (``registry.ENGINES[stage].build``)."""
    if stage not in registry.ENGINES:
        raise ValueError(f"stage {stage!r}; expected one of {', '.join(registry.ENGINE_ORDER)}")
    return registry.load(registry.ENGINES[stage].build)(stage_cfg, mesh, **kwargs)


def calls_per_iteration(stage: str, stage_cfg: Any, program: Any) -> dict[str, float]:
    """How often each step runs per training iteration (as the stage's loop runs it)."""
    return {k: float(v) for k, v in program.calls_per_iteration.items()}


def profile_stage(cfg: Any, stage: str, *, steps: int = 5, warmup: int = 1,
                  workdir: str | None = None, trace_dir: str | None = None, seed: int = 0,
                  peak: dict[str, Any] | None = None,
                  phases: Sequence[str] | None = None) -> dict[str, Any]:
    """Profile one stage of a loaded experiment config (pipeline-style or one stage's)."""
    from rlhf_jax.runtime import setup_mesh
    stage_cfg = stage_config(cfg, stage, workdir)
    mesh = setup_mesh(stage_cfg)
    t0 = time.perf_counter()
    program = build_program(stage, stage_cfg, mesh)
    build_s = time.perf_counter() - t0
    state, frozen = program.init_state(jax.random.key(seed))
    if workdir:
        state, frozen = load_workdir_weights(program, stage_cfg, state, frozen)
    from rlhf_jax import compile as aot
    counted = aot.count_flops(stage, stage_cfg, mesh,
                              lambda c, m, **kw: build_program(stage, c, m, **kw), program)
    report = profile_program(program, steps=steps, warmup=warmup, trace_dir=trace_dir,
                             state=state, frozen=frozen, peak=peak,
                             peak_dtype=_compute_dtype(stage_cfg),
                             calls_per_iteration=calls_per_iteration(stage, stage_cfg, program),
                             seed=seed, phases=phases,
                             model_flops={k: v["flops"] for k, v in counted.items()})
    report["build_s"] = build_s
    report["stage_config"] = stage_cfg.name
    if stage == "ppo":
        report["ptx_coef"] = float(stage_cfg.ppo.ptx_coef)
    report["weights"] = workdir or "random"
    report["models"] = {name: _model_summary(m) for name, m in program.models.items()}
    return report


# --- workdir weights -----------------------------------------------------------------------

def _with_workdir_models(c: Any, stage: str, workdir: str, cfg: Any) -> Any:
    """Point ``init_from`` / ``policy_from`` / ``reward_from`` at a pipeline workdir's models
    (the layout of ``rlhf_jax.pipeline``)."""
    import ml_collections
    c = ml_collections.ConfigDict(c.to_dict())
    # The pipeline stage of this name starts from these stages' models (DPO: its policy and
    # frozen reference both the SFT model); a base_model checkpoint stands in for pretrain.
    source = lambda s: ((s == registry.BASE_STAGE and cfg.get("base_model"))
                        or registry.model_path(workdir, s))
    paths = {field: source(s) for field, s in registry.STAGES[stage].models_from.items()}
    for key, path in paths.items():
        if not storage.isdir(path):
            raise FileNotFoundError(f"--from-workdir {workdir}: {path} not found (has the pipeline "
                                    f"finished the stage {stage} starts from?)")
        with c.unlocked():
            c[key] = path
    return c


def load_workdir_weights(program: Any, stage_cfg: Any, state: Any, frozen: Any):
    """Replace the random parameters of ``state``/``frozen`` by the stage's trained models.

    SFT/RM: ``init_from`` -> ``state.params``; DPO: ``init_from`` -> ``state.params`` and the
    frozen reference (``frozen``); PPO: ``policy_from`` -> the policy, its EMA and the
    frozen reference, ``reward_from`` -> the frozen RM and (unless ``value_from``) the value.
    Optimizer moments stay as ``init_state`` made them. A scalar-head target loaded from an LM
    (the RM starts from SFT) keeps its fresh score head, as the RM stage does. With LoRA the
    trained state holds adapters, which stay fresh as at the start of a LoRA run: the policy's
    weights go to the frozen base (``frozen.reference``) only, and with value LoRA the RM's
    score head is the value's trained head (its trunk is ``frozen.reward`` already).
    """
    from rlhf_jax.model_io import load_model, runtime_overrides
    roles = getattr(program.plan, "roles", None)          # PPO's
    trains = lambda role: getattr(roles, role).trains if roles is not None else "full"
    value_target = ("state.value.params.score_head" if trains("value") == "lora+head"
                    else "state.value.params")
    targets = {"init_from": ["state.params", "frozen"],     # frozen: DPO's reference ({} else)
               "policy_from": (["frozen.reference"] if trains("policy") == "lora" else
                               ["state.policy.params", "state.ema_params", "frozen.reference"]),
               "reward_from": ["frozen.reward"] + ([] if stage_cfg.get("value_from")
                                                  else [value_target]),
               "value_from": [value_target]}
    trees = {"state": state, "frozen": frozen}
    for key, paths in targets.items():
        if not stage_cfg.get(key):
            continue
        _, params, _, _ = load_model(stage_cfg[key], program.mesh, **runtime_overrides(stage_cfg))
        placed = []
        for path in paths:
            target = _get(trees, path)
            if target is None or not jax.tree.leaves(target):
                continue
            source = params["score_head"] if path.endswith(".score_head") else params
            grafted = _graft(source, target, f"{key}={stage_cfg[key]}")
            if placed:     # own buffers: a step donating one of these trees must not free another
                grafted = jax.tree.map(jnp.copy, grafted)
            trees = _replace_at(trees, path, grafted)
            placed.append(path)
        log.info("%s: %s -> %s", key, stage_cfg[key], ", ".join(placed))
    return trees["state"], trees["frozen"]


def _get(trees: dict, path: str) -> Any:
    node = trees
    for k in path.split("."):
        node = node.get(k) if isinstance(node, dict) else getattr(node, k, None)
        if node is None:
            return None
    return node


def _graft(params: dict, target: dict, what: str) -> dict:
    """``params`` in ``target``'s structure: a head the checkpoint lacks (an LM's trunk into a
    scalar-head network) is taken from ``target``; anything else must match exactly."""
    params = {k: v for k, v in params.items() if k in target}
    params.update({k: v for k, v in target.items() if k not in params and k.endswith("_head")})
    same = jax.tree.structure(params) == jax.tree.structure(target) and all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(target)))
    if not same:
        raise ValueError(f"{what}: its parameters do not match the architecture the config "
                         "builds (profile a workdir with the config that made it)")
    return params


def _replace_at(trees: dict, path: str, params: Any) -> dict:
    """``trees`` with the subtree at ``path`` replaced by ``params``, placed in that subtree's
    shardings and dtypes."""
    head, *rest = path.split(".")

    def put(node, keys):
        if not keys:
            shardings = jax.tree.map(lambda x: x.sharding, node)
            dtypes = jax.tree.map(lambda x: x.dtype, node)
            return jax.device_put(jax.tree.map(lambda p, d: p.astype(d), params, dtypes), shardings)
        k, *more = keys
        if isinstance(node, dict):
            return {**node, k: put(node[k], more)}
        return node.replace(**{k: put(getattr(node, k), more)})
    return {**trees, head: put(trees[head], rest)}


# --- pieces ----------------------------------------------------------------------------------

def _ordered(steps: dict) -> list[str]:
    known = [n for n in PHASE_ORDER if n in steps]
    return known + [n for n in steps if n not in known]


def _compile_step(step: Any, n_devices: int, platform_name: str) -> tuple[dict[str, Any], Any]:
    """Compile ``step`` as training does and read its cost and memory (``step_analysis``): the
    executed FLOPs and bytes, a data-dependent loop's body counted ``loop_trips`` times."""
    result = step_analysis.compile_step(step, platform_name)
    cost = step_analysis.cost_summary(result.unwrap())
    flops_dev, bytes_dev = cost["flops"], cost["bytes_accessed"]
    trips = int(getattr(step, "loop_trips", 1) or 1)
    body = getattr(step, "loop_body", None)
    phase: dict[str, Any] = {"lower_s": result.lower_s, "compile_s": result.compile_s,
                             "loop_trips": trips}
    if body is not None and trips > 1:
        body_result = step_analysis.compile_step(body, platform_name)
        body_cost = step_analysis.cost_summary(body_result.unwrap())
        phase["loop_body_compile_s"] = body_result.lower_s + body_result.compile_s
        phase["loop_body_flops_per_device"] = body_cost["flops"]
        if flops_dev is not None and body_cost["flops"] is not None:
            flops_dev += (trips - 1) * body_cost["flops"]
        if bytes_dev is not None and body_cost["bytes_accessed"] is not None:
            bytes_dev += (trips - 1) * body_cost["bytes_accessed"]
    phase.update({
        "flops_per_device": flops_dev,
        "flops": None if flops_dev is None else flops_dev * n_devices,
        "bytes_accessed_per_device": bytes_dev,
        "bytes_accessed": None if bytes_dev is None else bytes_dev * n_devices,
        "memory_per_device": step_analysis.memory_summary(result.executable),
        "tokens": int(getattr(step, "tokens", 0) or 0),
    })
    return phase, result.executable


def _call(executables: dict, step: Any, name: str, args: tuple) -> tuple[Any, float]:
    """One blocking call of the compiled step (falls back to the jitted function, which
    compiles again, if the AOT executable rejects the arguments)."""
    fn = executables[name]
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except (TypeError, ValueError) as e:
        if fn is step.fn:
            raise
        log.warning("%s: compiled executable rejected the arguments (%s); using the jitted "
                    "step", name, str(e).splitlines()[0])
        executables[name] = fn = step.fn
        t0 = time.perf_counter()
        out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def _feed_back(args: dict[str, tuple], name: str, out: Any) -> dict[str, tuple]:
    """After a step that returned updated leading arguments (donated states: PPO's update
    returns the policy state and its EMA), give every step the new arrays in place of the old
    ones (matched by identity, leaf by leaf)."""
    if not isinstance(out, tuple):
        return args
    mapping = {}
    for first, updated in zip(args[name], out):
        try:
            if first is None or jax.tree.structure(updated) != jax.tree.structure(first):
                break
        except Exception:   # noqa: BLE001
            break
        old, new = jax.tree.leaves(first), jax.tree.leaves(updated)
        if [getattr(x, "shape", None) for x in old] != [getattr(x, "shape", None) for x in new]:
            break
        mapping.update({id(o): n for o, n in zip(old, new)})
    if not mapping:
        return args
    return {k: jax.tree.map(lambda x: mapping.get(id(x), x), v) for k, v in args.items()}


def _iteration(phases: dict[str, dict], peak_flops: float | None) -> dict[str, Any] | None:
    """One training iteration: sum of calls x median over the steps that run in it."""
    parts = {n: p for n, p in phases.items()
             if p.get("calls_per_iteration") and not p.get("included_in")}
    if not parts:
        return None
    seconds = {n: p["calls_per_iteration"] * p["median_s"] for n, p in parts.items()}
    total = sum(seconds.values())
    flops = (sum(p["calls_per_iteration"] * p["flops"] for p in parts.values())
             if all(p["flops"] is not None for p in parts.values()) else None)
    tokens = sum(p["calls_per_iteration"] * p["tokens"] for p in parts.values())
    for n, p in phases.items():
        if n in seconds:
            p["iteration_s"] = seconds[n]
            p["share"] = seconds[n] / total if total else None
        elif p.get("included_in") and p.get("calls_per_iteration"):
            p["iteration_s"] = p["calls_per_iteration"] * p["median_s"]
            p["share"] = p["iteration_s"] / total if total else None
    return {
        "seconds": total,
        "flops": flops,
        "flops_per_s": flops / total if flops is not None and total else None,
        "mfu_hardware": step_analysis.mfu_hardware(flops, total, peak_flops),
        "tokens": tokens,
        "calls": {n: p["calls_per_iteration"] for n, p in parts.items()},
    }


def _device_memory_stats(mesh: Mesh) -> dict[str, Any] | None:
    """Allocator statistics where the backend keeps them (GPU/TPU; None on CPU)."""
    stats = {}
    for d in mesh.devices.flat:
        try:
            s = d.memory_stats()
        except Exception:   # noqa: BLE001
            s = None
        if s:
            stats[str(d.id)] = {k: int(v) for k, v in s.items()
                                if k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")}
    return stats or None


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _files_under(directory: str) -> list[str]:
    out = []
    for root, _, files in os.walk(directory):
        out += [os.path.relpath(os.path.join(root, f), directory) for f in files]
    return out


def _compute_dtype(stage_cfg: Any) -> str:
    run = stage_cfg.get("model_runtime") or {}
    return str(dict(run).get("dtype") or "float32")


def _model_summary(model: Any) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    from rlhf_jax.models.params import abstract_params
    try:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(model)))
    except Exception:   # noqa: BLE001
        n = None
    return {"params": n, "arch": cfg.arch, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
            "vocab_size": cfg.vocab_size, "head": cfg.head, "dtype": cfg.dtype}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    return str(x)


# --- printing --------------------------------------------------------------------------------

def _si(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.{digits}g}{prefix}{unit}"
    return f"{x:.{digits}g}{unit}"


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def _hardware_mfu(row: dict[str, Any]) -> float | None:
    """``mfu_hardware`` (``mfu`` in reports written before the key was named)."""
    return row.get("mfu_hardware", row.get("mfu"))


def format_table(report: dict[str, Any]) -> str:
    """The per-phase table ``rlhf-jax profile`` prints."""
    peak = report["peak"]
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    load = report["host"].get("load_average_1min") or {}
    lines = [
        f"rlhf-jax profile: stage {report['stage']}, {report['devices']} {report['backend']} "
        f"device(s) ({report['device_kind']}; mesh {mesh}; {report['host']['cpus']} host CPUs), "
        f"weights: {report.get('weights', 'random')}",
        f"matmul peak: {_si(peak['flops_per_s'], 'FLOP/s')} (fastest call, {peak['n']}-wide "
        f"{peak['dtype']}; by width: "
        + ", ".join(f"{m}: {_si(v, 'FLOP/s')}" for m, v in peak["by_size_flops_per_s"].items())
        + f"; median call at {peak['n']}: {_si(peak['median_flops_per_s'], 'FLOP/s')}; rows "
        f"sharded over {peak['devices']} device(s))",
        f"timing: median of {report['steps']} calls after {report['warmup']} warm-up; host load "
        f"average {load.get('before')} before, {load.get('after')} after",
        "",
    ]
    header = ("phase", "compile s", "FLOP/call", "bytes/call", "mem/dev", "median ms",
              "FLOP/s", "mfu_hardware", "tokens/s", "calls/it", "ms/it", "share")
    rows = []
    for name, p in report["phases"].items():
        mem = (p.get("memory_per_device") or {}).get("peak_bytes_per_device")
        calls = p.get("calls_per_iteration")
        share = p.get("share")
        share_text = "-" if share is None else f"{100 * share:.0f}%"
        if p.get("included_in") and share is not None:
            share_text = f"({share_text} in {p['included_in']})"
        rows.append((
            name, f"{p['compile_s']:.1f}", _si(p["flops"]), _si(p["bytes_accessed"], "B"),
            _si(mem, "B"), _ms(p["median_s"]), _si(p["flops_per_s"]),
            _pct(_hardware_mfu(p)),
            _si(p["tokens_per_s"]), "-" if calls is None else f"{calls:g}",
            _ms(p.get("iteration_s")), share_text))
    it = report.get("iteration")
    if it:
        rows.append(("iteration", "", _si(it["flops"]), "", "", "", _si(it["flops_per_s"]),
                     _pct(_hardware_mfu(it)),
                     _si(it["tokens"] / it["seconds"] if it["seconds"] else None), "",
                     _ms(it["seconds"]), "100%"))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(r) for r in rows]
    if "trace" in report:
        t = report["trace"]
        lines += ["", f"trace: {t['dir']} ({len(t['files'])} files: "
                      f"{', '.join(os.path.basename(f) for f in t['files'])}); {t['open_with']}"]
    return "\n".join(lines)


# --- the CLI ---------------------------------------------------------------------------------

def run(args: Any, overrides: Sequence[str]) -> int:
    """``rlhf-jax profile``: the table on stdout, JSON to --out; bad input raises a UserError
    (one line, exit 2) before anything is built."""
    from rlhf_jax.config import apply_overrides, load_config
    workdir = args.from_workdir
    if args.steps < 1:
        raise UserError(f"--steps={args.steps}: expected at least 1 timed call")
    if args.warmup < 0:
        raise UserError(f"--warmup={args.warmup}: expected an integer >= 0")
    if workdir and not storage.isdir(workdir):
        raise UserError(f"--from-workdir {workdir}: no such directory; expected a pipeline "
                        "workdir")
    if args.trace and storage.exists(args.trace) and not storage.isdir(args.trace):
        raise UserError(f"--trace {args.trace}: exists and is not a directory; expected a "
                        "directory to write the trace in")
    if args.out and storage.isdir(args.out):
        raise UserError(f"--out {args.out}: is a directory; expected a .json file path")
    try:
        cfg = apply_overrides(load_config(args.config), overrides)
        stage_config(cfg, args.stage, workdir)     # checks the stage and workdir early
    except UserError:
        raise
    except (FileNotFoundError, AttributeError, KeyError, ValueError, SyntaxError) as e:
        raise UserError(_one_line(e)) from e
    try:
        chosen = getattr(args, "phases", None)
        phases = [p.strip() for p in chosen.split(",") if p.strip()] if chosen else None
        report = profile_stage(cfg, args.stage, steps=args.steps, warmup=args.warmup,
                               workdir=workdir, trace_dir=args.trace, phases=phases)
    except UserError:
        raise
    except (FileNotFoundError, ValueError) as e:
        log.debug("profile failed", exc_info=True)
        raise UserError(_one_line(e)) from e
    report["config"] = args.config
    report["overrides"] = list(overrides)
    print(format_table(report))
    if args.out:
        storage.write_text(args.out, json.dumps(report, indent=1) + "\n")
        print(f"report: {args.out}")
    return 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    text = text[0] if text else type(e).__name__
    return text.strip("'\"") if isinstance(e, KeyError) else text
