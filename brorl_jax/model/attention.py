"""Attention math and the ways keys/values are cached.

The decoder computes queries, keys and values (RoPE applied) and hands them to
an *attention strategy* (a pytree, so it can cross `jax.checkpoint`), which
owns the cache layout:

  * `FullAttention`: no cache; causal attention over the given sequence,
    whose padding is given per row (`valid [B, T]`, never a `[T, T]` mask)
    and computed by the configured backend (`attention_kernels`: reference,
    blockwise, splash, cuDNN, Pallas GPU). Used for training forwards and for
    the sampler's prefill, where it also returns the fresh keys/values so the
    prompt's KV can be stored.
  * `SharedPrefixAttention` (rollout/): the prompt's KV kept once per prompt
    and the rollouts' own KV per rollout, merged by log-sum-exp.

All strategies compute scores and softmax in float32.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import struct

from brorl_jax.model import attention_kernels
from brorl_jax.model.attention_kernels import NEG_INF


class AttentionFn(Protocol):

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
               cache: Any) -> tuple[jax.Array, Any]:
    """Attends; returns `(out [B, T, N, H], new layer cache)`."""


def masked_softmax_lse(scores: jax.Array, mask: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """Softmax over the last axis restricted to `mask`, with its log-sum-exp.

  Args:
    scores: [..., S] float32 scaled scores.
    mask: bool, broadcastable to scores.

  Returns:
    probs: [..., S] float32 (all zero where no key is visible).
    lse: [...] float32 (NEG_INF where no key is visible).
  """
  scores = jnp.where(mask, scores, NEG_INF)
  m = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(scores - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  safe = jnp.maximum(denom, 1e-30)
  lse = jnp.where(denom > 0, m + jnp.log(safe), NEG_INF)[..., 0]
  return p / safe, lse


def merge_lse(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array,
              lse_b: jax.Array) -> jax.Array:
  """Merges two normalized attention outputs over disjoint key sets.

  softmax over A ∪ B = w_a * softmax_A + w_b * softmax_B with
  w = exp(lse - logaddexp(lse_a, lse_b)): the cascade/Hydragen identity.

  Args:
    out_a, out_b: [..., N, H] outputs over key sets A and B.
    lse_a, lse_b: [..., N] their log-sum-exps.

  Returns:
    [..., N, H] attention output over the union, in out_a's dtype.
  """
  lse = jnp.logaddexp(lse_a, lse_b)
  w_a = jnp.exp(lse_a - lse)[..., None]
  w_b = jnp.exp(lse_b - lse)[..., None]
  out = w_a * out_a.astype(jnp.float32) + w_b * out_b.astype(jnp.float32)
  return out.astype(out_a.dtype)


@struct.dataclass
class FullAttention:
  """Causal attention over the given sequence only (training, prefill).

  Attributes:
    valid: [B, T] bool, real tokens (one contiguous span per row).
    backend: `model.attention_backend` (see `attention_kernels`).
    return_kv: return `(k, v)` as the "cache" so a prefill can keep them.
  """

  valid: jax.Array
  backend: str = struct.field(pytree_node=False, default="auto")
  return_kv: bool = struct.field(pytree_node=False, default=False)

  def __call__(self, q, k, v, cache):
    del cache
    out = attention_kernels.attend(q, k, v, self.valid, self.backend)
    return out, ((k, v) if self.return_kv else None)
