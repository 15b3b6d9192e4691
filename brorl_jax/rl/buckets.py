"""Length buckets of the update: a micro-batch costs what its rows need.

Update rows are `prompt ++ response` at the maximum length
S = Lp + T - 1 whatever their responses' lengths, and RL responses are
long-tailed (a mean far below T, a few at it). Within each mini-batch rows
are sorted by the response length they need (longest first; rows that do
not train need none) and cut into micro-batches, and each micro-batch runs
at the smallest of a few bucket lengths that holds its longest row.

Buckets halve the response from T down (T, T/2, T/4, ...: `num_buckets` of
them), each input length rounded up to one the attention backend computes
without padding (`attention_kernels.length_granule`) and kept where it
saves a quarter of the next one's length: above the smallest bucket a
micro-batch runs at about twice the length its longest row needs at most.
All buckets are branches of one `lax.switch` in the one compiled update, so
compilation stays bounded and ahead of time.

Cutting removes only columns past the last counted token of every row of
the micro-batch: padding, with a zero loss mask, that no earlier position
attends to. The loss normaliser is computed on the whole mini-batch before,
so loss and gradient equal the untrimmed ones (up to float summation order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from brorl_jax.model.attention_kernels import length_granule
from brorl_jax.rl.batch import Rows


def bucket_targets(prompt_len: int, max_new_tokens: int, num_buckets: int,
                   backend: str) -> tuple[int, ...]:
  """Response columns of each bucket, ascending; the last is T (no cut).

  Args:
    prompt_len: Lp, the rows' prompt columns (left-padded).
    max_new_tokens: T, the rows' response columns.
    num_buckets: at most this many buckets (fewer where, rounded up to
      the backend's granule, one would not save a quarter of the next
      larger one's length).
    backend: the resolved attention backend (never "auto").

  Returns:
    The target counts r of each bucket; its input length is Lp + r - 1.
  """
  out = [max_new_tokens]
  last = prompt_len + max_new_tokens - 1      # the input length of out[-1]
  for i in range(1, num_buckets):
    length = prompt_len + -(-max_new_tokens // 2**i) - 1
    granule = length_granule(backend, length)
    length = -(-length // granule) * granule
    # A bucket must save a quarter of the next one's length to be worth
    # its compilation (a 49-token row rounded to 48 is not).
    if prompt_len <= length <= 0.75 * last:
      out.append(length - prompt_len + 1)
      last = length
  return tuple(sorted(out))


def needed_targets(loss_mask: jax.Array) -> jax.Array:
  """[..., T] -> [...] int32: 1 + the last counted position (0: none)."""
  t = loss_mask.shape[-1]
  return (loss_mask * jnp.arange(1, t + 1, dtype=jnp.int32)).max(-1)


def row_order(loss_mask: jax.Array, perm: jax.Array, num_minibatches: int,
              by_length: bool) -> jax.Array:
  """The update's row order, as indices into the step's rows.

  Args:
    loss_mask: [R, T] the step's rows' loss mask.
    perm: [R] the shuffle (`arange(R)`: none); row `perm[i]` goes to
      position i, and mini-batch j takes positions j * R/M onwards.
    num_minibatches: M.
    by_length: sort each mini-batch longest needed response first (for
      buckets); else only the rows that train first (one bucket).

  Returns:
    [M, R/M] int32: each mini-batch's rows, stably sorted; rows that do
    not train come last, where they fill whole micro-batches that the
    update skips. Only these indices move: the update gathers each
    micro-batch's rows from the step's (row-sharded) rows when it runs
    it, never a reordered copy of them all.
  """
  perm = perm.reshape(num_minibatches, -1)
  need = needed_targets(loss_mask)[perm]                      # [M, R/M]
  key = -need if by_length else (need == 0).astype(jnp.int32)
  order = jnp.argsort(key, axis=1, stable=True)
  return jnp.take_along_axis(perm, order, axis=1).astype(jnp.int32)


def branch_index(loss_mask: jax.Array, targets: tuple[int, ...]) -> jax.Array:
  """A micro-batch's `lax.switch` index: 0 skips it (no counted token),
  1 + i runs it at bucket i, the smallest holding its longest row."""
  need = needed_targets(loss_mask).max()
  bucket = jnp.searchsorted(jnp.asarray(targets, jnp.int32), need)
  return jnp.where(need == 0, 0, 1 + bucket).astype(jnp.int32)


def cut(micro: Rows, targets: int) -> Rows:
  """The micro-batch's first `targets` response columns (and their inputs)."""
  if targets == micro.targets.shape[-1]:
    return micro
  length = micro.inputs.shape[-1] - micro.targets.shape[-1] + targets
  return micro.replace(
      inputs=micro.inputs[:, :length], valid=micro.valid[:, :length],
      targets=micro.targets[:, :targets],
      loss_mask=micro.loss_mask[:, :targets],
      old_logp=micro.old_logp[:, :targets])
