"""Test-only conversions of `SharedPrefixAttention`'s stored suffix layouts.

The sampler writes the rollouts' keys and values into the suffix cache one
step at a time and never converts a whole cache; the tests do, to compare
with attention over a per-rollout cache.
"""

from __future__ import annotations

import jax


def to_suffix_layout(k: jax.Array, v: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """[P, G, T, K, H] keys and values -> the stored suffix layouts."""
  p, g, t, kv, h = k.shape
  return (k.transpose(0, 1, 3, 4, 2).reshape(p * g, kv, h, t),
          v.transpose(0, 1, 3, 2, 4).reshape(p * g, kv, t, h))


def from_suffix_layout(k: jax.Array, v: jax.Array, p: int
                       ) -> tuple[jax.Array, jax.Array]:
  """The stored suffix layouts -> [P, G, T, K, H] keys and values."""
  b, kv, h, t = k.shape
  return (k.reshape(p, b // p, kv, h, t).transpose(0, 1, 4, 2, 3),
          v.reshape(p, b // p, kv, t, h).transpose(0, 1, 3, 2, 4))
