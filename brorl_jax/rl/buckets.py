"""Length buckets of the update: a micro-batch costs what its rows need.

Update rows are `prompt ++ response` at the maximum length
S = Lp + T - 1 whatever their responses' lengths, and RL responses are
long-tailed (a mean far below T, a few at it). Within each mini-batch rows
are sorted by the response length they need (longest first; rows that do
not train need none; `slots.slot_order`) and cut into micro-batches, and
each micro-batch runs at the smallest of a few bucket lengths that holds
its longest row. With the shared prefix (`rl/slots.py`) a row is its
response alone, and the micro-batch's prompts run at the smallest of a few
prompt widths holding its longest real prompt (`prompt_widths`): a
two-dimensional choice, still one `lax.switch`.

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


def prompt_widths(prompt_len: int, num_buckets: int,
                  backend: str) -> tuple[int, ...]:
  """Prompt columns of the shared-prefix update's prompt buckets, ascending;
  the last is Lp (no cut).

  A slot's prompt is left-padded to Lp; a micro-batch runs its prompts at
  the smallest width holding its longest real prompt. Widths halve Lp,
  round up to the backend's granule and are kept where they save a quarter
  of the next larger one, as `bucket_targets`.

  Args:
    prompt_len: Lp.
    num_buckets: at most this many widths.
    backend: the resolved attention backend.
  """
  out = [prompt_len]
  for i in range(1, num_buckets):
    width = -(-prompt_len // 2**i)
    granule = length_granule(backend, width)
    width = -(-width // granule) * granule
    if width <= 0.75 * out[-1]:
      out.append(width)
  return tuple(sorted(out))


def needed_targets(loss_mask: jax.Array) -> jax.Array:
  """[..., T] -> [...] int32: 1 + the last counted position (0: none)."""
  t = loss_mask.shape[-1]
  return (loss_mask * jnp.arange(1, t + 1, dtype=jnp.int32)).max(-1)


def branch_index(loss_mask: jax.Array, targets: tuple[int, ...]) -> jax.Array:
  """A micro-batch's `lax.switch` index: 0 skips it (no counted token),
  1 + i runs it at bucket i, the smallest holding its longest row."""
  need = needed_targets(loss_mask).max()
  bucket = jnp.searchsorted(jnp.asarray(targets, jnp.int32), need)
  return jnp.where(need == 0, 0, 1 + bucket).astype(jnp.int32)


def slots_branch_index(need: jax.Array, prompt_lengths: jax.Array,
                       widths: tuple[int, ...], targets: tuple[int, ...]
                       ) -> jax.Array:
  """A shared-prefix micro-batch's `lax.switch` index: 0 skips it (no
  counted token); 1 + w * len(targets) + r runs it at prompt width w and
  response bucket r, the smallest holding its longest prompt and row.

  Args:
    need: [U, c] int32 columns each row's loss needs (`needed_targets`).
    prompt_lengths: [U] int32 the slots' real prompt lengths.
    widths, targets: the compiled prompt widths and response buckets.
  """
  longest = need.max()
  trains = need.max(-1) > 0                                # [U]
  prompt = jnp.where(trains, prompt_lengths, 0).max()
  w = jnp.searchsorted(jnp.asarray(widths, jnp.int32), prompt)
  r = jnp.searchsorted(jnp.asarray(targets, jnp.int32), longest)
  return jnp.where(longest == 0, 0, 1 + w * len(targets) + r).astype(
      jnp.int32)


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
