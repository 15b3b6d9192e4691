"""The refill decode: a fixed set of slots that follows the work (device code).

Each of P prompts owns a pool of G slots (the `[P, G]` layout of the
fixed-chunk decode, so the shared-prefix read stays one batched product per
prompt) and a queue of its N rollouts. A slot decodes one rollout at its own
position and suffix length; when the rollout ends, the slot takes the
prompt's next rollout in the same step, starting from that rollout's first
token (drawn from the prefill's distribution in `init_state`). A slot never
serves another prompt: its queries would then read another prompt's prefix,
and the prefix product would no longer be one batched product per prompt.

Draws are keyed by (prompt, rollout, token index), exactly as the
fixed-chunk decode keys them, so every rollout's tokens are the same whatever
the slot count, and its log-probs equal to float rounding.

The decode runs in segments of at most `max_steps` steps (`run_segment`),
its whole state carried between calls, so the host can score finished
rollouts and honour a preemption between segments.

Suffix width. Each slot's suffix read stops at its own length. The kernel
backends (GPU, TPU) read only that far, so their buffer stays whole. The
`reference` and `blockwise` reads are the masked product over the whole
buffer, so for them the buffer is cut, between segments, to the slots the
next segment can reach: the longest busy slot's position plus the segment's
steps, rounded up to one of `WIDTH_BUCKETS` widths (`suffix_width`,
`fit_width`); slots past it hold only earlier, finished rollouts' keys. Each
width is one compile of the segment program.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from brorl_jax.model.sharding import constrain, constrain_merged
from brorl_jax.rollout import suffix_attention
from brorl_jax.rollout.shared_prefix import SharedPrefixAttention

# Suffix widths a refill decode compiles: multiples of ceil(T / 4), so at
# most four segment programs per run. On the sampler bench's skewed lengths
# (T = 1024, 64 slots, 256-step segments) the segments' mean width is ~0.83 T
# with quarter widths or eighth widths alike (an event simulation of the
# bench's lengths); a demo-model step costs ~4 ms plus ~13 us per suffix slot.
WIDTH_BUCKETS = 4


@struct.dataclass
class RefillState:
  """The refill decode's carried state (P prompts, N rollouts, G slots).

  Attributes:
    steps: int32, decode steps run so far.
    tokens / logprobs: [P, N, T] every rollout's tokens (`pad_id` after its
      end) and log-probs (0 after its end).
    lengths: [P, N] int32 tokens generated so far.
    done: [P, N] bool, the rollout has ended.
    queue: [P, N] int32 rollout indices in serving order (rollouts not
      already ended by their first token come first).
    live: [P] int32 rollouts that need decoding.
    taken: [P] int32 queue entries handed to slots so far.
    slot_rollout: [P, G] int32 rollout a slot decodes (N: idle).
    slot_pos: [P, G] int32 index of the slot's current token (0 when idle,
      so that the busy slots set the suffix width).
    slot_token: [P, G] int32 the slot's current token (the next input).
    suffix_k / suffix_v: per layer, the slots' suffix caches, W <= T slots
      wide (`fit_width`).
    busy_slots: int32 slot-steps that produced a token.
    total_slots: int32 slot-steps run.
  """

  steps: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  done: jax.Array
  queue: jax.Array
  live: jax.Array
  taken: jax.Array
  slot_rollout: jax.Array
  slot_pos: jax.Array
  slot_token: jax.Array
  suffix_k: tuple[jax.Array, ...]
  suffix_v: tuple[jax.Array, ...]
  busy_slots: jax.Array
  total_slots: jax.Array

  @property
  def active(self) -> jax.Array:
    """[P, G] bool, slots decoding a rollout."""
    return self.slot_rollout < self.tokens.shape[1]

  @property
  def width(self) -> int:
    """W, the suffix buffers' slots."""
    return self.suffix_v[0].shape[2]

  def extent(self) -> jax.Array:
    """int32, the busy slots' longest position + 1 (0: every slot idle)."""
    return jnp.max(jnp.where(self.active, self.slot_pos + 1, 0))


def suffix_width(extent: int, steps: int, t_max: int,
                 backend: str = "reference") -> int:
  """Suffix slots a segment of `steps` steps can write, in whole buckets.

  A busy slot at position x writes its keys at x, x + 1, ... (one a step); a
  slot refilled in the segment starts again at 0. So `steps` steps from busy
  positions below `extent` write below extent + steps - 1. A kernel backend
  reads each row at its own length: its buffer stays whole.
  """
  if suffix_attention.reads_per_row(backend):
    return suffix_attention.suffix_slots(t_max, backend)
  bucket = -(-t_max // WIDTH_BUCKETS)
  need = max(extent, 1) + steps - 1
  return min(t_max, -(-need // bucket) * bucket)


def fit_width(x: jax.Array, width: int, axis: int,
              lead: tuple[int, int]) -> jax.Array:
  """One suffix buffer cut or zero-padded to `width` slots along `axis`.

  `lead` is (P, G), the buffer's flat first axis (for its sharding). The
  caller guarantees no busy slot is at or past `width`.
  """
  have = x.shape[axis]
  if width < have:
    x = jax.lax.slice_in_dim(x, 0, width, axis=axis)
  elif width > have:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, width - have)
    x = jnp.pad(x, pad)
  return constrain_merged(x, ("batch", "group"), lead, ("act_kv", None, None))


SampleFn = Callable[[jax.Array, jax.Array, jax.Array],
                    tuple[jax.Array, jax.Array]]


def slot_keys(prompt_keys: jax.Array, rollouts: jax.Array) -> jax.Array:
  """[P, X] row keys fold_in(prompt key, rollout) (`sampling.row_keys`)."""
  return jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)))(prompt_keys,
                                                           rollouts)


def init_state(logits: jax.Array, prompt_keys: jax.Array, limits: jax.Array,
               *, slots: int, t_max: int, stop: jax.Array, pad_id: int,
               sample: SampleFn, suffix_shape: tuple[int, int, Any],
               num_layers: int, width: int | None = None,
               backend: str = "reference") -> RefillState:
  """Draws every rollout's first token and fills the slots.

  Args:
    logits: [P, V] the prefill's next-token logits.
    prompt_keys: [P] keys fold_in(rng, global prompt index).
    limits: [P, N] int32 per-rollout length limits (<= T).
    slots: G, slots per prompt.
    t_max: T.
    stop: stop token ids.
    pad_id: written after a rollout's end.
    sample: (logits, keys, step) -> (tokens, logprobs).
    suffix_shape: (kv heads, head dim, dtype) of the suffix caches.
    num_layers: layers (one suffix cache each).
    width: suffix slots of the first segment (default T).
    backend: the decode backend (the suffix buffers' layout).
  """
  p, n = limits.shape
  ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (p, n))
  first = jnp.broadcast_to(logits[:, None, :], (p, n, logits.shape[-1]))
  tok0, lp0 = sample(first, slot_keys(prompt_keys, ids), jnp.int32(0))
  tokens = jnp.full((p, n, t_max), pad_id, jnp.int32).at[:, :, 0].set(tok0)
  tokens = constrain(tokens, ("batch", "group", None))
  logprobs = jnp.zeros((p, n, t_max), jnp.float32).at[:, :, 0].set(lp0)
  done = jnp.isin(tok0, stop) | (limits <= 1)
  queue = jnp.argsort(done, axis=1, stable=True).astype(jnp.int32)
  live = jnp.sum(~done, axis=1, dtype=jnp.int32)
  g = jnp.arange(slots, dtype=jnp.int32)[None, :]
  first_q = jnp.minimum(g, n - 1)
  slot_rollout = jnp.where(g < live[:, None],
                           jnp.take_along_axis(queue, jnp.broadcast_to(
                               first_q, (p, slots)), 1), n)
  kv, hd, dtype = suffix_shape
  # Sharded over the slots like the segment keeps them: unconstrained, the
  # zeros came out replicated (XLA:GPU, BroRL's 4,096 slots: 128 GiB per
  # device at 2 layers), and the first segment would reshard them.
  suffix = [tuple(constrain_merged(x, ("batch", "group"), (p, slots),
                                   ("act_kv", None, None))
                  for x in SharedPrefixAttention.empty_suffix(
                      p, slots, width or t_max, kv, hd, dtype, backend))
            for _ in range(num_layers)]
  return RefillState(
      steps=jnp.int32(0), tokens=tokens, logprobs=logprobs,
      lengths=constrain(jnp.ones((p, n), jnp.int32), ("batch", "group")),
      done=constrain(done, ("batch", "group")), queue=queue, live=live,
      taken=jnp.minimum(live, slots),
      slot_rollout=constrain(slot_rollout, ("batch", "group")),
      slot_pos=jnp.zeros((p, slots), jnp.int32),
      slot_token=jnp.take_along_axis(tok0, jnp.minimum(slot_rollout, n - 1),
                                     1),
      suffix_k=tuple(k for k, _ in suffix),
      suffix_v=tuple(v for _, v in suffix),
      busy_slots=jnp.int32(0), total_slots=jnp.int32(0))


def step(model, prefill, prompt_keys: jax.Array, limits: jax.Array,
         s: RefillState, *, stop: jax.Array, sample: SampleFn,
         backend: str = "reference", interpret: bool = False) -> RefillState:
  """One decode step of every slot, then the refill of the freed slots.

  `backend` / `interpret`: the suffix read (`SharedPrefixAttention`).
  """
  p, slots = s.slot_rollout.shape
  n, t_max = s.tokens.shape[1], s.tokens.shape[2]
  active = s.active
  rid = jnp.minimum(s.slot_rollout, n - 1)             # a valid index
  positions = prefill.lengths[:, None] + s.slot_pos
  caches = tuple(zip(prefill.k, prefill.v, s.suffix_k, s.suffix_v))
  hidden, caches = model(
      s.slot_token.reshape(p * slots, 1), positions.reshape(p * slots, 1),
      SharedPrefixAttention(prefix_valid=prefill.valid,
                            step=s.slot_pos.reshape(p * slots),
                            backend=backend, interpret=interpret), caches)
  logits = model.logits(hidden)[:, 0].reshape(p, slots, -1)
  t1 = s.slot_pos + 1                                   # index of the draw
  tok, lp = sample(logits, slot_keys(prompt_keys, rid), t1)
  # Idle slots write nowhere: their rollout index N is out of bounds.
  prow = jnp.broadcast_to(jnp.arange(p)[:, None], (p, slots))
  where = (prow, s.slot_rollout, jnp.minimum(t1, t_max - 1))
  tokens = s.tokens.at[where].set(tok, mode="drop")
  logprobs = s.logprobs.at[where].set(lp, mode="drop")
  length = t1 + 1
  limit = jnp.take_along_axis(limits, rid, 1)
  ended = active & (jnp.isin(tok, stop) | (length >= limit))
  lengths = s.lengths.at[prow, s.slot_rollout].set(length, mode="drop")
  done = s.done.at[prow, s.slot_rollout].set(ended, mode="drop")
  # Sharded like the tokens' rows, so a host reads its finished rollouts'
  # flags and tokens from the same blocks (scoring.py).
  lengths = constrain(lengths, ("batch", "group"))
  done = constrain(done, ("batch", "group"))
  # Refill: the freed slots of a prompt take its next queued rollouts.
  free = ended | ~active
  rank = jnp.cumsum(free, axis=1, dtype=jnp.int32) - 1
  qi = s.taken[:, None] + rank
  take = free & (qi < s.live[:, None])
  new = jnp.take_along_axis(s.queue, jnp.minimum(qi, n - 1), 1)
  slot_rollout = jnp.where(take, new, jnp.where(free, n, s.slot_rollout))
  first = jnp.take_along_axis(tokens[:, :, 0], jnp.minimum(new, n - 1), 1)
  taken = jnp.minimum(s.taken + jnp.sum(free, axis=1, dtype=jnp.int32),
                      s.live)
  return RefillState(
      steps=s.steps + 1, tokens=tokens, logprobs=logprobs, lengths=lengths,
      done=done, queue=s.queue, live=s.live, taken=taken,
      slot_rollout=slot_rollout, slot_pos=jnp.where(free, 0, t1),
      slot_token=jnp.where(take, first, tok),
      suffix_k=tuple(c[2] for c in caches),
      suffix_v=tuple(c[3] for c in caches),
      busy_slots=s.busy_slots + jnp.sum(active, dtype=jnp.int32),
      total_slots=s.total_slots + p * slots)


def run_segment(model, prefill, prompt_keys: jax.Array, limits: jax.Array,
                state: RefillState, max_steps: jax.Array, *,
                stop: jax.Array, sample: SampleFn, backend: str = "reference",
                interpret: bool = False) -> RefillState:
  """Runs up to `max_steps` steps, fewer once every slot is idle."""
  end = state.steps + max_steps

  def cond(s):
    return (s.steps < end) & jnp.any(s.active)

  def body(s):
    return step(model, prefill, prompt_keys, limits, s, stop=stop,
                sample=sample, backend=backend, interpret=interpret)
  return jax.lax.while_loop(cond, body, state)
