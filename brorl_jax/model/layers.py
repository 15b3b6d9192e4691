"""Decoder building blocks: RMSNorm, RoPE (default and Llama 3 scaling), GQA
attention projections (optional q/k/v biases and per-head q/k norms), SwiGLU.

Every parameter is an `nnx.Param` whose `axes` metadata holds its logical axis
names (see `model/sharding.py`); computations cast parameters to the compute
dtype and keep norms, RoPE and softmax in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from brorl_jax.model.config import ModelConfig
from brorl_jax.model.sharding import constrain

_INIT = jax.nn.initializers.normal(stddev=0.02)  # HF initializer_range


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, w, contract):
  return jnp.tensordot(x, w, axes=contract)


def _dense_fwd(x, w, contract):
  return _dense(x, w, contract), (x, w)


def _dense_bwd(contract, res, dy):
  x, w = res
  lead = x.ndim - contract
  dx = jnp.tensordot(dy, w, axes=(list(range(lead, dy.ndim)),
                                  list(range(contract, w.ndim))))
  rows = math.prod(x.shape[:lead])
  x2 = x.reshape(rows, -1)                        # [M, in]
  dy2 = dy.reshape(rows, -1)                      # [M, out]
  # dW = x^T dy contracts the token axis of both. Written as autodiff does,
  # XLA's CPU backend transposed the [tokens, features] gradient (with the
  # SwiGLU derivative fused into the transpose) before every weight-gradient
  # matmul; transposing the smaller operand explicitly (or the product, a
  # weight-sized array) halved the MLP's backward on CPU (measured). On
  # accelerators the transposes fold into the matmul.
  if x2.shape[1] <= dy2.shape[1]:
    dw = x2.T @ dy2
  else:
    dw = (dy2.T @ x2).T
  return dx, dw.reshape(w.shape).astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """Contracts the last `contract` axes of x with the first of w.

  `dense(x [B, T, D], w [D, F]) = einsum("btd,df->btf")`; with contract = 2,
  `dense(x [B, T, N, H], w [N, H, D]) = einsum("btnh,nhd->btd")`. The same
  product as the einsum, with a weight gradient XLA computes without
  transposing the activations' gradient (see `_dense_bwd`).
  """
  return _dense(x, w, contract)


def param(rngs: nnx.Rngs | None, shape: Sequence[int], dtype: Any,
          axes: Sequence[str | None], init=_INIT) -> nnx.Param:
  """A parameter with logical axes; zeros/ones inits need no rngs."""
  if rngs is None:
    value = init(shape, dtype)
  else:
    value = init(rngs.params(), shape, dtype)
  return nnx.Param(value, axes=tuple(axes))


def _zeros(shape, dtype):
  return jnp.zeros(shape, dtype)


def _ones(shape, dtype):
  return jnp.ones(shape, dtype)


class RMSNorm(nnx.Module):
  """y = scale * x / sqrt(mean(x^2) + eps), computed in float32."""

  def __init__(self, dim: int, eps: float, param_dtype: Any):
    self.scale = param(None, (dim,), param_dtype, ("norm",), _ones)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True)
                              + self.eps)
    # As HF Qwen2RMSNorm: normalize in f32, cast, then scale.
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Rope:
  """RoPE's frequencies (a static part of the module, hashable).

  Attributes:
    theta: the base.
    kind: "default" or "llama3" (`ModelConfig.rope_type`).
    factor, low_freq_factor, high_freq_factor, original_max_positions: the
      "llama3" scaling's parameters (unused by "default").
  """

  theta: float
  kind: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192

  @classmethod
  def of(cls, cfg: ModelConfig) -> "Rope":
    if cfg.rope_type == "default":
      return cls(cfg.rope_theta)
    return cls(cfg.rope_theta, cfg.rope_type, cfg.rope_factor,
               cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
               cfg.rope_original_max_position_embeddings)

  def inv_freq(self, h: int) -> jax.Array:
    """[H/2] float32 inverse frequencies, in transformers' order of f32 ops
    (`_compute_default_rope_parameters`, `_compute_llama3_parameters`)."""
    inv = 1.0 / (self.theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if self.kind == "default":
      return inv
    # Llama 3.1: wavelengths above original/low_freq_factor are divided by
    # `factor`, those below original/high_freq_factor kept, and the band
    # between interpolated smoothly.
    low_wavelen = self.original_max_positions / self.low_freq_factor
    high_wavelen = self.original_max_positions / self.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / self.factor, inv)
    smooth = ((self.original_max_positions / wavelen - self.low_freq_factor)
              / (self.high_freq_factor - self.low_freq_factor))
    smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope(x: jax.Array, positions: jax.Array, spec: Rope) -> jax.Array:
  """Rotary embedding, "rotate half" layout (HF Llama/Qwen2/Qwen3).

  Args:
    x: [B, T, N, H].
    positions: [B, T] int32.
    spec: the frequencies.

  Returns:
    [B, T, N, H] in x's dtype.
  """
  h = x.shape[-1]
  inv_freq = spec.inv_freq(h)                                  # [H/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.cos(freqs)[:, :, None, :]
  sin = jnp.sin(freqs)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """GQA self-attention projections; the attention itself is delegated."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, n, k, h, pd = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim, cfg.param_dtype)
    self.q_proj = param(rngs, (d, n, h), pd, ("embed", "q_heads", "head_dim"))
    self.k_proj = param(rngs, (d, k, h), pd, ("embed", "kv_heads", "head_dim"))
    self.v_proj = param(rngs, (d, k, h), pd, ("embed", "kv_heads", "head_dim"))
    self.o_proj = param(rngs, (n, h, d), pd, ("q_heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      self.q_bias = param(None, (n, h), pd, ("q_heads", "head_dim"), _zeros)
      self.k_bias = param(None, (k, h), pd, ("kv_heads", "head_dim"), _zeros)
      self.v_bias = param(None, (k, h), pd, ("kv_heads", "head_dim"), _zeros)
    if cfg.qk_norm:  # Qwen3: one [H] scale shared by the heads
      self.q_norm = RMSNorm(h, cfg.rms_norm_eps, pd)
      self.k_norm = RMSNorm(h, cfg.rms_norm_eps, pd)
    self.qkv_bias = cfg.qkv_bias
    self.qk_norm = cfg.qk_norm
    self.rope = Rope.of(cfg)

  def __call__(self, x: jax.Array, positions: jax.Array, attention: Any,
               cache: Any) -> tuple[jax.Array, Any]:
    """x [B, T, D] -> ([B, T, D], new cache) via the attention strategy."""
    dt = x.dtype
    q = dense(x, self.q_proj[...].astype(dt))                # [B, T, N, H]
    k = dense(x, self.k_proj[...].astype(dt))                # [B, T, K, H]
    v = dense(x, self.v_proj[...].astype(dt))
    if self.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if self.qk_norm:  # per head, before RoPE (HF Qwen3Attention)
      q = self.q_norm(q)
      k = self.k_norm(k)
    q = constrain(rope(q, positions, self.rope),
                  ("batch", "length", "act_heads", None))
    k = rope(k, positions, self.rope)
    out, cache = attention(q, k, v, cache)                   # [B, T, N, H]
    out = dense(out, self.o_proj[...].astype(dt), contract=2)  # [B, T, D]
    return out, cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, pd = cfg.embed_dim, cfg.mlp_dim, cfg.param_dtype
    self.gate_proj = param(rngs, (d, f), pd, ("embed", "mlp"))
    self.up_proj = param(rngs, (d, f), pd, ("embed", "mlp"))
    self.down_proj = param(rngs, (f, d), pd, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    gate = dense(x, self.gate_proj[...].astype(dt))
    up = dense(x, self.up_proj[...].astype(dt))
    hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return dense(hidden, self.down_proj[...].astype(dt))
