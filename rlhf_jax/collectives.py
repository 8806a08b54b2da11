"""The collectives of a compiled step, read from its optimized HLO, and the time they take.

``rlhf-jax compile`` reports what a step computes and what it reads from HBM; on a pod the third
cost is what the chips send each other. XLA's cost analysis does not count it, so it is read
here from ``compiled.as_text()``:

* every ``all-gather``, ``all-reduce``, ``reduce-scatter``, ``all-to-all`` and
  ``collective-permute`` (and their async ``-start`` halves), with the bytes one device sends
  over the ring a collective of that kind runs (``n`` devices in its group, result ``S`` bytes
  per device): all-gather ``(n-1)/n * S``, reduce-scatter ``(n-1) * S``, all-reduce
  ``2 (n-1)/n * S``, all-to-all ``(n-1)/n * S``, collective-permute ``S``;
* the mesh axes it runs over (the device ids of its first replica group, laid out on the mesh);
* how many times it runs per call: a collective inside a ``while`` body runs once per trip. XLA:CPU
  records the trip count of a loop it can bound (``known_trip_count``: the layer scan, the
  chunked LM head); XLA:TPU does not, and the count is read from the loop's condition
  (``i < 32``; the decode loop's ``step < max_new_tokens``: every response at full length, the
  bound the buffers are sized for); a loop with neither runs the step's ``loop_trips``.

Time: each collective's bytes over the bandwidth a device has along its axes. A ring over one
torus axis sends both ways at once, so a device has ``2 * link`` bytes/s along an axis
(``link``: one ICI link, one direction: per-chip bidirectional ICI / ports / 2, Google's
figures in ``compile.CHIPS``), and a collective over several axes runs each axis's ring
(``2 * link`` per axis). That is an estimate, not a schedule: XLA may overlap collectives with
compute (``step_s_overlapped``) or not (``step_s_serial``), and the physical layout of mesh axes
on the torus decides how many links an axis really has.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|\w+\[[^\]]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>[\w\-]+)\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_CALLEE = re.compile(r"(?:body|condition|calls|to_apply|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_INT_CONSTANT = re.compile(r"=\s*[su](?:32|64)\[\]\S*\s+constant\((\d+)\)")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
# Newer XLA names groups by a mesh of its own: replica_groups=mesh['axis_0'=1,'axis_1'=4],
# device_ids=([2,2]T(1,0)) {'axis_1'}: the device ids laid out on that mesh, the axes a group spans.
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*,\s*device_ids=\(\[([\d,]+)\]"
                          r"(?:T\(([\d,]+)\))?\)\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{(\{\d+,\d+\}(?:,\{\d+,\d+\})*)\}")


def shape_bytes(shape: str) -> list[float]:
    """Bytes of each array in an HLO shape (a tuple gives several)."""
    return [math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES.get(dtype, 4)
            for dtype, dims in _ARRAY.findall(shape) if dtype in DTYPE_BYTES]


def first_group(line: str) -> list[int] | None:
    """Device ids of the collective's first replica group (explicit or iota form)."""
    m = _GROUPS_LIST.search(line)
    if m:
        return [int(x) for x in m.group(1).split("},{")[0].strip("{}").split(",") if x]
    m = _GROUPS_MESH.search(line)
    if m:
        axes = [(name.strip().strip("'"), int(size)) for name, size in
                (a.split("=") for a in m.group(1).split(",") if "=" in a)]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        ids = ids.reshape([size for _, size in axes])
        spanned = {a.strip().strip("'") for a in m.group(4).split(",")}
        index = tuple(slice(None) if name in spanned else 0 for name, _ in axes)
        return ids[index].ravel().tolist()
    m = _GROUPS_IOTA.search(line)
    if m:
        groups = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(groups[0], -1)[0].tolist() if len(groups) > 1 else ids.ravel().tolist()
    m = _PAIRS.search(line)
    if m:
        a, b = (int(x) for x in m.group(1).split("},{")[0].strip("{}").split(","))
        return [a, b]
    return None


def group_axes(group: list[int] | None, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes along which a group's devices differ (ids are positions in the mesh's
    row-major device order, as the step's device assignment lists them)."""
    if not group or len(group) < 2 or not mesh_shape:
        return ()
    names, dims = list(mesh_shape), list(mesh_shape.values())
    if max(group) >= math.prod(dims):
        return ()
    coords = np.array(np.unravel_index(np.asarray(group), dims)).T
    return tuple(n for i, n in enumerate(names) if len(set(coords[:, i])) > 1)


def sent_bytes(kind: str, result_bytes: float, n: int) -> float:
    """Bytes one device sends for one collective of ``kind`` over ``n`` devices (ring)."""
    if n < 2:
        return 0.0
    return {"all-gather": (n - 1) / n * result_bytes,
            "reduce-scatter": (n - 1) * result_bytes,
            "all-reduce": 2 * (n - 1) / n * result_bytes,
            "all-to-all": (n - 1) / n * result_bytes,
            "collective-permute": result_bytes}[kind]


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif current is not None:
            if line.strip() == "}":
                current = None
            else:
                comps[current].append(line)
    return comps, entry


def loop_trips(while_line: str, comps: dict[str, list[str]]) -> int | None:
    """A while loop's trip count: XLA's ``known_trip_count`` (XLA:CPU records it), else the
    one integer constant its condition compares the counter with (``i < 32``: XLA:TPU's layer
    scans; the decode loop's ``step < max_new_tokens`` bound), else None."""
    trips = _TRIPS.search(while_line)
    if trips:
        return int(trips.group(1))
    cond = _CONDITION.search(while_line)
    if cond is None:
        return None
    lines = comps.get(cond.group(1), ())
    if not any("direction=LT" in line for line in lines):
        return None
    constants = {int(m.group(1)) for line in lines for m in [_INT_CONSTANT.search(line)] if m}
    return constants.pop() if len(constants) == 1 else None


def multiplicities(comps: dict[str, list[str]], entry: str | None,
                   unknown_trips: int = 1) -> dict[str, tuple[int, bool]]:
    """``{computation: (runs per call, inside a loop of unknown trip count)}``: a while body
    runs its trip count times (``loop_trips``; ``unknown_trips`` when it cannot be read)."""
    out: dict[str, tuple[int, bool]] = {}
    if entry is None:
        return out
    stack = [(entry, 1, False)]
    while stack:
        name, mult, unknown = stack.pop()
        if name in out and out[name][0] >= mult:
            continue
        out[name] = (mult, unknown)
        for line in comps.get(name, ()):
            callees = _CALLEE.findall(line)
            branches = _BRANCHES.search(line)
            if branches:
                callees += [c.strip().lstrip("%") for c in branches.group(1).split(",")]
            if not callees:
                continue
            trips = loop_trips(line, comps) if " while(" in line else None
            for callee in callees:
                is_body = f"body=%{callee}" in line or f"body={callee}" in line
                if is_body:
                    n = trips if trips is not None else unknown_trips
                    stack.append((callee, mult * n, unknown or trips is None))
                else:
                    stack.append((callee, mult, unknown))
    return out


def collectives(hlo_text: str, mesh_shape: dict[str, int],
                unknown_trips: int = 1) -> list[dict[str, Any]]:
    """``[{kind, count, bytes_per_device, axes, group_size, in_loop}]``, one row per
    (kind, axes, group size): ``count`` runs per call of the step (loop trips included),
    ``bytes_per_device`` what one device sends for all of them."""
    comps, entry = _computations(hlo_text)
    mult = multiplicities(comps, entry, unknown_trips)
    rows: dict[tuple, dict[str, Any]] = {}
    for name, lines in comps.items():
        if name not in mult:
            continue
        runs, unknown = mult[name]
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            op = m.group("op")
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in KINDS or op.endswith("-done"):
                continue
            sizes = shape_bytes(m.group("shape"))
            if not sizes:
                continue
            if op.endswith("-start") and len(sizes) > 1:
                # async: (operands..., results..., [contexts]); the result is the gathered
                # buffer for all-gather, the operand-sized one otherwise.
                result = max(sizes) if base == "all-gather" else sizes[0]
            else:
                result = sum(sizes)
            group = first_group(line)
            n = len(group) if group else 1
            axes = group_axes(group, mesh_shape)
            key = (base, axes, n, runs > 1 or unknown)
            row = rows.setdefault(key, {"kind": base, "count": 0, "bytes_per_device": 0.0,
                                        "axes": list(axes), "group_size": n,
                                        "in_loop": runs > 1 or unknown})
            row["count"] += runs
            row["bytes_per_device"] += runs * sent_bytes(base, result, n)
    return sorted(rows.values(), key=lambda r: -r["bytes_per_device"])


def comm_seconds(rows: list[dict[str, Any]], link_bytes_per_s: float | None) -> float | None:
    """Seconds of the collectives, one after another, with ``2 * link`` bytes/s per axis."""
    if link_bytes_per_s is None:
        return None
    total = 0.0
    for row in rows:
        axes = max(1, len(row["axes"]))
        total += row["bytes_per_device"] / (2 * link_bytes_per_s * axes)
    return total

