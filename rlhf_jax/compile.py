"""``rlhf-jax compile``: will every step of a stage fit a TPU slice, and how fast could it run?

Each stage's ``build(cfg, mesh)`` (``rlhf_jax.stages.{sft,reward,ppo,dpo}``; GRPO / RLOO are
``ppo`` with ``ppo.advantage`` grpo / rloo: no value network, no ``value_update``) returns its jitted steps
with abstract arguments (ShapeDtypeStructs carrying shardings) — no weights, no data. This module
lowers and compiles every one of them for a TPU topology *on this CPU machine*
(``jax.experimental.topologies``, the ``tpu`` extra: libtpu compiles for a chip it does not have),
or for the local devices with ``--topology cpu`` (what CI can run)::

    JAX_PLATFORMS=cpu rlhf-jax compile --config experiments/llama3_8b.py --topology v5p:4x4x4 \\
        --stage all --out bench/compile_reports/llama3_8b_v5p-4x4x4.json

Every step is compiled with the compiler options training uses, and its memory and cost are read
as ``rlhf-jax profile`` reads them (``rlhf_jax.step_analysis``). Per step it reports:

* **Memory** (per device, ``step_analysis.memory_summary``): arguments, outputs, the part of
  the outputs aliased onto donated arguments (the train state is donated, so the new state reuses
  the old one's buffers), temporaries and generated code. ``peak_bytes_per_device`` is what the
  program reserves, ``max(xla_peak_memory_in_bytes, arguments + outputs - aliased +
  temporaries) + code`` (the temporaries being XLA's packed temp allocation; XLA:TPU's own fit
  check adds up the same terms). It is compared with the HBM the compiler says it can use
  (probed once per topology: libtpu names its limit when a program is too big, e.g. 15.75 GiB of a
  v5e's 16 GiB), the chip table below being the fallback. A step whose compile itself runs out of
  HBM is reported as not fitting with the compiler's numbers.
* **FLOPs per step**, with loop trip counts. XLA's cost analysis counts the body of a ``while``
  loop once, and a step has up to three kinds of loop: the ``scan`` over layers
  (``scan_layers``), the chunked LM head (``lax.map`` over ``logprob_chunk`` positions) and the
  rollout's decode ``while_loop``. So FLOPs are not read from the step as compiled but from small
  *variants* of the stage built with no layer loop and no chunk loop (``scan_layers=False``,
  ``remat=False``, ``logprob_chunk=0``) and 1 or 2 layers, which are only lowered (traced), not
  compiled:

  - Networks are grouped by their config section's layer count (SFT/RM: ``model``; PPO:
    ``policy_model`` — the policy and its frozen reference —, ``reward_model``, ``value_model``;
    sections with equal ``n_layers`` form one group). ``F0`` is the step with every group at one
    layer, ``F_g`` the same with group ``g`` at two layers. A step's FLOPs are affine in each
    network's depth (identical layers, independent networks), so exactly
    ``F(L) = F0 + sum_g (L_g - 1) * (F_g - F0)``.
  - The rollout's variant still holds its decode loop, counted once; the loop body is its own step
    (``Step.loop_body``, one decode token), so ``F(rollout) += (loop_trips - 1) * F(decode)``:
    every response is taken to run to ``max_new_tokens`` (the worst case the buffers are sized for).
  - Only negligible loops stay (GAE's reverse scan over time: elementwise).

  The cost analysis is of the lowered, *unoptimized and unpartitioned* module
  (``Lowered.cost_analysis()``; libtpu's compile-only client has none, so that module goes to
  XLA's HLO cost analysis with the CPU client): global FLOPs of the step's math, exactly affine
  in depth. (After optimization it is not: XLA:CPU fusion
  recomputes the gradient norm inside every parameter's update fusion, a term quadratic in
  depth.) These are *model* FLOPs: rematerialization (``remat``, the chunked head's recompute in
  the backward pass) is not counted here (``flops_executed`` adds it). ``as_compiled_flops_per_device``
  is XLA's per-device count of the real step, loop bodies once, for reference.
  ``tests/e2e/test_compile.py`` checks the accounting against fully unrolled builds at full depth.
* **Collectives** (``collectives.py``): every all-gather, all-reduce, reduce-scatter,
  all-to-all and collective-permute of the compiled step, with its count per call (loop trips
  included), the bytes one device sends and the mesh axes it runs over.
* **Time** (``lower_s`` and ``compile_s`` of the real step, then three floors):
  ``compute_s`` = executed FLOPs / (devices x peak), the executed FLOPs (``flops_executed``)
  being the model FLOPs times ``REMAT_FACTOR`` (8/6) in a step that takes a gradient with remat
  on; ``hbm_s`` = a traffic floor / HBM bandwidth (every argument read once, every output not
  aliased onto an argument written once, a weight sharded over ``fsdp`` read whole; the rollout
  adds its decode body's once per trip; XLA's own "bytes accessed" counts a layer scan once and
  an in-place cache update as a copy of the cache); ``comm_s`` = the collectives' bytes over
  the chip's ICI (``CHIPS``: Google's per-chip bidirectional figures; a ring along each axis a
  collective spans, both directions). ``step_s_overlapped`` = max of the three (perfect
  overlap), ``step_s_serial`` = max(compute, HBM) + ICI (no collective overlapped), and
  ``mfu_overlapped`` / ``mfu_serial`` the model FLOPs utilization at each
  (``step_analysis.mfu_model``): the range a real run should land in, not a measurement
  (``profile`` measures ``mfu_hardware``). ``stage_info.ppo.iteration`` adds up one PPO
  iteration (sync + rollout + experience + minibatch updates; the collectives per kind and
  axes), ``stage_info.dpo.iteration`` one DPO batch (ref_logps + update).

When a step does not fit, the command prints one line per such step to stderr (stage, step, bytes
needed vs available, the largest buffers: arguments by name and the largest HLO values) and exits
4 (``errors.EXIT_DOES_NOT_FIT``), after writing the report; a bad config or topology exits 2 like
every other command's input error. ``compile_report`` returns the report as a dict for other callers;
``format_table`` renders it.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import collectives, errors, registry, step_analysis, storage
from rlhf_jax.config import stage_configs
from rlhf_jax.registry import GROUP_ADVANTAGES
from rlhf_jax.sharding import MESH_AXES, resolve_mesh_shape

GiB = 1024 ** 3

# Per chip, from Google Cloud's TPU pages (docs/reference/tpu_facts.md; docs.cloud.google.com/
# tpu/docs/v5e, /v5p, /v6e, /v4): peak dense bf16 FLOP/s, HBM bytes, HBM bytes/s, bidirectional
# ICI bytes/s per chip and ICI ports (v5e 400 GB/s over 4 ports, v5p 1,200 GB/s over 6 (3D
# torus), v6e 800 GB/s over 4; the v4 page gives no per-chip figure, so v4 reports no
# communication time). A topology whose devices are TensorCores rather than chips (v4 lists both
# cores of a chip) divides these by the devices per chip.
CHIPS: dict[str, dict[str, float | None]] = {
    "v5e": {"peak_flops": 197e12, "hbm_bytes": 16e9, "hbm_bw": 819e9, "ici_bw": 400e9,
            "ici_ports": 4},
    "v5p": {"peak_flops": 459e12, "hbm_bytes": 95e9, "hbm_bw": 2765e9, "ici_bw": 1200e9,
            "ici_ports": 6},
    "v6e": {"peak_flops": 918e12, "hbm_bytes": 32e9, "hbm_bw": 1638e9, "ici_bw": 800e9,
            "ici_ports": 4},
    "v4": {"peak_flops": 275e12, "hbm_bytes": 32e9, "hbm_bw": 1200e9, "ici_bw": None,
           "ici_ports": 6},
}
# Full remat recomputes each layer's forward pass in the backward pass: 2 + 4 + 2 = 8 FLOPs
# where the model counts 6 (forward 2, backward 4), in every step that takes a gradient.
REMAT_FACTOR = 8 / 6
GRADIENT_STEPS = ("train", "update", "value_update", "ptx")

# The stages (their builders, the config sections holding their networks) are
# rlhf_jax.registry.ENGINES, compiled in the pipeline's order (registry.ENGINE_ORDER).
# What the FLOP-counting variants change in every network.
FLOP_VARIANT_OVERRIDES = {"scan_layers": False, "remat": False}


class CompileError(errors.UserError):
    """Bad input to ``compile`` (topology, stage, mesh): one ``rlhf-jax: error:`` line, exit 2."""


# --- the hardware -------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    """The devices to compile for and what one of them offers."""
    name: str
    platform: str
    devices: list
    device_kind: str
    devices_per_chip: int = 1
    hbm_bytes_per_device: int | None = None
    hbm_source: str = ""
    peak_flops_per_device: float | None = None
    hbm_bw_per_device: float | None = None
    ici_link_bw_per_device: float | None = None   # one ICI link, one direction (bytes/s)

    @property
    def num_devices(self) -> int:
        return len(self.devices)


_TARGETS: dict[str, Target] = {}


def get_target(topology: str) -> Target:
    """A ``Target`` for a TPU topology name (``v5e:2x2``, ``v5p:4x4x4`` ...) or ``cpu``."""
    if topology in _TARGETS:
        return _TARGETS[topology]
    if topology.lower() in ("cpu", "local"):
        devices = list(jax.devices())
        total = _host_memory_bytes()
        target = Target("cpu", devices[0].platform, devices, devices[0].device_kind,
                        hbm_bytes_per_device=None if total is None else total // len(devices),
                        hbm_source="host RAM / devices")
        _TARGETS[topology] = target
        return target
    chip, _, dims = topology.partition(":")
    if chip not in CHIPS or not re.fullmatch(r"\d+(x\d+)*", dims):
        raise CompileError(f"unknown topology {topology!r}: expected CHIP:AxB[xC] with CHIP one of "
                           f"{sorted(CHIPS)} (e.g. v5e:2x2, v5p:4x4x4), or 'cpu'")
    if jax.default_backend() != "tpu":
        # Compile-only use of libtpu (no TPU attached): let several processes load it (parallel
        # compiles, tests) instead of failing on its one-process lockfile in /tmp.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:   # no libtpu, or a name libtpu rejects
        hint = "" if _has_libtpu() else " (compiling for TPU needs libtpu: pip install -e \".[tpu]\")"
        raise CompileError(f"topology {topology!r}: {_first_line(e)}{hint}") from None
    devices = list(topo.devices)
    n_chips = math.prod(int(d) for d in dims.split("x"))
    per_chip = max(1, len(devices) // n_chips)
    facts = CHIPS[chip]
    link = (facts["ici_bw"] / facts["ici_ports"] / 2 / per_chip) if facts["ici_bw"] else None
    target = Target(topology, "tpu", devices, devices[0].device_kind, per_chip,
                    peak_flops_per_device=facts["peak_flops"] / per_chip,
                    hbm_bw_per_device=facts["hbm_bw"] / per_chip, ici_link_bw_per_device=link)
    probed = _probe_hbm(devices)
    if probed:
        target.hbm_bytes_per_device, target.hbm_source = probed, "compiler"
    else:
        target.hbm_bytes_per_device = int(facts["hbm_bytes"] / per_chip)
        target.hbm_source = "chip table"
    _TARGETS[topology] = target
    return target


def _has_libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


_SIZE = r"([\d.]+)\s*([KMGTP]?)i?B?"


def _parse_size(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** "_KMGTP".index(unit or "_"))


def _probe_hbm(devices: list) -> int | None:
    """The HBM bytes one device's programs may use, as the compiler states it when refusing a
    program far too big for any chip (a one-device slice, so this costs well under a second)."""
    mesh = Mesh(np.array(devices[:1]), ("x",))
    huge = jax.ShapeDtypeStruct((2 ** 40,), jnp.int8, sharding=NamedSharding(mesh, PartitionSpec()))
    try:
        jax.jit(lambda y: y[:8]).lower(huge).compile()
    except Exception as e:   # noqa: BLE001 - any message naming the limit will do
        match = re.search(r"available HBM \(" + _SIZE + r"\)", str(e)) or re.search(
            r"Used " + _SIZE + r" of " + _SIZE, str(e))
        if match:
            groups = match.groups()
            return _parse_size(*groups[-2:])
    return None


# --- one step -----------------------------------------------------------------------------------

def _arg_names(step) -> list[str]:
    try:
        params = list(inspect.signature(step.fn).parameters)
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"arg{i}" for i in range(len(step.args))]


def _shard_bytes(struct: Any) -> int | None:
    try:
        itemsize = jnp.dtype(struct.dtype).itemsize
    except TypeError:            # PRNG key arrays
        return None
    sharding = getattr(struct, "sharding", None)
    shape = sharding.shard_shape(struct.shape) if sharding is not None else struct.shape
    return int(math.prod(shape)) * itemsize


def largest_arguments(step, k: int = 3) -> list[dict[str, Any]]:
    """The ``k`` largest argument shards of a step (bytes per device), by pytree path."""
    out = []
    for name, arg in zip(_arg_names(step), step.args):
        for path, leaf in jax.tree_util.tree_leaves_with_path(arg):
            nbytes = _shard_bytes(leaf)
            if nbytes:
                sharding = getattr(leaf, "sharding", None)
                shard = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
                out.append({"name": name + jax.tree_util.keystr(path), "kind": "argument",
                            "bytes": nbytes,
                            "shape": f"{jnp.dtype(leaf.dtype).name}{list(shard)}"})
    return sorted(out, key=lambda x: -x["bytes"])[:k]


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SKIP_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all"}


def largest_hlo_values(hlo_text: str, k: int = 3) -> list[dict[str, Any]]:
    """The ``k`` largest values the compiled (per-device) program materializes, outside fusion
    bodies, with the jax op that produced them. Not all are live at once: a pointer, not a sum."""
    found: dict[tuple, dict] = {}
    in_fusion = False
    for line in hlo_text.splitlines():
        comp = _COMP.match(line)
        if comp and "=" not in line.split("{")[0]:
            in_fusion = "fus" in comp.group(1)
            continue
        if in_fusion:
            continue
        m = _INSTR.match(line)
        if not m or m.group(4) in _SKIP_OPS:
            continue
        dtype, dims = m.group(2), m.group(3)
        if dtype not in _DTYPE_BYTES:
            continue
        shape = [int(d) for d in dims.split(",") if d]
        nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        op_name = re.search(r'op_name="([^"]+)"', line)
        source = op_name.group(1) if op_name else m.group(1)
        key = (dtype, tuple(shape), source)
        if key not in found:
            found[key] = {"name": source[-120:], "kind": f"temporary ({m.group(4)})", "bytes": nbytes,
                          "shape": f"{dtype}{shape}"}
    return sorted(found.values(), key=lambda x: -x["bytes"])[:k]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:400] if text else type(e).__name__


def compile_step(step, target: Target, hbm_bytes: int | None = None,
                 mesh_shape: dict[str, int] | None = None) -> dict[str, Any]:
    """Lower and compile one ``Step`` for ``target`` (``step_analysis.compile_step``: training's
    compiler options): memory (``step_analysis.memory_summary``), per-device cost as compiled
    (loops counted once), its collectives (``collectives.py``: loop trips included, the step's
    ``loop_trips`` for a loop XLA cannot bound), seconds, and whether it fits ``hbm_bytes``."""
    hbm_bytes = target.hbm_bytes_per_device if hbm_bytes is None else hbm_bytes
    row: dict[str, Any] = {"tokens": int(getattr(step, "tokens", 0) or 0),
                           "loop_trips": int(getattr(step, "loop_trips", 1) or 1)}
    result = step_analysis.compile_step(step, target.platform)
    row["lower_s"] = round(result.lower_s, 2)
    row["compile_s"] = round(result.compile_s, 2)
    compiled = result.executable
    if compiled is None:   # OOM is a result; anything else is reported as one
        message = _first_line(result.error)
        row.update(fits=False, error=message, largest_buffers=largest_arguments(step))
        needed = re.search(r"\(" + _SIZE + r"\) exceeds", message) or re.search(
            r"Used " + _SIZE + " of", message)
        row["peak_bytes_per_device"] = _parse_size(*needed.groups()[:2]) if needed else None
        if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
            row["compile_failed"] = True
        return row
    memory = step_analysis.memory_summary(compiled)
    if memory is not None:
        row.update(memory)
        row["unaliased_output_bytes"] = memory["output_bytes"] - memory["alias_bytes"]
    peak = row.get("peak_bytes_per_device")
    cost = step_analysis.cost_summary(compiled)
    row["as_compiled_flops_per_device"] = cost["flops"]     # loop bodies counted once
    row["as_compiled_bytes_accessed_per_device"] = cost["bytes_accessed"]
    row["fits"] = hbm_bytes is None or peak is None or peak <= hbm_bytes
    text = compiled.as_text() or ""
    row["collectives"] = collectives.collectives(text, mesh_shape or {}, row["loop_trips"])
    row["comm_s"] = collectives.comm_seconds(row["collectives"], target.ici_link_bw_per_device)
    if not row["fits"]:
        buffers = largest_arguments(step) + largest_hlo_values(text)
        row["largest_buffers"] = sorted(buffers, key=lambda x: -x["bytes"])[:4]
    return row


# --- FLOPs with loop trip counts ----------------------------------------------------------------

def layer_sections(stage: str, stage_cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """``{config section: n_layers}`` of the networks a stage builds from config sections."""
    # The engine's network sections, then any other sub-section with n_layers and d_model.
    names = list(registry.ENGINES[stage].model_sections if stage in registry.ENGINES else ())
    names += [k for k, v in stage_cfg.items() if k not in names and isinstance(v, ml_collections.ConfigDict)
              and "n_layers" in v and "d_model" in v]
    if stage == "ppo" and ppo_advantage(stage_cfg) in GROUP_ADVANTAGES:
        names = [n for n in names if n != "value_model"]     # grpo / rloo build no value network
    out = {}
    for name in names:
        section = stage_cfg.get(name)
        if section is not None and "n_layers" in section:
            out[name] = int(section.n_layers)
    return out


def _config_copy(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    try:
        return copy.deepcopy(cfg)
    except Exception:  # noqa: BLE001
        return ml_collections.ConfigDict(cfg.to_dict())


def _set_everywhere(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    for k, v in cfg.items():
        if isinstance(v, ml_collections.ConfigDict):
            _set_everywhere(v, key, value)
        elif k == key:
            with cfg.unlocked():
                cfg[k] = value


def flop_variant_config(stage_cfg: ml_collections.ConfigDict,
                        layers: dict[str, int]) -> ml_collections.ConfigDict:
    """The stage config with the sections' ``n_layers`` set and no chunked head loop."""
    cfg = _config_copy(stage_cfg)
    for section, n in layers.items():
        with cfg[section].unlocked():
            cfg[section].n_layers = n
    _set_everywhere(cfg, "logprob_chunk", 0)
    return cfg


def _steps_with_bodies(program) -> dict[str, Any]:
    """The program's steps plus each loop body as its own entry (after its parent)."""
    out: dict[str, Any] = {}
    for name, step in program.steps.items():
        out[name] = step
        body = getattr(step, "loop_body", None)
        if body is not None and body.name not in program.steps:
            out[body.name] = body
    return out


def lowered_cost(lowered) -> tuple[dict[str, float], str]:
    """Cost analysis of the *unpartitioned, unoptimized* program (global FLOPs), and its source.

    ``Lowered.cost_analysis()`` gives it where the backend implements it (CPU, real TPUs); a
    compile-only TPU client does not, so the same HLO module is analysed with the CPU client.
    Before optimization, a step's FLOPs are exactly affine in each network's depth; after it,
    fusion duplicates cheap producers into several consumers (XLA:CPU recomputes the gradient
    norm inside every parameter's update), which is hardware work but not model FLOPs.
    """
    cost = step_analysis.cost_summary(lowered)
    source = "Lowered.cost_analysis"
    if cost["flops"] is None:
        from jax._src.lib import xla_client
        cpu = jax.local_devices(backend="cpu")[0].client
        computation = lowered.compiler_ir("hlo")
        module = computation.as_hlo_module() if hasattr(computation, "as_hlo_module") else computation
        cost = step_analysis.cost_summary(xla_client._xla.hlo_module_cost_analysis(cpu, module))
        source = "HLO cost analysis (CPU client) of the lowered module"
    return {"flops": cost["flops"] or 0.0, "transcendentals": cost["transcendentals"] or 0.0}, source


def count_flops(stage: str, stage_cfg: ml_collections.ConfigDict, mesh: Mesh, build: Callable,
                program, progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Model FLOPs per call of every step, loop trip counts included (see the module docstring):
    ``{step: {"flops", "flops_method"}}``. Only lowers (traces) the variants: no compiles."""
    sections = layer_sections(stage, stage_cfg)
    if sections:
        groups: dict[int, list[str]] = {}
        for section, n in sections.items():
            groups.setdefault(n, []).append(section)
        base = {s: 1 for s in sections}
        variants = {"base": (flop_variant_config(stage_cfg, base), FLOP_VARIANT_OVERRIDES)}
        for n, members in groups.items():
            if n > 1:
                layers = dict(base, **{s: 2 for s in members})
                variants[f"L{n}"] = (flop_variant_config(stage_cfg, layers), FLOP_VARIANT_OVERRIDES)
        depth = {f"L{n}": n for n in groups}
        method = "layer differencing over " + ", ".join(
            f"{'+'.join(m)} ({n} layers)" for n, m in groups.items())
    else:   # architectures from checkpoint directories: vary every network together
        depths = {m.config.n_layers for m in program.models.values()}
        cfg = flop_variant_config(stage_cfg, {})
        variants = {"base": (cfg, dict(FLOP_VARIANT_OVERRIDES, n_layers=1))}
        n = max(depths)
        if n > 1:
            variants[f"L{n}"] = (cfg, dict(FLOP_VARIANT_OVERRIDES, n_layers=2))
        depth = {f"L{n}": n}
        method = "layer differencing, all networks together" + (
            "" if len(depths) == 1 else f" (INEXACT: networks have {sorted(depths)} layers)")

    costs: dict[str, dict[str, dict[str, float]]] = {}
    source = ""
    for tag, (cfg, overrides) in variants.items():
        if progress:
            progress(f"  {stage}: FLOP variant {tag}")
        variant = build(cfg, mesh, model_overrides=overrides)
        for name, step in _steps_with_bodies(variant).items():
            costs.setdefault(name, {})[tag], source = lowered_cost(step.lower())

    def total(name: str, key: str) -> float:
        per = costs[name]
        value = per["base"][key]
        for tag, n in depth.items():
            if tag in per:
                value += (n - 1) * (per[tag][key] - per["base"][key])
        return value

    out: dict[str, dict[str, Any]] = {}
    for name, step in _steps_with_bodies(program).items():
        if name not in costs:
            continue
        flops = total(name, "flops")
        body = getattr(step, "loop_body", None)
        trips = int(getattr(step, "loop_trips", 1) or 1)
        loop = ""
        if body is not None and body.name in costs and trips > 1:
            flops += (trips - 1) * total(body.name, "flops")
            loop = f"; + ({trips} - 1) x {body.name}"
        out[name] = {"flops": flops, "flops_method": f"{method}{loop}; {source}"}
    return out


# --- a stage, a report --------------------------------------------------------------------------

def _builder(stage: str) -> Callable:
    module_name, _, fn = registry.ENGINES[stage].build.partition(":")
    module = __import__(module_name, fromlist=[fn])
    if not hasattr(module, fn):
        raise CompileError(f"{module_name} has no {fn}(): stage {stage!r} cannot be compiled yet")
    return getattr(module, fn)


def stage_mesh(stage: str, stage_cfg: ml_collections.ConfigDict, target: Target) -> Mesh:
    """The stage's ``mesh.shape`` over the target's devices (topology-aware order on TPU)."""
    shape = tuple(stage_cfg.mesh.shape)
    try:
        shape = resolve_mesh_shape(shape, target.num_devices)
    except ValueError as e:
        raise CompileError(f"{stage}: {e} on {target.name}") from None
    if len(shape) != len(MESH_AXES):
        raise CompileError(f"{stage}: mesh.shape {shape} needs {len(MESH_AXES)} axes {MESH_AXES}")
    devices = None
    if target.platform == "tpu":
        from jax.experimental import mesh_utils
        for split in (False, True):
            try:
                devices = mesh_utils.create_device_mesh(shape, devices=target.devices,
                                                        allow_split_physical_axes=split)
                break
            except Exception:  # noqa: BLE001 - fall back to plain order
                continue
    if devices is None:
        devices = np.array(target.devices).reshape(shape)
    return Mesh(devices, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _analytic(row: dict[str, Any], target: Target, n_dev: int, remat: bool = False) -> None:
    """Seconds of a step on ``target``: ``compute_s`` (the FLOPs the hardware executes, remat's
    recompute included, at peak), ``hbm_s`` (the traffic floor at HBM bandwidth), ``comm_s``
    (its collectives over ICI); ``step_s_overlapped`` = max of the three (everything overlaps),
    ``step_s_serial`` = max(compute, HBM) + communication (no collective overlaps anything);
    ``mfu_overlapped`` / ``mfu_serial``: the model FLOPs utilization at each
    (``step_analysis.mfu_model``)."""
    flops = row.get("flops")
    peak = target.peak_flops_per_device
    if flops is None or not peak:
        return
    row["flops_executed"] = flops * (REMAT_FACTOR if remat else 1.0)
    compute = row["flops_executed"] / (n_dev * peak)
    row["step_time_at_peak_s"] = flops / (n_dev * peak)
    row["compute_s"] = compute
    memory = (row.get("hbm_traffic_per_device") or 0.0) / target.hbm_bw_per_device \
        if target.hbm_bw_per_device else 0.0
    row["hbm_s"] = memory
    roofline = max(compute, memory)
    row["roofline_step_s"] = roofline
    comm = row.get("comm_s")
    row["step_s_overlapped"] = max(roofline, comm or 0.0)
    row["step_s_serial"] = roofline + (comm or 0.0)
    row["bound"] = max((("compute", compute), ("hbm", memory), ("ici", comm or 0.0)),
                       key=lambda kv: kv[1])[0]
    for key in ("overlapped", "serial"):
        row[f"mfu_{key}"] = step_analysis.mfu_model(flops, row[f"step_s_{key}"], n_dev * peak)
    if row.get("tokens") and row["step_s_serial"] > 0:
        row["tokens_per_s"] = row["tokens"] / row["step_s_serial"]


def compile_stage(stage: str, stage_cfg: ml_collections.ConfigDict, target: Target, *,
                  build: Callable | None = None, flops: bool = True,
                  hbm_bytes: int | None = None,
                  progress: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """``({step: row}, stage info)`` for one stage on ``target``."""
    build = build or _builder(stage)
    mesh = stage_mesh(stage, stage_cfg, target)
    try:
        program = build(stage_cfg, mesh)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CompileError(f"{stage}: {_first_line(e)}") from None
    models = {}
    for name, model in program.models.items():
        c = model.config
        n_params = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(_abstract_params(model)))
        models[name] = {"params": n_params, "n_layers": c.n_layers, "d_model": c.d_model,
                        "vocab_size": c.vocab_size, "dtype": c.dtype, "param_dtype": c.param_dtype,
                        "remat": c.remat, "scan_layers": c.scan_layers}
    info = {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "models": models}
    if "sync" in program.steps and "rollout" in program.steps:
        # PPO's sampler: its copy of the policy and the decode loop's KV cache, per device.
        body = program.steps["rollout"].loop_body
        info["sampler"] = {
            "layout": program.plan.roles.sampler.layout,
            "dtype": str(program.plan.roles.sampler.dtype),
            "weights_bytes_per_device": sum(_shard_bytes(x) or 0 for x in jax.tree.leaves(
                program.steps["rollout"].args[0])),
            "kv_cache_bytes_per_device": sum(_shard_bytes(x) or 0 for x in jax.tree.leaves(
                body.args[3])) if body is not None else None}
    rows: dict[str, dict] = {}
    steps = _steps_with_bodies(program)
    for name, step in steps.items():
        if progress:
            progress(f"  {stage}/{name}: compiling")
        rows[name] = compile_step(step, target, hbm_bytes, dict(mesh.shape))
        if name not in program.steps:
            parent = next(n for n, s in program.steps.items()
                          if getattr(s, "loop_body", None) is step)
            rows[name]["loop_body_of"] = parent
        if progress:
            progress(f"  {stage}/{name}: {rows[name]['compile_s']:.1f} s, "
                     f"{_gib(rows[name].get('peak_bytes_per_device'))} GiB/device")
    if flops:
        try:
            counted = count_flops(stage, stage_cfg, mesh, build, program, progress)
        except Exception as e:  # noqa: BLE001 - memory results stay useful without FLOPs
            counted = {}
            info["flops_error"] = _first_line(e)
        for name, extra in counted.items():
            rows[name].update(extra)
    weights = weight_leaf_ids(program)
    for name, step in steps.items():
        if "unaliased_output_bytes" in rows[name]:
            rows[name]["hbm_traffic_per_device"] = hbm_traffic(
                step, weights, mesh, rows[name].pop("unaliased_output_bytes"))
    for name, step in program.steps.items():   # a loop body's traffic, once per trip
        body = getattr(step, "loop_body", None)
        trips = rows[name]["loop_trips"]
        if body is not None and trips > 1 and "hbm_traffic_per_device" in rows[name] and \
                "hbm_traffic_per_device" in rows.get(body.name, {}):
            rows[name]["hbm_traffic_per_device"] += (trips - 1) * rows[body.name][
                "hbm_traffic_per_device"]
    remat = any(m.config.remat for m in program.models.values())
    for name, row in rows.items():
        row.setdefault("flops", None)
        _analytic(row, target, mesh.size, remat=remat and name in GRADIENT_STEPS)
    if stage == "ppo" and "ptx" in rows and "update" in rows:
        rows["ptx"]["included_in"] = "update"     # the update's pretraining half, on its own
    iteration = _iteration(stage, stage_cfg, program, rows, target, mesh.size)
    if iteration:
        info["iteration"] = iteration
    return rows, info


def weight_leaf_ids(program) -> set[int]:
    """``id`` of every network weight among a program's abstract state and frozen trees: the
    leaves under a ``params`` field (not optimizer moments, not the EMA copy) and all frozen ones."""
    ids = {id(leaf) for leaf in jax.tree.leaves(program.frozen)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(program.state):
        if any(getattr(k, "name", getattr(k, "key", None)) == "params" for k in path):
            ids.add(id(leaf))
    return ids


def hbm_traffic(step, weight_ids: set[int], mesh: Mesh, unaliased_output_bytes: int) -> int:
    """A floor on the HBM bytes one device moves in one call of ``step``: every argument read
    once, every output not aliased onto an argument written once, and a weight sharded over
    ``fsdp`` read whole (it is all-gathered before use: the device reads every fsdp shard, not
    only its own; tensor-parallel shards stay its own)."""
    fsdp = int(mesh.shape.get("fsdp", 1))
    total = 0
    for arg in step.args:
        for leaf in jax.tree.leaves(arg):
            nbytes = _shard_bytes(leaf) or 0
            spec = getattr(getattr(leaf, "sharding", None), "spec", ())
            axes = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
            if id(leaf) in weight_ids and "fsdp" in axes:
                nbytes *= fsdp
            total += nbytes
    return total + unaliased_output_bytes


def ppo_advantage(stage_cfg: Any) -> str:
    """A PPO stage config's ``ppo.advantage`` ("gae" for a config with no ``ppo`` section)."""
    ppo = stage_cfg.get("ppo") if hasattr(stage_cfg, "get") else None
    return str(ppo.advantage) if ppo is not None and hasattr(ppo, "get") else "gae"


def _iteration(stage: str, stage_cfg: Any, program, rows: dict, target: Target,
               n_dev: int) -> dict[str, Any] | None:
    """One PPO iteration: rollout + experience + epochs x minibatches policy and value updates
    (the ``ptx`` step is part of ``update`` and the decode body part of ``rollout``; grpo / rloo
    have no ``value_update``). One DPO iteration (a batch): ``ref_logps`` + ``update`` (the
    stage's ``calls_per_iteration``; ``eval`` runs only every ``eval_every`` steps)."""
    needed = {"dpo": {"update"}, "ppo": {"rollout", "experience", "update"}}.get(stage)
    if needed is None or not needed <= set(rows):
        return None
    calls = {k: int(n) for k, n in program.calls_per_iteration.items()
             if n and k in rows and k != "ptx"}     # ptx: a part of each update
    out: dict[str, Any] = {"calls": calls}
    by_kind: dict[tuple, dict[str, Any]] = {}
    for k, n in calls.items():
        for c in rows[k].get("collectives", ()):
            key = (c["kind"], tuple(c["axes"]))
            agg = by_kind.setdefault(key, {"kind": c["kind"], "axes": c["axes"], "count": 0,
                                           "bytes_per_device": 0.0})
            agg["count"] += n * c["count"]
            agg["bytes_per_device"] += n * c["bytes_per_device"]
    out["collectives"] = sorted(by_kind.values(), key=lambda c: -c["bytes_per_device"])
    if all(rows[k].get("comm_s") is not None for k in calls):
        out["comm_s"] = sum(n * rows[k]["comm_s"] for k, n in calls.items())
    if all(rows[k].get("flops") is not None for k in calls):
        out["flops"] = sum(n * rows[k]["flops"] for k, n in calls.items())
        out["flops_executed"] = sum(n * rows[k].get("flops_executed", rows[k]["flops"])
                                    for k, n in calls.items())
        if all("step_s_serial" in rows[k] for k in calls):
            peak = n_dev * target.peak_flops_per_device
            for key in ("roofline_step_s", "step_s_overlapped", "step_s_serial"):
                out[key] = sum(n * rows[k][key] for k, n in calls.items())
            out["roofline_s"] = out.pop("roofline_step_s")
            for key in ("overlapped", "serial"):
                out[f"mfu_{key}"] = step_analysis.mfu_model(out["flops"], out[f"step_s_{key}"], peak)
            out["share_of_time"] = {k: n * rows[k]["step_s_serial"] / out["step_s_serial"]
                                    for k, n in calls.items()}
    return out


def _abstract_params(model) -> Any:
    from rlhf_jax.models.params import abstract_params
    return abstract_params(model)


def _in_all(cfg: ml_collections.ConfigDict, stage: str) -> bool:
    """``--stage all``: every stage the pipeline runs by default; a pipeline config's dpo only
    when its ``methods`` name it (a single DPO config's is its one stage)."""
    if stage not in registry.METHOD_STAGES or "sft" not in cfg:
        return True
    return stage in tuple(cfg.get("methods") or ())


def select_stages(cfg: ml_collections.ConfigDict, stage: str) -> dict[str, ml_collections.ConfigDict]:
    """The stage configs to compile (``stage`` is sft, rm, ppo, dpo or all)."""
    try:
        configs = stage_configs(cfg, methods=True)
    except (ValueError, KeyError, FileNotFoundError, AttributeError) as e:
        raise CompileError(f"config: {_first_line(e)}") from None
    if stage in (None, "", "all"):
        return {s: configs[s] for s in registry.ENGINE_ORDER if s in configs and _in_all(cfg, s)}
    if stage not in configs:
        raise CompileError(f"stage {stage!r} is not in the config (it has: "
                           f"{', '.join(configs) or 'none'})")
    return {stage: configs[stage]}


def compile_report(cfg: ml_collections.ConfigDict, topology: str, stage: str = "all", *,
                   flops: bool = True, builders: dict[str, Callable] | None = None,
                   hbm_bytes: int | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The report dict: every step of the chosen stage(s) compiled for ``topology``.

    ``builders`` replaces a stage's ``build`` (tests); ``hbm_bytes`` replaces the per-device
    capacity (tests of the does-not-fit path).
    """
    target = get_target(topology)
    configs = select_stages(cfg, stage)
    capacity = target.hbm_bytes_per_device if hbm_bytes is None else hbm_bytes
    report: dict[str, Any] = {
        "topology": target.name, "platform": target.platform, "device_kind": target.device_kind,
        "num_devices": target.num_devices,
        "num_chips": target.num_devices // target.devices_per_chip,
        "hbm_bytes_per_device": capacity,
        "hbm_source": "given" if hbm_bytes is not None else target.hbm_source,
        "peak_flops_per_device": target.peak_flops_per_device,
        "hbm_bandwidth_per_device": target.hbm_bw_per_device,
        "jax_version": jax.__version__,
        "compile_host_cpus": os.cpu_count(),       # compile_s depends on this machine
        "stages": {}, "stage_info": {},
    }
    for name, stage_cfg in configs.items():
        if progress:
            progress(f"{name}: building for {target.name}")
        build = (builders or {}).get(name)
        rows, info = compile_stage(name, stage_cfg, target, build=build, flops=flops,
                                   hbm_bytes=capacity, progress=progress)
        report["stages"][name] = rows
        report["stage_info"][name] = info
    report["fits"] = all(r.get("fits") for rows in report["stages"].values() for r in rows.values())
    return report


# --- text ---------------------------------------------------------------------------------------

def _gib(nbytes: float | None) -> str:
    return "?" if nbytes is None else f"{nbytes / GiB:.2f}"


def _fmt_bytes(nbytes: float | None) -> str:
    if nbytes is None:
        return "?"
    for unit, size in (("GiB", GiB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if nbytes >= 0.1 * size:
            return f"{nbytes / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(nbytes)} B"


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def format_table(report: dict[str, Any]) -> str:
    """A readable per-step table of a report."""
    cap = report.get("hbm_bytes_per_device")
    lines = [f"topology {report['topology']} ({report['num_devices']} devices, {report['device_kind']}); "
             f"HBM {_gib(cap)} GiB/device ({report.get('hbm_source')})"
             + (f", peak {report['peak_flops_per_device'] / 1e12:.0f} TFLOP/s/device"
                if report.get("peak_flops_per_device") else "")]
    header = (f"{'stage':<5} {'step':<11} {'fits':<4} {'peak GiB':>9} {'HBM%':>5} {'args':>7} "
              f"{'temp':>7} {'TFLOP/step':>11} {'compute':>9} {'HBM':>9} {'ICI':>9} "
              f"{'overlap':>9} {'serial':>9} {'bound':>7} {'mfu o/s':>9} {'compile':>8}")
    lines += [header, "-" * len(header)]
    for stage, rows in report["stages"].items():
        mesh = report.get("stage_info", {}).get(stage, {}).get("mesh", {})
        for name, r in rows.items():
            peak = r.get("peak_bytes_per_device")
            pct = f"{100 * peak / cap:.0f}" if peak and cap else "-"
            flops = r.get("flops")
            label = f"{name}*" if "loop_body_of" in r else (
                f"{name}+" if "included_in" in r else name)
            lines.append(
                f"{stage:<5} {label:<11} {'yes' if r.get('fits') else 'NO':<4} {_gib(peak):>9} "
                f"{pct:>5} {_gib(r.get('argument_bytes')):>7} {_gib(r.get('temp_bytes')):>7} "
                f"{'-' if flops is None else f'{flops / 1e12:.2f}':>11} "
                f"{_fmt_time(r.get('compute_s')):>9} {_fmt_time(r.get('hbm_s')):>9} "
                f"{_fmt_time(r.get('comm_s')):>9} {_fmt_time(r.get('step_s_overlapped')):>9} "
                f"{_fmt_time(r.get('step_s_serial')):>9} {r.get('bound', '-'):>7} "
                f"{_pct(r.get('mfu_overlapped')) + '/' + _pct(r.get('mfu_serial')):>9} "
                f"{r.get('compile_s', 0):>7.1f}s")
        info = report.get("stage_info", {}).get(stage, {})
        if mesh:
            lines.append(f"{'':<5} mesh {mesh}")
        sampler = info.get("sampler")
        if sampler:
            lines.append(f"{'':<5} sampler: {sampler['layout']} layout, {sampler['dtype']}: weights "
                         f"{_gib(sampler['weights_bytes_per_device'])} GiB + KV cache "
                         f"{_gib(sampler['kv_cache_bytes_per_device'])} GiB per device")
        it = info.get("iteration", {})
        if "step_s_serial" in it:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in it["share_of_time"].items())
            lines.append(f"{'':<5} one iteration ({it['calls'].get('update', 0)} updates): "
                         f"{it['flops'] / 1e12:.1f} TFLOP, ICI {_fmt_time(it.get('comm_s'))}, "
                         f"step {_fmt_time(it['step_s_overlapped'])} overlapped .. "
                         f"{_fmt_time(it['step_s_serial'])} serial, mfu "
                         f"{_pct(it.get('mfu_overlapped'))} .. {_pct(it.get('mfu_serial'))} "
                         f"(serial time: {shares})")
        if info.get("flops_error"):
            lines.append(f"{'':<5} FLOPs not counted: {info['flops_error']}")
    if any("loop_body_of" in r for rows in report["stages"].values() for r in rows.values()):
        lines.append("* a loop body (one decode token), compiled on its own; its FLOPs are "
                     "included (x loop trips) in its parent step's")
    if any("included_in" in r for rows in report["stages"].values() for r in rows.values()):
        lines.append("+ part of another step (PPO's ptx gradient is inside update), compiled on "
                     "its own to show its share")
    lines.append("compute: executed FLOPs (remat included) / (devices x peak); HBM: traffic "
                 "floor / bandwidth; ICI: the step's collectives / link bandwidth; overlap = "
                 "max of the three, serial = max(compute, HBM) + ICI; mfu o/s = model FLOPs / "
                 "(devices x peak x overlap / serial)")
    return "\n".join(lines)


def not_fitting(report: dict[str, Any]) -> list[str]:
    """One line per step that does not fit: stage, step, needed vs available, largest buffers."""
    cap = report.get("hbm_bytes_per_device")
    lines = []
    for stage, rows in report["stages"].items():
        for name, r in rows.items():
            if r.get("fits"):
                continue
            need = r.get("peak_bytes_per_device")
            buffers = ", ".join(f"{b['name']} {b['shape']} {_fmt_bytes(b['bytes'])}"
                                for b in r.get("largest_buffers", [])[:3])
            what = ("compile failed: " + r["error"]) if r.get("compile_failed") else (
                f"needs {_fmt_bytes(need)} per device, {_fmt_bytes(cap)} available")
            lines.append(f"{stage}/{name} does not fit on {report['topology']}: {what}"
                         + (f"; largest buffers: {buffers}" if buffers else ""))
    return lines


def run(args: Any, overrides: list[str]) -> int:
    """``rlhf-jax compile``: the table on stdout, the JSON report to ``--out``; exit 4 when a step
    does not fit (one line per step on stderr). Bad input raises a UserError (exit 2)."""
    from rlhf_jax.config import apply_overrides, load_config
    cfg = apply_overrides(load_config(args.config), overrides)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = compile_report(cfg, args.topology, getattr(args, "stage", "all") or "all",
                            progress=progress)
    report["config"] = args.config
    report["overrides"] = list(overrides)
    print(format_table(report))
    if getattr(args, "out", None):
        if jax.process_index() == 0:
            storage.write_text(args.out, json.dumps(report, indent=2, sort_keys=False, default=str))
        print(f"report written to {args.out}")
    problems = not_fitting(report)
    for line in problems:
        print(f"rlhf-jax: error: {line}", file=sys.stderr)
    return errors.EXIT_DOES_NOT_FIT if problems else errors.EXIT_OK
