"""Shared-prefix decode attention (the Hydragen / cascade-attention idea).

G rollouts of one prompt share the prompt. Its keys/values are kept once per
prompt (`[P, Lp, K, H]`), each rollout keeps only its own suffix
(`[P, G, T, K, H]`), and one decode step's attention is the log-sum-exp merge
of
  * all G queries of a prompt against the shared prefix: one batched
    matrix-matrix product per prompt (G*Q query rows), where a repeated cache
    would do G matrix-vector products over G copies of the same keys, and
  * each query against its own suffix.
Memory is O(P*Lp + P*G*T) instead of O(P*G*(Lp+T)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from brorl_jax.model.attention import masked_softmax_lse, merge_lse
from brorl_jax.model.sharding import constrain


@struct.dataclass
class SharedPrefixAttention:
  """Attention strategy for one decode step of P x G rollouts.

  The per-layer cache is `(prefix_k, prefix_v, suffix_k, suffix_v)` with
  prefix [P, Lp, K, H] (read only) and suffix [P, G, T, K, H]; the new token's
  key/value is written at suffix slot `step`.

  Attributes:
    prefix_valid: [P, Lp] bool, real (non-padding) prompt positions.
    step: int32 scalar, suffix slot of the current token.
  """

  prefix_valid: jax.Array
  step: jax.Array

  def __call__(self, q, k, v, cache):
    prefix_k, prefix_v, suffix_k, suffix_v = cache
    p, _, kv_heads, h = prefix_k.shape
    g = q.shape[0] // p
    n = q.shape[-2]
    t_max = suffix_k.shape[2]
    # The current token's KV goes into each rollout's own suffix.
    k = k.reshape(p, g, 1, kv_heads, h).astype(suffix_k.dtype)
    v = v.reshape(p, g, 1, kv_heads, h).astype(suffix_v.dtype)
    suffix_k = jax.lax.dynamic_update_slice_in_dim(suffix_k, k, self.step, 2)
    suffix_v = jax.lax.dynamic_update_slice_in_dim(suffix_v, v, self.step, 2)
    suffix_k = constrain(suffix_k, ("batch", "group", None, "act_kv", None))
    suffix_v = constrain(suffix_v, ("batch", "group", None, "act_kv", None))

    qg = q.reshape(p, g, kv_heads, n // kv_heads, h)        # [P, G, K, Q, H]
    scale = h ** -0.5
    # Prefix: per prompt, all G*Q queries of a kv head against its Lp keys.
    s_pre = jnp.einsum("pgkqh,pskh->pgkqs", qg, prefix_k,
                       preferred_element_type=jnp.float32) * scale
    w_pre, lse_pre = masked_softmax_lse(
        s_pre, self.prefix_valid[:, None, None, None, :])
    o_pre = jnp.einsum("pgkqs,pskh->pgkqh", w_pre.astype(prefix_v.dtype),
                       prefix_v, preferred_element_type=jnp.float32)
    # Suffix: each rollout against its own tokens so far (slots <= step).
    s_suf = jnp.einsum("pgkqh,pgtkh->pgkqt", qg, suffix_k,
                       preferred_element_type=jnp.float32) * scale
    w_suf, lse_suf = masked_softmax_lse(s_suf,
                                        jnp.arange(t_max) <= self.step)
    o_suf = jnp.einsum("pgkqt,pgtkh->pgkqh", w_suf.astype(suffix_v.dtype),
                       suffix_v, preferred_element_type=jnp.float32)
    out = merge_lse(o_pre, lse_pre, o_suf, lse_suf)         # [P, G, K, Q, H]
    out = out.reshape(p * g, 1, n, h).astype(q.dtype)
    return out, (prefix_k, prefix_v, suffix_k, suffix_v)
