"""LoRA (Hu et al. 2021) on the transformer's parameter pytree, as pure functions.

The model code is not touched: ``apply_lora(params, lora)`` returns an ordinary parameter tree
whose target kernels are ``W + scale * A @ B``, and the unchanged ``Transformer`` runs on it::

    lora = init_lora(params, rng, rank=8, alpha=16.0, targets=("attn", "mlp"))
    logits = model.apply({"params": apply_lora(params, lora)}, ids, mask)
    grads = jax.grad(lambda l: loss(apply_lora(params, l)))(lora)   # base params stay frozen

The same call is the merge for export (``save_pretrained(apply_lora(params, lora))``), and the
reference model of DPO / GRPO / PPO is simply ``params`` (adapters off): no second copy.

Targets are the ``Projection`` kernels of each block (see ``transformer.py``)::

    attn/q, attn/k, attn/v  kernel [D, H|KV, Dh]   A [D, r]       B [r, H|KV, Dh]
    attn/o                  kernel [H, Dh, D]      A [H, Dh, r]   B [r, D]
    mlp/fc_in, gate, up     kernel [D, F]          A [D, r]       B [r, F]
    mlp/fc_out, down        kernel [F, D]          A [F, r]       B [r, D]

i.e. A contracts the kernel's input dims (those the layer contracts with x) and B produces its
output dims, so ``A @ B`` has the kernel's shape. With ``scan_layers`` the kernels under
``layers`` carry a leading layer axis [L, ...], and so do their A and B (one adapter per layer).
Embeddings, norms, biases and the LM / score heads are never adapted.

A is N(0, 1 / fan_in) and B is zero, so a fresh adapter leaves the model exactly unchanged and
only B receives a gradient on the first step. Adapters are float32 whatever the base dtype; the
merged kernel is computed in float32 and cast back to the kernel's dtype (with bf16 base weights
a tiny update can round away in the merged kernel: merge only for export, train on
``apply_lora`` inside the step, where the rounding is the same as for a bf16 full fine-tune).

``apply_lora`` materialises the adapted kernels (one extra copy of the targeted weights, inside
the jitted step); nothing here places or shards the adapters (they are small; replicate them or
give them the kernel's input/output shardings).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any, Union

import flax.struct
import jax
import jax.numpy as jnp

PyTree = Any
Path = tuple[str, ...]

TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q", "k", "v", "o"),
    "mlp": ("fc_in", "fc_out", "gate", "up", "down"),   # GELU: fc_in/out; SwiGLU: gate/up/down
}
ALL_TARGETS: tuple[str, ...] = TARGET_GROUPS["attn"] + TARGET_GROUPS["mlp"]
_BLOCK_OF = {name: block for block, names in TARGET_GROUPS.items() for name in names}
_KERNEL_NDIM = {"attn": 3, "mlp": 2}      # without the scan layer axis
_IN_DIMS = {"o": 2}                        # contracted kernel dims; every other target has 1
STACKED_KEY = "layers"                     # scan_layers' stacked block (see params.stack_layers)


@flax.struct.dataclass
class LoRA:
    """Adapters and their scale.

    ``adapters`` mirrors the parameter tree down to each target module, whose ``kernel`` is
    replaced by ``{"a": A, "b": B}`` (e.g. ``adapters["layer_0"]["attn"]["q"]["a"]``). ``scale``
    (alpha / rank) is static metadata, not a leaf: ``jax.grad``, optax and ``jax.tree.map`` see
    only A and B, and a gradient tree is again a ``LoRA`` with the same scale.
    """
    adapters: dict
    scale: float = flax.struct.field(pytree_node=False, default=1.0)

    @property
    def rank(self) -> int:
        return jax.tree.leaves(self.adapters)[0].shape[-1]


def expand_targets(targets: Union[str, Iterable[str]]) -> tuple[str, ...]:
    """Target names, with the groups "attn", "mlp" and "all" expanded; unknown names raise."""
    if isinstance(targets, str):
        targets = (targets,)
    names: list[str] = []
    for name in targets:
        if name == "all":
            names.extend(ALL_TARGETS)
        elif name in TARGET_GROUPS:
            names.extend(TARGET_GROUPS[name])
        elif name in _BLOCK_OF:
            names.append(name)
        else:
            raise ValueError(f"unknown LoRA target {name!r}; expected some of {list(ALL_TARGETS)} "
                             f"or a group {sorted(TARGET_GROUPS) + ['all']}")
    return tuple(dict.fromkeys(names))


def _layer_axes(path: Path) -> int:
    """1 for kernels stacked over layers (``layers/...``), else 0."""
    return int(path[0] == STACKED_KEY)


def lora_targets(params: PyTree, targets: Union[str, Iterable[str]] = ALL_TARGETS) -> list[Path]:
    """Paths of the modules whose ``kernel`` the adapters act on, e.g. ``("layer_0", "attn", "q")``.

    Raises if no kernel matches (say, "gate" on a GELU model) or a kernel has an unexpected rank.
    """
    wanted = set(expand_targets(targets))
    found: list[Path] = []

    def visit(node: Mapping, path: Path) -> None:
        for key, child in node.items():
            child_path = path + (key,)
            if not isinstance(child, Mapping):
                continue
            if (key in wanted and len(path) >= 1 and path[-1] == _BLOCK_OF[key]
                    and "kernel" in child):
                expected = _layer_axes(child_path) + _KERNEL_NDIM[_BLOCK_OF[key]]
                if len(child["kernel"].shape) != expected:
                    raise ValueError(f"kernel {'/'.join(child_path)} has shape "
                                     f"{child['kernel'].shape}; expected {expected} dims")
                found.append(child_path)
            else:
                visit(child, child_path)

    visit(params, ())
    if not found:
        raise ValueError(f"no LoRA target among {sorted(wanted)} in this parameter tree")
    return sorted(found)


def _get(tree: Mapping, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_lora(params: PyTree, rng: jax.Array, rank: int, alpha: float,
              targets: Union[str, Iterable[str]] = ALL_TARGETS, dtype: Any = jnp.float32) -> LoRA:
    """Fresh adapters for ``targets``: A ~ N(0, 1/fan_in), B = 0, scale = alpha / rank.

    ``params`` may be arrays or ``ShapeDtypeStruct``s (only shapes are read), stacked
    (``scan_layers``) or not. All A come from one normal draw of ``rng``, laid out in the
    sorted order of ``lora_targets`` (one jitted program: a random op per target would compile
    one threefry each, seconds on CPU).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    specs = []   # (path, n_lead, lead + in_shape, out_shape, fan_in)
    for path in lora_targets(params, targets):
        shape = tuple(_get(params, path)["kernel"].shape)
        n_lead, in_dims = _layer_axes(path), _IN_DIMS.get(path[-1], 1)
        in_shape = shape[n_lead:n_lead + in_dims]
        specs.append((path, n_lead, shape[:n_lead + in_dims], shape[n_lead + in_dims:],
                      math.prod(in_shape)))

    adapters = _draw_adapters(rng, tuple(specs), rank, jnp.dtype(dtype))
    return LoRA(adapters=adapters, scale=float(alpha) / rank)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_adapters(key: jax.Array, specs: tuple, rank: int, dtype: Any) -> dict:
    """The adapters of ``init_lora`` (compiled once per layout: ``specs`` is hashable)."""
    sizes = [math.prod(lead_in) * rank for _, _, lead_in, _, _ in specs]
    flat = jax.random.normal(key, (sum(sizes),), dtype)
    adapters: dict = {}
    offset = 0
    for (path, n_lead, lead_in, out_shape, fan_in), size in zip(specs, sizes):
        a = flat[offset:offset + size].reshape(lead_in + (rank,)) / math.sqrt(fan_in)
        b = jnp.zeros(lead_in[:n_lead] + (rank,) + out_shape, dtype)
        _set(adapters, path, {"a": a, "b": b})
        offset += size
    return adapters


def lora_delta(a: jax.Array, b: jax.Array, n_lead: int = 0) -> jax.Array:
    """``A @ B`` in float32 with the kernel's shape: [*lead, *in, r] x [*lead, r, *out].

    ``n_lead`` leading axes (the scan layer axis) are batch axes. HIGHEST precision: the
    contraction is only over the rank, so exact float32 costs nothing next to the model.
    """
    lead, rank = a.shape[:n_lead], a.shape[-1]
    in_shape, out_shape = a.shape[n_lead:-1], b.shape[n_lead + 1:]
    a2 = a.astype(jnp.float32).reshape(lead + (math.prod(in_shape), rank))
    b2 = b.astype(jnp.float32).reshape(lead + (rank, math.prod(out_shape)))
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    return delta.reshape(lead + in_shape + out_shape)


def apply_lora(params: PyTree, lora: LoRA, scale: Any = None, shardings: PyTree = None) -> PyTree:
    """Parameters with ``kernel <- kernel + scale * A @ B`` for every adapted module.

    Also the merge: the result is a plain parameter tree for ``Transformer.apply``, a checkpoint
    or ``save_pretrained``. ``scale`` overrides ``lora.scale`` (a float or a jnp scalar; 0 turns
    the adapters off). Untouched leaves are the same objects as in ``params``.

    ``shardings`` (``params``' shardings, inside jit): each ``A @ B`` is computed in its
    kernel's sharding. Without it, replicated adapters make a replicated float32 product of
    every kernel's full size on every device (an FSDP-sharded 1B model's update then needs more
    memory than its full fine-tune).
    """
    scale = lora.scale if scale is None else scale
    out = dict(params)

    def visit(adapters: Mapping, path: Path) -> None:
        for key, child in adapters.items():
            child_path = path + (key,)
            if set(child) == {"a", "b"}:
                module = dict(_get(params, child_path))
                kernel = module["kernel"]
                delta = lora_delta(child["a"], child["b"], _layer_axes(child_path))
                if delta.shape != kernel.shape:
                    raise ValueError(f"adapter {'/'.join(child_path)} gives {delta.shape}, "
                                     f"kernel is {kernel.shape}")
                if shardings is not None:
                    delta = jax.lax.with_sharding_constraint(
                        delta, _get(shardings, child_path)["kernel"])
                module["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
                _replace(out, child_path, module)
            else:
                visit(child, child_path)

    visit(lora.adapters, ())
    return out


def _replace(tree: dict, path: Path, value: Any) -> None:
    """Set ``tree[path] = value``, copying each dict on the way (the input tree is not mutated)."""
    for key in path[:-1]:
        tree[key] = dict(tree[key])
        tree = tree[key]
    tree[path[-1]] = value


def lora_param_count(lora: LoRA) -> int:
    """Number of trainable adapter values (sum of A and B sizes)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(lora))
