"""Shared-prefix decode attention (the Hydragen / cascade-attention idea).

G rollouts of one prompt share the prompt. Its keys/values are kept once per
prompt (Lp positions), each rollout keeps only its own suffix (T positions),
and one decode step's attention is the log-sum-exp merge of
  * all G queries of a prompt against the shared prefix: one batched
    matrix-matrix product per prompt (G*Q query rows), where a repeated cache
    would do G matrix-vector products over G copies of the same keys, and
  * each query against its own suffix.
Memory is O(P*Lp + P*G*T) instead of O(P*G*(Lp+T)).

Both are stored in the layouts their products read. The prefix: keys
`[P, K, H, Lp]`, values `[P, K, Lp, H]` (`prefix_layout`, once per prefill).
The suffix, rollouts flat: keys `[P*G, K, H, T]` (contraction over H, then
T), values `[P*G, K, T, H]`. Stored `[P, G, T, K, H]`, XLA transposed every
layer's whole suffix cache at every step before the products; with a size-1
P axis (one prompt, N = 512) it copied the cache to drop that axis. Either
cost a third of a CPU decode step at N = 64 (measured); P*G is one axis (P
major: data sharding of either P or G splits it into contiguous blocks) and
K stays its own (tensor sharding).

The suffix product reads only the slots written so far (`step + 1`), by the
decode backend's `suffix_attention.attend_suffix`; the GPU kernel's backends
store the suffix keys time-major, [P*G, K, T, H], and kernel backends pad T
to whole blocks (`suffix_attention.suffix_slots`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from brorl_jax.model.attention import masked_softmax_lse, merge_lse
from brorl_jax.model.sharding import (constrain, constrain_merged,
                                      merged_sharding)
from brorl_jax.rollout import suffix_attention


@struct.dataclass
class SharedPrefixAttention:
  """Attention strategy for one decode step of P x G rollouts.

  The per-layer cache is `(prefix_k, prefix_v, suffix_k, suffix_v)` with
  prefix keys [P, K, H, Lp] and values [P, K, Lp, H] (read only; see
  `prefix_layout`), suffix keys [P*G, K, H, T] (or [P*G, K, T, H], see
  `suffix_attention.keys_time_major`) and suffix values [P*G, K, T, H]
  (`empty_suffix`); the new token's key/value is written at suffix slot
  `step`, and the suffix product reads slots 0..step only.

  Attributes:
    prefix_valid: [P, Lp] bool, real (non-padding) prompt positions.
    step: suffix slot of the current token: an int32 scalar (every row at
      the same slot), or [P*G] int32, one slot per row (the refill decode,
      where each slot holds a rollout of its own length).
    backend: resolved decode backend (`model.config.ATTENTION_BACKENDS`, not
      "auto"); with per-row slots the kernels read each row up to its own
      slot, `reference` and `blockwise` take the masked product over the
      buffer (`suffix_attention`).
    interpret: run a kernel backend in Pallas interpret mode (CPU).
  """

  prefix_valid: jax.Array
  step: jax.Array
  backend: str = struct.field(pytree_node=False, default="reference")
  interpret: bool = struct.field(pytree_node=False, default=False)

  @staticmethod
  def prefix_layout(k: jax.Array, v: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """A prefill's [P, Lp, K, H] keys and values -> the stored layouts."""
    k = constrain(k.transpose(0, 2, 3, 1), ("batch", "act_kv", None, None))
    v = constrain(v.transpose(0, 2, 1, 3), ("batch", "act_kv", None, None))
    return k, v

  @staticmethod
  def empty_suffix(p: int, g: int, t: int, kv_heads: int, head_dim: int,
                   dtype, backend: str = "reference"
                   ) -> tuple[jax.Array, jax.Array]:
    """Zero suffix keys [P*G, K, H, T'] and values [P*G, K, T', H].

    T' = `suffix_attention.suffix_slots(t, backend)`; keys are
    [P*G, K, T', H] where the backend reads them time-major.
    """
    t = suffix_attention.suffix_slots(t, backend)
    k_shape = ((p * g, kv_heads, t, head_dim)
               if suffix_attention.keys_time_major(backend)
               else (p * g, kv_heads, head_dim, t))
    return (jnp.zeros(k_shape, dtype),
            jnp.zeros((p * g, kv_heads, t, head_dim), dtype))

  def __call__(self, q, k, v, cache):
    prefix_k, prefix_v, suffix_k, suffix_v = cache
    p, kv_heads, h, _ = prefix_k.shape
    b, n = q.shape[0], q.shape[-2]
    g = b // p
    scale = h ** -0.5
    # Prefix: per prompt, all G*Q queries of a kv head against its Lp keys.
    qg = q.reshape(p, g, kv_heads, n // kv_heads, h)        # [P, G, K, Q, H]
    s_pre = jnp.einsum("pgkqh,pkhs->pgkqs", qg, prefix_k,
                       preferred_element_type=jnp.float32) * scale
    w_pre, lse_pre = masked_softmax_lse(
        s_pre, self.prefix_valid[:, None, None, None, :])
    o_pre = jnp.einsum("pgkqs,pksh->pgkqh", w_pre.astype(prefix_v.dtype),
                       prefix_v, preferred_element_type=jnp.float32)
    # Suffix: the current token's KV goes into each rollout's own suffix,
    # then each rollout attends to its tokens so far (slots <= step), reading
    # no slot past them unless the backend is the reference.
    time_major = suffix_attention.keys_time_major(self.backend)
    per_row = jnp.ndim(self.step) > 0
    if not per_row:
      suffix_k = jax.lax.dynamic_update_slice_in_dim(
          suffix_k, k.reshape(b, kv_heads, *((1, h) if time_major else (h, 1))
                              ).astype(suffix_k.dtype),
          self.step, 2 if time_major else 3)
      suffix_v = jax.lax.dynamic_update_slice_in_dim(
          suffix_v, v.reshape(b, kv_heads, 1, h).astype(suffix_v.dtype),
          self.step, 2)
    else:  # per-row slots (refill): one scatter per row
      row = jnp.arange(b)
      new_k = k.reshape(b, kv_heads, h).astype(suffix_k.dtype)
      suffix_k = (suffix_k.at[row, :, self.step, :].set(new_k) if time_major
                  else suffix_k.at[row, :, :, self.step].set(new_k))
      suffix_v = suffix_v.at[row, :, self.step, :].set(
          v.reshape(b, kv_heads, h).astype(suffix_v.dtype))
    rows = (("batch", "group"), (p, g), ("act_kv", None, None))
    suffix_k = constrain_merged(suffix_k, *rows)
    suffix_v = constrain_merged(suffix_v, *rows)
    qb = q.reshape(b, kv_heads, n // kv_heads, h)           # [B, K, Q, H]
    # Per-row slots: a refilled slot's later positions hold an earlier
    # rollout's KV, so each row is read (or masked) at its own length.
    o_suf, lse_suf = suffix_attention.attend_suffix(
        qb, suffix_k, suffix_v, self.step + 1, self.backend, self.interpret,
        merged_sharding(suffix_v.shape, *rows))
    o_suf = o_suf.reshape(p, g, kv_heads, n // kv_heads, h)
    lse_suf = lse_suf.reshape(p, g, kv_heads, n // kv_heads)
    out = merge_lse(o_pre, lse_pre, o_suf, lse_suf)         # [P, G, K, Q, H]
    out = out.reshape(p * g, 1, n, h).astype(q.dtype)
    return out, (prefix_k, prefix_v, suffix_k, suffix_v)
