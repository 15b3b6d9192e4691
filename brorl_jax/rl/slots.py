"""The update's rows in slots: c rollouts of one prompt, the prompt once.

A step's rollouts are P groups of G. The update splits them into slots of
c = gcd(`micro_batch_size`, G) rollouts of one prompt, and a micro-batch is
U = micro_batch_size / c slots: the forward runs each slot's prompt once
(`rl/logprobs.prefixed_logprobs`), its c rollouts attending to it
(`model/prefixed_attention.py`), so a micro-batch computes U prompts
instead of U * c copies of them. The demo (G = 32, 64 rows): 2 prompts x
32 rollouts; ProRL (G = 16, 64 rows): 4 x 16; BroRL (G = 512, 64 rows):
1 x 64.

Order (`slot_order`, on device, static shapes):
  1. each group's rollouts in a random order, those that train first, cut
     into G / c slots (so a group's dead rollouts, e.g. past its own N under
     adaptive allocation, fill its last slots);
  2. the P * G / c slots shuffled and split into `num_minibatches`
     mini-batches (PPO's shuffle, in units of c rollouts of one prompt: with
     c = 1 it is the row shuffle; veRL keeps a prompt's rollouts together);
  3. with length buckets, each prompt's rollouts within a mini-batch re-cut
     longest first, and the mini-batch's slots sorted by their longest
     rollout; without, slots that train first. Slots without a counted
     token come last, where they fill whole micro-batches the update skips.
The loss normalizer is the mini-batch's, so the update's loss and gradient
do not depend on how its rows are grouped (up to float summation order).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from brorl_jax.model.sharding import constrain
from brorl_jax.rl.batch import RolloutBatch


def slot_rows(micro_batch_size: int, group: int) -> int:
  """c, the rollouts per slot: the most that divide both a micro-batch and
  a group (so slots tile both exactly)."""
  return math.gcd(micro_batch_size, group)


def slot_order(need: jax.Array, key: jax.Array, num_minibatches: int,
               rows_per_slot: int, *, shuffle: bool, by_length: bool
               ) -> jax.Array:
  """The update's slots, as flat row indices (row = prompt * G + rollout).

  Args:
    need: [P, G] int32 response columns each rollout's loss needs (1 + its
      last counted position; 0: it does not train).
    key: the step's shuffle key.
    num_minibatches: M (must divide the P * G / c slots).
    rows_per_slot: c (must divide G).
    shuffle: shuffle rollouts within groups and slots across mini-batches.
    by_length: length buckets are on: order each mini-batch's slots by
      their longest rollout (see the module docstring).

  Returns:
    [M, S / M, c] int32, each slot's c rows; all rows of a slot belong to
    one prompt.
  """
  p, g = need.shape
  c = rows_per_slot
  k_rows, k_slots = jax.random.split(key)
  dead = (need == 0).astype(jnp.int32)
  noise = (jax.random.uniform(k_rows, (p, g)) if shuffle
           else jnp.broadcast_to(jnp.arange(g, dtype=jnp.float32), (p, g)))
  within = jnp.lexsort((noise, dead), axis=-1)              # [P, G]
  rows = (within + (jnp.arange(p) * g)[:, None]).astype(jnp.int32)
  slots = rows.reshape(p * g // c, c)                       # [S, c]
  if shuffle:
    slots = jax.random.permutation(k_slots, slots, axis=0)
  slots = slots.reshape(num_minibatches, -1, c)             # [M, S/M, c]
  flat_need = need.reshape(-1)
  if by_length:
    slots = jax.vmap(lambda s: _recut(s, flat_need, g, p))(slots)
  slot_need = flat_need[slots].max(-1)                      # [M, S/M]
  sort_key = -slot_need if by_length else (slot_need == 0).astype(jnp.int32)
  order = jnp.argsort(sort_key, axis=1, stable=True)
  return jnp.take_along_axis(slots, order[..., None], axis=1)


def _recut(slots: jax.Array, need: jax.Array, g: int, p: int) -> jax.Array:
  """One mini-batch's slots [S', c] re-cut: each prompt's rows longest
  first (the prompts in the order of their first slot)."""
  s, c = slots.shape
  prompt = slots[:, 0] // g                                 # [S']
  first = jnp.full((p,), s, jnp.int32).at[prompt].min(
      jnp.arange(s, dtype=jnp.int32))
  rows = slots.reshape(-1)
  # A prompt holds a multiple of c rows here (whole slots), so the re-cut
  # slots never straddle two prompts.
  order = jnp.lexsort((-need[rows], first[rows // g]))
  return rows[order].reshape(s, c)


@struct.dataclass
class Slots:
  """U slots of c rollouts of one prompt each (one micro-batch).

  Attributes:
    prompt: [U, Wp] int32, left-padded prompts.
    prompt_valid: [U, Wp] bool.
    prompt_lengths: [U] int32.
    targets: [U, c, T] int32 responses.
    response_valid: [U, c, T] bool, tokens within the response's length.
    loss_mask: [U, c, T] bool, tokens that count.
    old_logp: [U, c, T] f32.
    advantages: [U, c] f32.
  """

  prompt: jax.Array
  prompt_valid: jax.Array
  prompt_lengths: jax.Array
  targets: jax.Array
  response_valid: jax.Array
  loss_mask: jax.Array
  old_logp: jax.Array
  advantages: jax.Array

  def flat(self, x: jax.Array) -> jax.Array:
    """[U, c, ...] -> [U * c, ...] rows (slot-major)."""
    return x.reshape(-1, *x.shape[2:])


def gather(batch: RolloutBatch, rows: jax.Array) -> Slots:
  """The slots `rows` [U, c] (flat row indices, one prompt per slot).

  The rows' arrays are gathered row-sharded (`batch` over the flat rows),
  as the repeated-rows update gathers its micro-batches.
  """
  u, c = rows.shape
  p, g, t = batch.tokens.shape
  lp = batch.prompt_tokens.shape[1]
  flat = rows.reshape(-1)
  prompts = rows[:, 0] // g
  take = lambda x: constrain(  # noqa: E731
      jnp.take(x.reshape(p * g, *x.shape[2:]), flat, axis=0),
      ("batch",) + (None,) * (x.ndim - 2))
  lengths = take(batch.lengths)
  prompt_lengths = jnp.take(batch.prompt_lengths, prompts)
  resp_valid = jnp.arange(t)[None] < lengths[:, None]
  rs = lambda x: x.reshape(u, c, *x.shape[1:])  # noqa: E731
  return Slots(
      prompt=constrain(jnp.take(batch.prompt_tokens, prompts, axis=0),
                       ("batch", None)),
      prompt_valid=jnp.arange(lp)[None] >= (lp - prompt_lengths)[:, None],
      prompt_lengths=prompt_lengths,
      targets=rs(take(batch.tokens)),
      response_valid=rs(resp_valid),
      loss_mask=rs(resp_valid & take(batch.mask)[:, None]),
      old_logp=rs(take(batch.logprobs)),
      advantages=rs(take(batch.advantages).astype(jnp.float32)))


def cut(slots: Slots, width: int, targets: int) -> Slots:
  """The slots' last `width` prompt columns and first `targets` response
  columns (cuts only padding when the micro-batch's bucket holds it)."""
  return slots.replace(
      prompt=slots.prompt[:, -width:],
      prompt_valid=slots.prompt_valid[:, -width:],
      targets=slots.targets[..., :targets],
      response_valid=slots.response_valid[..., :targets],
      loss_mask=slots.loss_mask[..., :targets],
      old_logp=slots.old_logp[..., :targets])


def need(batch: RolloutBatch) -> jax.Array:
  """[P, G] int32: 1 + each rollout's last counted position (0: none), as
  `buckets.needed_targets` of its loss mask; also its counted tokens (the
  mask is the response's first `length` tokens, or none)."""
  t = batch.tokens.shape[-1]
  return jnp.where(batch.mask, jnp.clip(batch.lengths, 0, t), 0).astype(
      jnp.int32)
