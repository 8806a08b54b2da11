"""Collectives read from compiled HLO: kinds, bytes per device, mesh axes, loop trips."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax import collectives as C

# Two loops: a body run 4 times (known trip count) holding an all-gather and an async
# all-reduce, inside it a nested body run 3 times holding a collective-permute; a loop XLA
# cannot bound holding a reduce-scatter; and a tuple all-reduce in the entry computation.
HLO = """HloModule m, entry_computation_layout={()->f32[]}

%inner (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %cp = f32[8]{0} collective-permute(f32[8]{0} %x), channel_id=4, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  ROOT %t = (s32[], f32[8]) tuple(%i, %cp)
}

%outer (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]) parameter(0)
  %ag = bf16[16,32]{1,0} all-gather(bf16[4,32]{1,0} %a), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %ars = f32[64]{0} all-reduce-start(f32[64]{0} %b), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add
  %ard = f32[64]{0} all-reduce-done(f32[64]{0} %ars)
  %w = (s32[], f32[8]) while(%t0), condition=%c, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %t = (s32[], f32[16]) tuple(%i, %q)
}

%unbounded (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %rs = f32[4]{0} reduce-scatter(f32[8]{0} %z), channel_id=5, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true, to_apply=%add
  ROOT %t = (s32[], f32[4]) tuple(%i, %rs)
}

ENTRY %main () -> f32[] {
  %w1 = (s32[], f32[16]) while(%t1), condition=%c, body=%outer, backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"4"}}
  %w2 = (s32[], f32[4]) while(%t2), condition=%c, body=%unbounded
  %ar = (f32[10]{0}, bf16[6]{0}) all-reduce(f32[10]{0} %u, bf16[6]{0} %v), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  ROOT %r = f32[] constant(0)
}
"""
MESH = {"data": 2, "fsdp": 4, "tensor": 1}


def by_kind(rows):
    """The rows of every kind but all-reduce (which has two: in the loop and once)."""
    return {r["kind"]: r for r in rows if r["kind"] != "all-reduce"}


def test_hand_written_module_golden():
    rows = by_kind(C.collectives(HLO, MESH, unknown_trips=7))
    # all-gather: bf16[16,32] = 1024 B gathered over 4 devices (fsdp), 4 trips.
    ag = rows["all-gather"]
    assert (ag["count"], ag["group_size"], ag["axes"], ag["in_loop"]) == (4, 4, ["fsdp"], True)
    assert ag["bytes_per_device"] == pytest.approx(4 * 3 / 4 * 1024)
    # async all-reduce: f32[64] = 256 B over {0, 4}: the data axis, 2 (n-1)/n = 1 x 256, 4 trips.
    ar_loop = [r for r in C.collectives(HLO, MESH, 7) if r["kind"] == "all-reduce" and r["in_loop"]]
    assert len(ar_loop) == 1 and ar_loop[0]["axes"] == ["data"] and ar_loop[0]["count"] == 4
    assert ar_loop[0]["bytes_per_device"] == pytest.approx(4 * 256)
    # collective-permute: f32[8] = 32 B per run, 4 x 3 runs, pairs {0,1}: fsdp.
    cp = rows["collective-permute"]
    assert (cp["count"], cp["axes"]) == (12, ["fsdp"])
    assert cp["bytes_per_device"] == pytest.approx(12 * 32)
    # reduce-scatter in a loop without a known trip count: the caller's bound (7); groups
    # [4,2]<=[2,4]T(1,0) -> {0, 4}: the data axis; (n-1) x result (16 B).
    rs = rows["reduce-scatter"]
    assert (rs["count"], rs["axes"], rs["group_size"]) == (7, ["data"], 2)
    assert rs["bytes_per_device"] == pytest.approx(7 * 1 * 16)
    # tuple all-reduce once, over all 8 devices: (40 + 12) B x 2 x 7/8.
    ar_once = [r for r in C.collectives(HLO, MESH, 7) if r["kind"] == "all-reduce" and not r["in_loop"]]
    assert ar_once[0]["axes"] == ["data", "fsdp"] and ar_once[0]["count"] == 1
    assert ar_once[0]["bytes_per_device"] == pytest.approx(52 * 2 * 7 / 8)


def test_iota_groups_and_axes():
    assert C.first_group("replica_groups=[2,4]<=[8], x") == [0, 1, 2, 3]
    assert C.first_group("replica_groups=[4,2]<=[4,2]T(1,0), x") == [0, 2]
    assert C.first_group("replica_groups=[4,2]<=[2,2,2]T(2,1,0), x") == [0, 4]
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    assert C.group_axes([0, 4], mesh) == ("data",)
    assert C.group_axes([0, 2], mesh) == ("fsdp",)
    assert C.group_axes([0, 1, 2, 3], mesh) == ("fsdp", "tensor")
    assert C.shape_bytes("(f32[2,3]{1,0}, bf16[4])") == [24, 8]
    # XLA's mesh form: iota([2,4]) transposed, [[0,4],[1,5],[2,6],[3,7]], laid on a [1,4,1,2]
    # mesh; the group spanning axis_1 at axis_3 = 0 is [0,1,2,3]: our fsdp axis at data 0.
    line = ("replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=1,'axis_3'=2], "
            "device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={1}")
    assert C.first_group(line) == [0, 1, 2, 3]
    assert C.group_axes([0, 1, 2, 3], {"data": 2, "fsdp": 4, "tensor": 1}) == ("fsdp",)
    both = line.replace("{'axis_1'}", "{'axis_1','axis_3'}")
    assert sorted(C.first_group(both)) == list(range(8))


def test_comm_seconds_uses_both_directions_of_every_axis():
    rows = [{"kind": "all-gather", "bytes_per_device": 1e9, "axes": ["fsdp"]},
            {"kind": "all-reduce", "bytes_per_device": 1e9, "axes": ["data", "fsdp"]}]
    link = 50e9
    assert C.comm_seconds(rows, link) == pytest.approx(1e9 / 100e9 + 1e9 / 200e9)
    assert C.comm_seconds(rows, None) is None


def test_a_compiled_fsdp_scan_gathers_its_weight_once_per_layer():
    """A scanned layer whose weight is sharded over fsdp: XLA gathers it inside the loop body,
    so the gather runs once per layer; the count and the bytes follow from the shapes."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
    layers, d = 3, 64
    w = jax.ShapeDtypeStruct((layers, d, d), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "fsdp", None)))
    x = jax.ShapeDtypeStruct((8, d), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))

    def forward(w, x):
        def layer(h, wl):
            wl = jax.lax.with_sharding_constraint(wl, NamedSharding(mesh, P()))  # gather
            return jnp.tanh(h @ wl), None
        return jax.lax.scan(layer, x, w)[0]

    compiled = jax.jit(forward, out_shardings=NamedSharding(mesh, P("data", None))).lower(
        w, x).compile()
    rows = C.collectives(compiled.as_text(), dict(mesh.shape))
    gathers = [r for r in rows if r["kind"] == "all-gather"]
    assert gathers, rows
    total = sum(r["count"] for r in gathers)
    assert total == layers or total == 1, rows     # in the body (L) or hoisted out (once, whole)
    sent = sum(r["bytes_per_device"] for r in gathers)
    per_layer = d * d * 4 * 3 / 4                  # (n-1)/n of a layer's f32 weight, n = 4
    assert sent == pytest.approx(layers * per_layer)
    assert all(r["axes"] == ["fsdp"] for r in gathers)


def test_trip_count_from_the_loop_condition_when_xla_records_none():
    """XLA:TPU writes no known_trip_count: the bound is the constant the condition compares
    the counter with (the layer scan's 32, the decode loop's max_new_tokens)."""
    hlo = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(32)
  %p = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %ar = f32[8]{0:T(256)} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, use_global_device_ids=true, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

ENTRY %main () -> f32[] {
  %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[] constant(0)
}
"""
    rows = C.collectives(hlo, {"data": 2, "fsdp": 1, "tensor": 1}, unknown_trips=999)
    assert len(rows) == 1 and rows[0]["count"] == 32 and rows[0]["in_loop"]
    assert rows[0]["bytes_per_device"] == pytest.approx(32 * 32)     # 2 (n-1)/n x 32 B, n = 2
