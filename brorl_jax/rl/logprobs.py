"""Token log-probs and entropies without materializing [B, T, V] logits.

logits = hidden @ w_unembed / temperature is computed one [B, tc, vc] tile
at a time: an outer `lax.map` over sequence chunks of tc positions, and an
inner `lax.scan` over vocabulary chunks of vc entries that keeps an online
log-sum-exp per position,

  m = running max of z,  s = sum exp(z - m),  t = sum exp(z - m) (z - m),

so that log Z = m + log s and the entropy H = log Z - E[z] = log s - t/s
(t is rescaled with s whenever m grows; keeping it relative to m avoids
the cancellation of m + log s - E[z] when the logits are large).
The target's logit is picked from the one chunk that owns it.

The vocabulary step is wrapped in `jax.checkpoint`: its residuals are its
inputs (the [B, tc] running statistics), and the backward pass recomputes
the tile's logits, so neither pass holds more than one [B, tc, vc] f32 tile
(plus nV x [B, T] statistics) however large V is. The cost is one extra
hidden @ w per tile in the backward pass, as in any fused cross-entropy.

When V is not a multiple of vc the last chunk is slid back to end at V and
the columns that an earlier chunk already owns are masked to -inf, so `w`
is never padded or copied.

The weight crosses the mesh once per call (one micro-batch of the update):
it is cast to the compute dtype and gathered whole before the loops, so no
tile is all-gathered inside them (slicing the FSDP-sharded weight per tile
gathered it once per vocabulary step). Its gradient does not flow through
that copy: each tile's matmul (`_tile_logits`, a custom VJP) sends the
weight gradient, accumulated and emitted in float32, to the master weight
itself, so the optimizer and the cross-device reduction see float32 however
low the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from brorl_jax.model import attention as attn_lib
from brorl_jax.model.prefixed_attention import PrefixedAttention
from brorl_jax.model.sharding import constrain
from brorl_jax.model.transformer import Policy, positions_from_valid
from brorl_jax.rl.slots import Slots


@jax.custom_vjp
def _tile_logits(hidden, w_tile, master_tile):
  """[B, tc, D] x [D, vc] -> [B, tc, vc] f32 logits of one tile.

  `w_tile` (compute dtype, gathered) is what the matmul reads;
  `master_tile` (the parameter's own dtype and layout) only receives the
  weight gradient, in float32, so it never takes the compute dtype.
  """
  del master_tile  # read only by the backward pass
  return jnp.einsum("btd,dv->btv", hidden, w_tile,
                    preferred_element_type=jnp.float32)


def _tile_logits_fwd(hidden, w_tile, master_tile):
  # A 0-d array stands for the master's dtype (residuals are arrays).
  return _tile_logits(hidden, w_tile, master_tile), (
      hidden, w_tile, jnp.zeros((), master_tile.dtype))


def _tile_logits_bwd(res, ct):
  hidden, w_tile, master_like = res
  # As JAX's own transpose of the matmul: f32 products, then the input's
  # dtype for the hidden states; the weight's gradient stays float32 until
  # it reaches the master weight (in its dtype: f32 in the recipes).
  d_hidden = jnp.einsum("btv,dv->btd", ct, w_tile,
                        preferred_element_type=jnp.float32)
  d_w = jnp.einsum("btd,btv->dv", hidden, ct,
                   preferred_element_type=jnp.float32)
  return (d_hidden.astype(hidden.dtype), jnp.zeros_like(w_tile),
          d_w.astype(master_like.dtype))


_tile_logits.defvjp(_tile_logits_fwd, _tile_logits_bwd)


def _vocab_step(carry, chunk, hidden, targets, w, w_master, inv_temp,
                vocab_chunk, with_entropy):
  """One [B, tc, vc] tile: updates the online statistics of every position.

  `w` is the gathered compute-dtype copy the matmul reads, `w_master` the
  weight that takes the gradient (see `_tile_logits`).
  """
  m, s, t, z_target = carry  # each [B, tc] f32
  vocab = w.shape[1]
  owned_start = chunk * vocab_chunk
  # The last chunk slides back to stay inside [0, V); see module docstring.
  start = jnp.minimum(owned_start, vocab - vocab_chunk)
  tile = lambda x: jax.lax.dynamic_slice_in_dim(  # noqa: E731
      x, start, vocab_chunk, axis=1)
  z = _tile_logits(hidden, tile(w), tile(w_master)) * inv_temp  # [B,tc,vc]
  owned = start + jnp.arange(vocab_chunk) >= owned_start  # [vc]
  z = jnp.where(owned, z, -jnp.inf)
  # log Z does not depend on the shift m, so no gradient flows through it;
  # this also keeps ties in the max from producing odd gradients.
  m_new = jnp.maximum(m, jax.lax.stop_gradient(z.max(-1)))
  e = jnp.exp(z - m_new[..., None])  # [B, tc, vc], 0 where not owned
  scale = jnp.exp(m - m_new)
  s_new = s * scale + e.sum(-1)
  if with_entropy:
    # t is kept relative to the shift, t = sum exp(z - m) (z - m) <= 0, so
    # H = log s - t / s adds two non-negative terms (no cancellation).
    shift = jnp.where(jnp.isfinite(m), m - m_new, 0.0)  # <= 0
    rel = jnp.where(owned, z - m_new[..., None], 0.0)
    t = scale * (t + shift * s) + (e * rel).sum(-1)
  s = s_new
  hit = ((targets >= owned_start) & (targets < owned_start + vocab_chunk)
         & (targets < vocab))
  local = jnp.clip(targets - start, 0, vocab_chunk - 1)
  z_hit = jnp.take_along_axis(z, local[..., None], axis=-1)[..., 0]
  z_target = z_target + jnp.where(hit, z_hit, 0.0)
  return (m_new, s, t, z_target), None


def token_logprobs(
    hidden: jax.Array,
    w_unembed: jax.Array,
    targets: jax.Array,
    temperature: float | jax.Array = 1.0,
    *,
    vocab_chunk: int = 8192,
    seq_chunk: int = 512,
    return_entropy: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
  """log softmax(hidden @ w / temperature)[target] and entropy, chunked.

  Args:
    hidden: [B, T, D] final hidden states (after the last norm); the matmul
      runs in this dtype with f32 accumulation.
    w_unembed: [D, V] unembedding (the transposed embedding when tied), in
      the parameters' dtype: it is cast to `hidden.dtype` and gathered once
      here, and its gradient comes back in that dtype (f32 master weights
      get f32 gradients, accumulated in f32).
    targets: [B, T] int token ids whose log-prob is wanted. Ids outside
      [0, V) (e.g. padding -1) give logp = -log Z: mask them in the loss.
    temperature: the sampler's temperature, so these are the log-probs of
      the distribution the rollouts were sampled from.
    vocab_chunk: vc, vocabulary entries per tile (clipped to V).
    seq_chunk: tc, positions per tile (clipped to T; T is padded up to a
      multiple internally).
    return_entropy: also compute the entropy of each position's
      distribution (one more multiply-add per logit).

  Returns:
    (logp [B, T] f32, entropy [B, T] f32 or None).
  """
  batch, length, _ = hidden.shape
  vocab = w_unembed.shape[1]
  vc = min(vocab_chunk, vocab)
  tc = min(seq_chunk, length)
  num_vocab_chunks = math.ceil(vocab / vc)
  num_seq_chunks = math.ceil(length / tc)
  pad = num_seq_chunks * tc - length
  inv_temp = 1.0 / jnp.asarray(temperature, jnp.float32)
  # One cast and one gather per call, outside the loops; no gradient flows
  # through this copy (it reaches `w_unembed` through `_tile_logits`).
  w_compute = constrain(
      jax.lax.stop_gradient(w_unembed.astype(hidden.dtype)), (None, None))

  # [nT, B, tc, ...]: sequence chunks lead so lax.map can walk them.
  hidden_c = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  hidden_c = hidden_c.reshape(batch, num_seq_chunks, tc, -1).swapaxes(0, 1)
  targets_c = jnp.pad(targets, ((0, 0), (0, pad)))
  targets_c = targets_c.reshape(batch, num_seq_chunks, tc).swapaxes(0, 1)

  step = jax.checkpoint(_vocab_step, static_argnums=(7, 8))

  def seq_chunk_fn(xs):
    h, tgt = xs  # [B, tc, D], [B, tc]
    zeros = jnp.zeros((batch, tc), jnp.float32)
    init = (jnp.full((batch, tc), -jnp.inf), zeros, zeros, zeros)
    body = lambda carry, i: step(carry, i, h, tgt, w_compute, w_unembed,
                                 inv_temp, vc, return_entropy)
    (m, s, t, z_target), _ = jax.lax.scan(
        body, init, jnp.arange(num_vocab_chunks))
    log_s = jnp.log(s)
    logp = z_target - m - log_s
    entropy = log_s - t / s if return_entropy else zeros
    return logp, entropy

  logp, entropy = jax.lax.map(seq_chunk_fn, (hidden_c, targets_c))
  # [nT, B, tc] -> [B, T]
  unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, -1)[:, :length]
  return unchunk(logp), (unchunk(entropy) if return_entropy else None)


def response_logprobs(policy: Policy, params: Any, inputs: jax.Array,
                      valid: jax.Array, targets: jax.Array, *,
                      temperature: float, vocab_chunk: int, seq_chunk: int,
                      with_entropy: bool = True):
  """Log-probs (and entropies) of the response tokens of `prompt ++ response`
  rows under softmax(logits / temperature), chunked over the vocabulary.

  Returns:
    (logp [B, T] f32, entropy [B, T] f32 or None).
  """
  model = policy.bind(params)
  hidden, _ = model(inputs, positions_from_valid(valid),
                    attn_lib.FullAttention(
                        valid, backend=policy.cfg.attention_backend))
  t = targets.shape[1]
  hidden = hidden[:, -t:]                     # positions predicting responses
  # The master weight (parameter dtype): token_logprobs casts and gathers
  # it once, and returns its gradient in that dtype.
  return token_logprobs(hidden, model.unembed_matrix(master=True), targets,
                        temperature,
                        vocab_chunk=vocab_chunk, seq_chunk=seq_chunk,
                        return_entropy=with_entropy)


def prefixed_logprobs(policy: Policy, params: Any, slots: Slots, *,
                      temperature: float, vocab_chunk: int, seq_chunk: int,
                      with_entropy: bool = True):
  """`response_logprobs` of slots, each prompt computed once per slot.

  The prompts [U, Wp] run through the decoder once, keeping every layer's
  keys and values; the rollouts' tokens [U * c, T - 1] then run through the
  same decoder (the same `Attention` modules: projections, norms, RoPE),
  attending to their slot's prompt and to their own earlier tokens
  (`PrefixedAttention`). The first response token is predicted by the
  prompt's last position, shared by the slot's rows. Autodiff through the
  two calls sums every row's gradient into the shared prompt, the sum the
  repeated rows `prompt ++ response` give.

  Returns:
    (logp [U * c, T] f32, entropy [U * c, T] f32 or None), rows slot-major.
  """
  model = policy.bind(params)
  backend = policy.cfg.attention_backend
  u, c, t = slots.targets.shape
  hidden, kv = model(slots.prompt, positions_from_valid(slots.prompt_valid),
                     attn_lib.FullAttention(slots.prompt_valid,
                                            backend=backend, return_kv=True))
  d = hidden.shape[-1]
  first = jnp.broadcast_to(hidden[:, None, -1:], (u, c, 1, d))
  if t > 1:
    # The last response token is only a target, never an input.
    inputs = slots.flat(slots.targets[..., :-1])            # [U*c, T-1]
    valid = slots.flat(slots.response_valid[..., :-1])
    positions = slots.flat(jnp.broadcast_to(
        slots.prompt_lengths[:, None, None] + jnp.arange(t - 1), (u, c, t - 1)))
    own, _ = model(inputs, positions,
                   PrefixedAttention(slots.prompt_valid, valid, backend), kv)
    first = jnp.concatenate([first, own.reshape(u, c, t - 1, d)], axis=2)
  return token_logprobs(first.reshape(u * c, t, d),
                        model.unembed_matrix(master=True),
                        slots.flat(slots.targets), temperature,
                        vocab_chunk=vocab_chunk, seq_chunk=seq_chunk,
                        return_entropy=with_entropy)
