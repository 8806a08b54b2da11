"""Transformer configuration covering the GPT-2 and Llama (and Qwen2) families.

Every field is a plain Python value so a config is hashable (a static jit argument), JSON-able
(stored beside checkpoints) and overridable from an ``experiments/`` config file.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any, Literal

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    n_kv_heads: int | None = None        # None = n_heads (no grouped-query attention)
    head_dim: int | None = None          # None = d_model // n_heads
    max_position: int = 1024             # learned-position table size / longest sequence
    arch: Literal["gpt2", "llama", "qwen2"] = "gpt2"
    position: Literal["learned", "rope"] = "learned"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE frequency scaling: "default" (none) or "llama3" (Llama 3.1 / 3.2: wavelengths longer
    # than rope_original_max_position / rope_low_freq_factor are stretched by rope_factor, those
    # shorter than .. / rope_high_freq_factor are kept, and the band between is interpolated).
    rope_scaling: Literal["default", "llama3"] = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int | None = None
    tie_embeddings: bool = True
    qkv_bias: bool = True
    out_bias: bool = True                # bias on attention output and MLP projections
    head: Literal["lm", "scalar"] = "lm"  # LM logits, or one scalar per position (RM / value)
    dropout: float = 0.0                 # residual dropout (embeddings, attention and MLP outputs)
    dtype: str = "float32"               # compute dtype
    param_dtype: str = "float32"
    remat: bool = False                  # jax.checkpoint each layer
    scan_layers: bool = False            # lax.scan over stacked layer params (fast compiles)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        problems = self._size_problems()
        if problems:    # the checks below divide by these sizes
            raise ValueError("invalid TransformerConfig: " + "; ".join(problems))
        if self.d_model % self.n_heads and self.head_dim is None:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.position == "rope" and self.dims_per_head % 2:
            problems.append(f"RoPE needs an even head_dim, got {self.dims_per_head}")
        problems.extend(self._rope_scaling_problems())
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")
        if problems:
            raise ValueError("invalid TransformerConfig: " + "; ".join(problems))

    def _size_problems(self) -> list[str]:
        sizes = {name: getattr(self, name) for name in
                 ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_position")}
        sizes.update({name: getattr(self, name) for name in ("n_kv_heads", "head_dim")
                      if getattr(self, name) is not None})
        return [f"{name}={value!r}: expected a positive integer" for name, value in sizes.items()
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1]

    def _rope_scaling_problems(self) -> list[str]:
        if self.rope_scaling == "default":
            return []
        if self.rope_scaling != "llama3":
            return [f"rope_scaling={self.rope_scaling!r}; expected 'default' or 'llama3'"]
        problems = []
        if self.position != "rope":
            problems.append(f"rope_scaling='llama3' needs position='rope', got {self.position!r}")
        if not self.rope_factor >= 1.0:
            problems.append(f"rope_factor={self.rope_factor} must be >= 1 for rope_scaling='llama3'")
        if not 0.0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            problems.append(f"rope_scaling='llama3' needs 0 < rope_low_freq_factor < "
                            f"rope_high_freq_factor, got {self.rope_low_freq_factor} and "
                            f"{self.rope_high_freq_factor}")
        original = self.rope_original_max_position
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            problems.append(f"rope_scaling='llama3' needs rope_original_max_position, a positive "
                            f"int, got {original!r}")
        return problems

    @property
    def rope_scaling_params(self) -> dict[str, Any]:
        """Keyword arguments of ``rope_inv_freq`` / ``rope_tables`` for this config's scaling."""
        if self.rope_scaling == "default":
            return {}
        return dict(scaling=self.rope_scaling, factor=self.rope_factor,
                    low_freq_factor=self.rope_low_freq_factor,
                    high_freq_factor=self.rope_high_freq_factor,
                    original_max_position=self.rope_original_max_position)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dims_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of TransformerConfig fields, got "
                             f"{type(d).__name__}")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig fields {unknown}; known: {sorted(known)}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ValueError(f"missing fields {missing}")
        return cls(**d)


def gpt2_config(**overrides: Any) -> TransformerConfig:
    """GPT-2 family defaults (learned positions, LayerNorm, GELU, tied embeddings)."""
    base = dict(arch="gpt2", position="learned", norm="layernorm", mlp="gelu", norm_eps=1e-5,
                tie_embeddings=True, qkv_bias=True, out_bias=True)
    base.update(overrides)
    return TransformerConfig(**base)


def llama_config(**overrides: Any) -> TransformerConfig:
    """Llama family defaults (RoPE, RMSNorm, SwiGLU, GQA allowed, untied head, no biases)."""
    base = dict(arch="llama", position="rope", norm="rmsnorm", mlp="swiglu", norm_eps=1e-6,
                tie_embeddings=False, qkv_bias=False, out_bias=False)
    base.update(overrides)
    return TransformerConfig(**base)


def qwen2_config(**overrides: Any) -> TransformerConfig:
    """Qwen2: Llama with biases on the q/k/v projections."""
    base = dict(arch="qwen2", qkv_bias=True)
    base.update(overrides)
    return llama_config(**base)


def tiny_config(arch: str = "gpt2", **overrides: Any) -> TransformerConfig:
    """A few-thousand-parameter model for tests and CPU smoke runs."""
    sizes = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_position=64)
    sizes.update(overrides)
    maker = {"gpt2": gpt2_config, "llama": llama_config, "qwen2": qwen2_config}[arch]
    return maker(**sizes)
