"""A plain per-row KV cache: the reference the tests hold cached decoding to.

Test-only: the sampler caches keys and values with `SharedPrefixAttention`
(rollout/shared_prefix.py); this simplest cache checks that the decoder's
cached incremental forward equals its full forward. `attend_lse`, plain
attention over the whole cache, is the tests' reference for the
shared-prefix merge too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from brorl_jax.model.attention import masked_softmax_lse


def _group(q: jax.Array, num_kv_heads: int) -> jax.Array:
  """[..., T, N, H] -> [..., T, K, Q, H]."""
  *lead, t, n, h = q.shape
  return q.reshape(*lead, t, num_kv_heads, n // num_kv_heads, h)


def attend_lse(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """Softmax attention that also returns the log-sum-exp of the scores.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys.
    v: [B, S, K, H] values.
    mask: [B, T, S] bool, True where a query may attend to a key.

  Returns:
    out: [B, T, N, H] normalized attention output, in q's dtype (rows with no
      visible key give 0).
    lse: [B, T, N] float32 log-sum-exp of the scaled scores (NEG_INF where no
      key is visible), for merging with attention over other keys.
  """
  b, t, n, h = q.shape
  qg = _group(q, k.shape[-2])                               # [B, T, K, Q, H]
  scores = jnp.einsum("btkqh,bskh->bkqts", qg, k,
                      preferred_element_type=jnp.float32) * h ** -0.5
  probs, lse = masked_softmax_lse(scores, mask[:, None, None, :, :])
  out = jnp.einsum("bkqts,bskh->btkqh", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, n)
  return out.reshape(b, t, n, h).astype(q.dtype), lse


@struct.dataclass
class KVCache:
  """A plain per-row KV cache.

  Attributes:
    k: per layer [B, S, K, H].
    v: per layer [B, S, K, H].
    valid: [B, S] bool, slots holding a real (non-padding) token.
    end: int32 scalar, next slot to write (shared by all rows).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  end: jax.Array

  @classmethod
  def zeros(cls, num_layers: int, batch: int, length: int, num_kv_heads: int,
            head_dim: int, dtype: Any) -> "KVCache":
    shape = (batch, length, num_kv_heads, head_dim)
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
               valid=jnp.zeros((batch, length), bool),
               end=jnp.zeros((), jnp.int32))


@struct.dataclass
class CachedAttention:
  """Writes the new keys/values at `end` and attends over the whole cache.

  Attributes:
    valid: [B, S] bool, slot validity *after* this write.
    end: int32 scalar, slot where the first new token is written.
  """

  valid: jax.Array
  end: jax.Array

  def __call__(self, q, k, v, cache):
    k_cache, v_cache = cache
    k_cache = jax.lax.dynamic_update_slice_in_dim(
        k_cache, k.astype(k_cache.dtype), self.end, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(
        v_cache, v.astype(v_cache.dtype), self.end, axis=1)
    t, s = q.shape[1], k_cache.shape[1]
    # Query i sits at slot end + i and sees valid slots up to its own.
    q_slot = self.end + jnp.arange(t)
    mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & \
        self.valid[:, None, :]
    out, _ = attend_lse(q, k_cache, v_cache, mask)
    return out, (k_cache, v_cache)
