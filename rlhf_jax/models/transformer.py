"""One decoder-only transformer for the policy, reference, reward and value networks.

The module is applied functionally: ``model.apply({"params": params}, input_ids, attention_mask)``.
Every parameter is created with logical axis names (see ``rlhf_jax.sharding``), so the same code
runs on one CPU or sharded over a pod.

Parameter tree (``layers`` is stacked with a leading layer axis when ``scan_layers``; otherwise
``layer_0 .. layer_{L-1}``)::

    embed/embedding [V, D]            pos_embed/embedding [P, D]   (learned positions only)
    layer_i/attn_norm/{scale, bias}   layer_i/mlp_norm/{scale, bias}   (bias: LayerNorm only)
    layer_i/attn/{q,k,v}/kernel [D, H|KV, Dh]  (+ bias [H|KV, Dh])
    layer_i/attn/o/kernel [H, Dh, D]           (+ bias [D])
    layer_i/mlp/fc_in/kernel [D, F], fc_out/kernel [F, D]       (GELU, + biases)
    layer_i/mlp/gate|up/kernel [D, F], down/kernel [F, D]       (SwiGLU)
    final_norm/{scale, bias}          lm_head/kernel [D, V] (untied)   score_head/{kernel [D,1], bias [1]}

KV cache (``init_cache``): per layer, keys and values ``[B, KV, S, Dh]``, head-major, so both
attention products of a decode step are batched matmuls over (B, KV) with no transposed copy of
the cache per layer and token (and bf16 x bf16 -> f32 dots stay supported on CPU). Unscanned
layers keep one buffer per layer (``{"k": (k_0, .., k_{L-1}), "v": (...)}``), so the decode loop
updates each in place instead of restacking all layers every token; scanned layers stack them
under a leading layer axis. All sequences of a batch write slot ``cache_index`` together; left
padding is handled by the attention mask over slots and by per-sequence position ids, so
prefill + one-token steps give the full forward's logits.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rlhf_jax.models.config import TransformerConfig
from rlhf_jax.sharding import DEFAULT_RULES, LogicalRules, as_auto_mesh, with_logical_constraint

Array = jax.Array
Cache = dict[str, Any]   # "k", "v": a stacked array or a tuple of per-layer arrays

_NEG_INF = -1e30  # finite, so fully-masked rows (left padding) give uniform weights, not NaN


def _init(stddev: float, axes: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def _zeros(axes: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _auto_mesh_post_init(module: nn.Module) -> None:
    """Store ``mesh`` with Auto axes (``jax.make_mesh`` meshes are Explicit by default)."""
    mesh = as_auto_mesh(module.mesh)
    if mesh is not module.mesh:
        object.__setattr__(module, "mesh", mesh)


class _Sharded(nn.Module):
    """Mixin: logical sharding constraints on activations when a mesh is set.

    A mesh with Explicit axes (``jax.make_mesh``'s default) is stored as its Auto twin
    (``rlhf_jax.sharding.as_auto_mesh``), so ``Transformer(cfg, mesh=jax.make_mesh(...))`` works.
    """
    config: TransformerConfig
    mesh: Mesh | None = None
    rules: LogicalRules = DEFAULT_RULES

    def __post_init__(self):
        _auto_mesh_post_init(self)
        super().__post_init__()

    def constrain(self, x: Array, *axes: str | None) -> Array:
        return with_logical_constraint(x, axes, self.mesh, self.rules)


class Norm(nn.Module):
    """LayerNorm or RMSNorm, computed in float32 (as both reference implementations do)."""
    config: TransformerConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = self.param("scale", _ones(("norm",)), (x.shape[-1],), cfg.params_dtype)
        h = x.astype(jnp.float32)
        if cfg.norm == "layernorm":
            bias = self.param("bias", _zeros(("norm",)), (x.shape[-1],), cfg.params_dtype)
            mean = h.mean(-1, keepdims=True)
            var = jnp.square(h - mean).mean(-1, keepdims=True)
            h = (h - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
            return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(cfg.compute_dtype)
        h = h * jax.lax.rsqrt(jnp.square(h).mean(-1, keepdims=True) + cfg.norm_eps)
        return scale.astype(cfg.compute_dtype) * h.astype(cfg.compute_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project(x: Array, kernel: Array, in_dims: int) -> Array:
    """``x``'s last ``in_dims`` dims contracted with ``kernel``'s first ``in_dims``.

    Autodiff's gradients, with the weight gradient's product ordered activations-first
    (``x^T g``). Autodiff orders it ``(g^T x)^T``, for which XLA:CPU's matmul wants a transposed
    copy of the gradient, and it fuses the gradient's whole elementwise producer chain (layer-norm
    and residual backward) into that copy, which then runs far below memory speed: ~15% of a
    GPT-2-124M PPO update. Ordered this way the transposed operand is the stored activation, a
    plain copy. Equal to autodiff up to float rounding (the matmul sums in another order).
    """
    return _project(x, kernel, in_dims)


def _project(x: Array, kernel: Array, in_dims: int) -> Array:
    contract = tuple(range(x.ndim - in_dims, x.ndim))
    return jax.lax.dot_general(x, kernel, ((contract, tuple(range(in_dims))), ((), ())))


def _project_fwd(x: Array, kernel: Array, in_dims: int):
    return _project(x, kernel, in_dims), (x, kernel)


def _project_bwd(in_dims: int, residuals, g: Array):
    x, kernel = residuals
    batch = tuple(range(x.ndim - in_dims))
    g_features = tuple(range(len(batch), g.ndim))
    dx = jax.lax.dot_general(g, kernel, ((g_features, tuple(range(in_dims, kernel.ndim))), ((), ())))
    dkernel = jax.lax.dot_general(x, g, ((batch, batch), ((), ())))
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


project.defvjp(_project_fwd, _project_bwd)


class Projection(nn.Module):
    """``x @ kernel (+ bias)`` with a multi-dim kernel and logical axes per kernel dim."""
    in_dims: int                 # how many trailing dims of x are contracted
    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    use_bias: bool
    config: TransformerConfig
    stddev: float = 0.02

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        in_shape = x.shape[x.ndim - self.in_dims:]
        kernel = self.param("kernel", _init(self.stddev, self.kernel_axes),
                            (*in_shape, *self.features), cfg.params_dtype)
        y = project(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype), self.in_dims)
        if self.use_bias:
            bias = self.param("bias", _zeros(self.kernel_axes[self.in_dims:]), self.features,
                              cfg.params_dtype)
            y = y + bias.astype(cfg.compute_dtype)
        return y


def rope_inv_freq(head_dim: int, theta: float, scaling: str = "default", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_position: int | None = None) -> Array:
    """RoPE inverse frequencies [head_dim / 2] (float32), optionally with Llama-3 scaling.

    ``scaling="llama3"``: components whose wavelength ``2 pi / inv_freq`` exceeds
    ``original_max_position / low_freq_factor`` are slowed down by ``factor``; those shorter than
    ``original_max_position / high_freq_factor`` are unchanged; in between, the frequency is a
    linear blend of the two, weighted by ``original_max_position / wavelength`` (as in Meta's
    Llama 3.1 reference and transformers' "llama3" rope type).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling == "default":
        return inv_freq
    if scaling != "llama3":
        raise ValueError(f"RoPE scaling {scaling!r} is not supported; expected 'default' or 'llama3'")
    original = float(original_max_position)
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = original / low_freq_factor     # longer than this: divide by factor
    high_freq_wavelength = original / high_freq_factor   # shorter than this: keep
    slowed = jnp.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return jnp.where(medium, blended, slowed)


def rope_tables(positions: Array, head_dim: int, theta: float,
                **scaling: Any) -> tuple[Array, Array]:
    """cos/sin [B, T, head_dim] for the rotate-half RoPE convention (Llama, Qwen2).

    ``scaling``: keyword arguments of ``rope_inv_freq`` (``TransformerConfig.rope_scaling_params``).
    """
    inv_freq = rope_inv_freq(head_dim, theta, **scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, T, N, Dh]; rotate pairs (i, i + Dh/2)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask_bias(key_mask: Array, n_queries: int, query_offset: Array | int) -> Array:
    """Boolean [B, 1, Tq, S]: query i (at slot ``query_offset + i``) may see key slot j.

    Causal over slots and restricted to real (non-padding) keys.
    """
    slots = jnp.arange(key_mask.shape[-1])
    query_slots = query_offset + jnp.arange(n_queries)
    causal = slots[None, :] <= query_slots[:, None]                       # [Tq, S]
    return causal[None, None] & (key_mask[:, None, None, :] > 0)


class Embed(nn.Module):
    """A lookup table ``embedding [N, D]``; ``attend`` is its transpose (the tied LM head)."""
    num_embeddings: int
    axes: tuple[str, str]
    config: TransformerConfig
    stddev: float = 0.02
    mesh: Mesh | None = None
    rules: LogicalRules = DEFAULT_RULES

    def __post_init__(self):
        _auto_mesh_post_init(self)
        super().__post_init__()

    def setup(self):
        cfg = self.config
        self.embedding = self.param("embedding", _init(self.stddev, self.axes),
                                    (self.num_embeddings, cfg.d_model), cfg.params_dtype)

    def __call__(self, ids: Array) -> Array:
        # FSDP-style lookup on a mesh: gather the table over its model dimension first (it stays
        # split over vocab), so each device does a local masked gather for its own rows of the
        # batch and GSPMD sums the vocab shards. Gathering straight from the [vocab, embed] layout
        # gives an output split over embed that XLA can only turn into the batch-split activation
        # layout by replicating it ("Involuntary full rematerialization" on a (2, 2, 2) mesh).
        # Exact: every output element is one table entry plus zeros.
        table = self.constrain(self.embedding, self.axes[0], None)
        out = jnp.take(table, ids, axis=0)
        out = self.constrain(out, "activation_batch", "activation_length", "activation_embed")
        return out.astype(self.config.compute_dtype)

    def constrain(self, x: Array, *axes: str | None) -> Array:
        return with_logical_constraint(x, axes, self.mesh, self.rules)

    def attend(self, x: Array) -> Array:
        dtype = self.config.compute_dtype
        return jnp.einsum("btd,vd->btv", x.astype(dtype), self.embedding.astype(dtype))


class Attention(_Sharded):
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, allowed: Array, rope: tuple[Array, Array] | None,
                 layer_cache: tuple[Array, Array] | None, cache_index: Array | None):
        cfg = self.config
        h, kv, dh = cfg.n_heads, cfg.kv_heads, cfg.dims_per_head
        proj = lambda name, n: Projection(1, (n, dh), ("embed", "heads" if n == h else "kv_heads",
                                                       "head_dim"), cfg.qkv_bias, cfg, name=name)
        q = self.constrain(proj("q", h)(x), "activation_batch", "activation_length",
                           "activation_heads", None)
        k = self.constrain(proj("k", kv)(x), "activation_batch", "activation_length",
                           "activation_kv_heads", None)
        v = self.constrain(proj("v", kv)(x), "activation_batch", "activation_length",
                           "activation_kv_heads", None)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        b, t = q.shape[:2]
        q = q.reshape(b, t, kv, h // kv, dh)   # group query heads over their shared K/V head
        new_cache = None
        if layer_cache is None:
            scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        else:
            cache_k, cache_v = layer_cache     # [B, KV, S, Dh] each
            cache_k = jax.lax.dynamic_update_slice(
                cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype), (0, 0, cache_index, 0))
            cache_v = jax.lax.dynamic_update_slice(
                cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), (0, 0, cache_index, 0))
            new_cache = (cache_k, cache_v)
            k, v = cache_k.astype(cfg.compute_dtype), cache_v.astype(cfg.compute_dtype)
            scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(dh))
        scores = jnp.where(allowed[:, :, None], scores, _NEG_INF)
        weights = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
        values = "bskd" if layer_cache is None else "bksd"
        out = jnp.einsum(f"bkgts,{values}->btkgd", weights, v).reshape(b, t, h, dh)
        out = Projection(2, (cfg.d_model,), ("heads", "head_dim", "embed"), cfg.out_bias, cfg,
                         name="o")(out)
        return out, new_cache


class MLP(_Sharded):
    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dense = lambda name, feats, axes: Projection(1, (feats,), axes, cfg.out_bias, cfg, name=name)
        if cfg.mlp == "gelu":
            hidden = jax.nn.gelu(dense("fc_in", cfg.d_ff, ("embed", "mlp"))(x), approximate=True)
        else:
            hidden = (jax.nn.silu(dense("gate", cfg.d_ff, ("embed", "mlp"))(x))
                      * dense("up", cfg.d_ff, ("embed", "mlp"))(x))
        hidden = self.constrain(hidden, "activation_batch", "activation_length", "activation_mlp")
        return dense("fc_out" if cfg.mlp == "gelu" else "down", cfg.d_model, ("mlp", "embed"))(hidden)


class Block(_Sharded):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + MLP(Norm(x))."""
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, layer_cache, allowed: Array, rope, cache_index):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic or cfg.dropout == 0.0)
        attn_out, new_cache = Attention(cfg, self.mesh, self.rules, self.deterministic, name="attn")(
            Norm(cfg, name="attn_norm")(x), allowed, rope, layer_cache, cache_index)
        x = x + drop(attn_out)
        x = x + drop(MLP(cfg, self.mesh, self.rules, name="mlp")(Norm(cfg, name="mlp_norm")(x)))
        x = self.constrain(x, "activation_batch", "activation_length", "activation_embed")
        return x, new_cache


def default_position_ids(attention_mask: Array) -> Array:
    """Positions that ignore left padding: 0 at each sequence's first real token."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


_CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")


def cache_shapes(config: TransformerConfig, batch_size: int, max_length: int,
                 dtype: Any = None) -> Cache:
    """The cache's structure as ``jax.ShapeDtypeStruct`` leaves (see the module docs)."""
    dtype = dtype or config.compute_dtype
    shape = (batch_size, config.kv_heads, max_length, config.dims_per_head)
    if config.scan_layers:
        buffers = jax.ShapeDtypeStruct((config.n_layers, *shape), dtype)
    else:
        buffers = tuple(jax.ShapeDtypeStruct(shape, dtype) for _ in range(config.n_layers))
    return {"k": buffers, "v": buffers}


def init_cache(config: TransformerConfig, batch_size: int, max_length: int,
               dtype: Any = None) -> Cache:
    """An empty KV cache with ``max_length`` slots (prompt + generated tokens)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        cache_shapes(config, batch_size, max_length, dtype))


def cache_axes(ndim: int) -> tuple[str, ...]:
    """Logical axes of one K or V cache buffer (``ndim`` 5 when layers are stacked)."""
    return ("cache_layers",) * (ndim - 4) + _CACHE_AXES


def cache_slots(cache: Cache) -> int:
    """How many token slots a cache holds."""
    return jax.tree.leaves(cache["v"])[0].shape[-2]


class Transformer(_Sharded):
    """Decoder-only transformer with an LM head or a scalar (reward / value) head.

    Call with ``input_ids [B, T]`` and ``attention_mask [B, T]`` (1 = real token). Returns
    logits ``[B, T, V]`` (head="lm") or float32 scalars ``[B, T]`` (head="scalar"); with
    ``return_hidden`` the final-normed hidden states ``[B, T, D]`` instead (see ``head_outputs``). With
    ``cache`` (and ``cache_index``, the first slot the new tokens occupy) ``attention_mask`` spans
    all cache slots ``[B, S]`` and the call returns ``(outputs, new_cache)``.
    """

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 position_ids: Array | None = None, *, cache: Cache | None = None,
                 cache_index: Array | int | None = None, deterministic: bool = True,
                 return_hidden: bool = False):
        cfg = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t) if cache is None else (b, cache_slots(cache)), jnp.int32)
        if cache is not None and cache_index is None:
            raise ValueError("a KV-cache call needs cache_index (the slot of the first new token)")
        if position_ids is None:
            if cache is None:
                position_ids = default_position_ids(attention_mask)
            else:
                # Positions of the new tokens = real tokens before their slots.
                full = default_position_ids(attention_mask)
                position_ids = jax.lax.dynamic_slice_in_dim(full, cache_index, t, axis=1)

        embed = Embed(cfg.vocab_size, ("vocab", "embed"), cfg, stddev=0.02, mesh=self.mesh,
                      rules=self.rules, name="embed")
        x = embed(input_ids)
        if cfg.position == "learned":
            x = x + Embed(cfg.max_position, ("position", "embed"), cfg, stddev=0.01, mesh=self.mesh,
                          rules=self.rules, name="pos_embed")(position_ids)
            rope = None
        else:
            rope = rope_tables(position_ids, cfg.dims_per_head, cfg.rope_theta,
                               **cfg.rope_scaling_params)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic or cfg.dropout == 0.0)(x)
        x = self.constrain(x, "activation_batch", "activation_length", "activation_embed")

        allowed = attention_mask_bias(attention_mask, t, 0 if cache is None else cache_index)
        x, new_cache = self.layers(x, cache, allowed, rope, cache_index, deterministic)
        x = Norm(cfg, name="final_norm")(x)

        if return_hidden:
            # The caller applies the head itself (``head_outputs``), e.g. only on response
            # positions and in chunks. Under ``init`` the head still runs so its params exist.
            if self.is_initializing() and cfg.head == "scalar":
                self.score_head(x)
            elif self.is_initializing():
                self.lm_logits(x, embed)
            return x if cache is None else (x, new_cache)
        if cfg.head == "scalar":
            out = self.score_head(x)
        else:
            out = self.lm_logits(x, embed)
        return out if cache is None else (out, new_cache)

    # --- pieces -----------------------------------------------------------------------------

    def layers(self, x, cache, allowed, rope, cache_index, deterministic):
        cfg = self.config
        block = nn.remat(Block, prevent_cse=not cfg.scan_layers) if cfg.remat else Block
        if cfg.scan_layers:
            scanned = nn.scan(block, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                              length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            layer_caches = None if cache is None else (cache["k"], cache["v"])
            x, stacked = scanned(cfg, self.mesh, self.rules, deterministic, name="layers")(
                x, layer_caches, allowed, rope, cache_index)
            new_cache = None if cache is None else {"k": stacked[0], "v": stacked[1]}
            return x, new_cache
        new_k, new_v = [], []
        for i in range(cfg.n_layers):
            layer_cache = None if cache is None else (cache["k"][i], cache["v"][i])
            x, updated = block(cfg, self.mesh, self.rules, deterministic, name=f"layer_{i}")(
                x, layer_cache, allowed, rope, cache_index)
            if updated is not None:
                new_k.append(updated[0])
                new_v.append(updated[1])
        new_cache = None if cache is None else {"k": tuple(new_k), "v": tuple(new_v)}
        return x, new_cache

    def lm_logits(self, x: Array, embed: "Embed") -> Array:
        cfg = self.config
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = Projection(1, (cfg.vocab_size,), ("embed", "vocab"), False, cfg,
                                name="lm_head")(x)
        return self.constrain(logits, "activation_batch", "activation_length", "activation_vocab")

    def score_head(self, x: Array) -> Array:
        """Scalar per position, float32. Init N(0, 1/sqrt(d_model + 1)), bias 0 (Stiennon et al.)."""
        cfg = self.config
        head = Projection(1, (1,), ("embed", "score"), True, cfg,
                          stddev=1.0 / (cfg.d_model + 1) ** 0.5, name="score_head")
        return head(x)[..., 0].astype(jnp.float32)


def head_outputs(config: TransformerConfig, params: Any, hidden: Array) -> Array:
    """The output head applied to hidden states ``[..., D]`` from ``return_hidden=True``.

    LM head -> logits ``[..., V]`` in the compute dtype; scalar head -> float32 ``[...]``. A pure
    function of the parameter tree, so a caller can run it on any slice of positions (only the
    response, one chunk at a time) instead of the full ``[B, T, V]``.
    """
    dtype = config.compute_dtype
    x = hidden.astype(dtype)
    if config.head == "scalar":
        head = params["score_head"]
        out = x @ head["kernel"].astype(dtype) + head["bias"].astype(dtype)
        return out[..., 0].astype(jnp.float32)
    if config.tie_embeddings:
        return x @ params["embed"]["embedding"].astype(dtype).T
    return x @ params["lm_head"]["kernel"].astype(dtype)
