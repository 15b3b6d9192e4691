"""Sampling rules: temperature, top-k, top-p, greedy; per-row random keys.

The log-prob recorded for a sampled token is always taken under the full
temperature-scaled distribution softmax(logits / T), the distribution the
policy loss uses, not the top-p/top-k truncated one: so the sampler's
log-probs serve as the PPO "old" log-probs without a recompute. With greedy
decoding (or T = 0) tokens are argmax and log-probs are under T = 1.

A token is drawn by inverting the distribution's CDF with one uniform per row
(two levels: a block of the vocabulary, then a token inside it), not by the
Gumbel-max trick, which needs V random numbers per row and step: on CPU the
draw then cost ~4x less (`inverse_cdf`).

Randomness is keyed per rollout row: row key = fold_in(fold_in(rng, prompt),
rollout), step key = fold_in(row key, step). With `jax_threefry_partitionable`
the draws then depend neither on the mesh layout nor on how a group is split
into decode chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def scaled_logits(logits: jax.Array, temperature: float) -> jax.Array:
  """logits / T in float32 (T = 0 means greedy: logits unscaled)."""
  logits = logits.astype(jnp.float32)
  return logits / temperature if temperature > 0 else logits


def truncate(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Masks logits outside the top-k and the top-p nucleus with NEG_INF.

  Args:
    logits: [B, V] float32, already temperature-scaled.
    top_k: keep the k largest (0: no limit).
    top_p: keep the smallest set of largest-probability tokens whose mass
      reaches top_p (1.0: no limit). The token that crosses top_p is kept.

  Returns:
    [B, V] float32 with excluded entries set to NEG_INF.
  """
  vocab = logits.shape[-1]
  if top_k <= 0 and top_p >= 1.0:
    return logits
  k = min(top_k, vocab) if top_k > 0 else vocab
  # Sorted candidates: top_k bounds the sort; top-p alone sorts the vocab.
  values, _ = jax.lax.top_k(logits, k)                       # [B, k] desc
  threshold = values[:, -1:]                                 # k-th largest
  if top_p < 1.0:
    probs = jax.nn.softmax(values, axis=-1)
    # Mass strictly before each candidate; keep while it is below top_p.
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p
    last = jnp.sum(keep, axis=-1, keepdims=True) - 1         # >= 0
    threshold = jnp.take_along_axis(values, last, axis=-1)
  # Ties at the threshold are all kept (a superset by measure zero).
  return jnp.where(logits >= threshold, logits, NEG_INF)


INVERSE_CDF_BLOCK = 256


def inverse_cdf(weights: jax.Array, u: jax.Array,
                block: int = INVERSE_CDF_BLOCK) -> jax.Array:
  """Draws index i with probability weights[i] / sum(weights), per row.

  Two-level inversion: cumulative sums over the vocabulary's blocks pick a
  block, cumulative sums inside it pick the token, so no cumulative sum runs
  over the whole vocabulary. Zero-weight entries are never drawn (also when
  float rounding puts the target past the last cumulative sum).

  Args:
    weights: [B, V] float32, >= 0, each row with positive sum.
    u: [B] float32 uniforms in [0, 1).
    block: block size.

  Returns:
    [B] int32 indices.
  """
  b, v = weights.shape
  nb = -(-v // block)
  w = jnp.pad(weights, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
  block_mass = w.sum(-1)                                     # [B, nb]
  upto = jnp.cumsum(block_mass, axis=-1)
  target = u * upto[:, -1]
  j = jnp.minimum(jnp.sum(upto <= target[:, None], -1), nb - 1)
  inside = target - jnp.take_along_axis(upto - block_mass, j[:, None],
                                        -1)[:, 0]
  wj = jnp.take_along_axis(w, j[:, None, None], 1)[:, 0]      # [B, block]
  i = jnp.minimum(jnp.sum(jnp.cumsum(wj, -1) <= inside[:, None], -1),
                  block - 1)
  idx = j * block + i
  # Rounding can land on a zero-weight slot (a masked token or padding):
  # take the row's last positive entry instead (an event of float measure).
  ok = jnp.take_along_axis(weights, jnp.minimum(idx, v - 1)[:, None],
                           -1)[:, 0] > 0
  last = v - 1 - jnp.argmax((weights > 0)[:, ::-1], axis=-1)
  return jnp.where(ok & (idx < v), idx, last).astype(jnp.int32)


def row_keys(rng: jax.Array, prompt_ids: jax.Array, rollout_ids: jax.Array
             ) -> jax.Array:
  """Per-row keys [P, G] from global prompt and rollout indices."""
  def one(p, g):
    return jax.random.fold_in(jax.random.fold_in(rng, p), g)
  return jax.vmap(jax.vmap(one, (None, 0)), (0, None))(prompt_ids,
                                                       rollout_ids)


def sample(logits: jax.Array, keys: jax.Array, step: jax.Array, *,
           temperature: float, top_k: int, top_p: float, greedy: bool
           ) -> tuple[jax.Array, jax.Array]:
  """Samples one token per row.

  Args:
    logits: [..., V] raw logits (any float dtype).
    keys: [...] per-row PRNG keys.
    step: int32 decode step folded into each row key: a scalar, or one per
      row ([...], the refill decode's rows are at different steps).
    temperature / top_k / top_p / greedy: the sampling rule.

  Returns:
    tokens: [...] int32.
    logprobs: [...] float32, log softmax(logits / T) of the chosen tokens.
  """
  lead = logits.shape[:-1]
  flat = logits.reshape(-1, logits.shape[-1])
  if greedy or temperature == 0:
    scaled = scaled_logits(flat, 1.0)
    tokens = jnp.argmax(scaled, axis=-1).astype(jnp.int32)
  else:
    scaled = scaled_logits(flat, temperature)
    masked = truncate(scaled, top_k, top_p)
    step_keys = jax.vmap(jax.random.fold_in)(
        keys.reshape(-1), jnp.broadcast_to(step, lead).reshape(-1))
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(step_keys)
    weights = jnp.exp(masked - jnp.max(masked, axis=-1, keepdims=True))
    tokens = inverse_cdf(weights, u)
  logz = jax.nn.logsumexp(scaled, axis=-1)
  chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
  return tokens.reshape(lead), (chosen - logz).reshape(lead)
