"""Qwen2 building blocks: RMSNorm, RoPE, GQA attention projections, SwiGLU.

Every parameter is an `nnx.Param` whose `axes` metadata holds its logical axis
names (see `model/sharding.py`); computations cast parameters to the compute
dtype and keep norms, RoPE and softmax in float32.
"""

from __future__ import annotations

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


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, "rotate half" layout (HF Llama/Qwen2).

  Args:
    x: [B, T, N, H].
    positions: [B, T] int32.
    theta: RoPE base.

  Returns:
    [B, T, N, H] in x's dtype.
  """
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
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
    self.qkv_bias = cfg.qkv_bias
    self.theta = cfg.rope_theta

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
    q = constrain(rope(q, positions, self.theta),
                  ("batch", "length", "act_heads", None))
    k = rope(k, positions, self.theta)
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
