"""Training attention of rollouts that share their prompt (shared prefix).

The update, the KL reference and the diagnostics' re-scoring run each
prompt once per slot of c rollouts (`rl/slots.py`): the prompt's tokens go
through the decoder once (`FullAttention(return_kv=True)` keeps every
layer's keys and values, RoPE applied), then the c rollouts' own tokens go
through it with this strategy, whose per-layer "cache" is that prompt's
keys and values. A rollout token's query sees the prompt's real keys and
its own earlier tokens, exactly the keys it sees in the row `prompt ++
response`; the prompt's keys and values are one array per slot, so autodiff
sums every rollout's gradient into them (the sum the repeated rows give).

Rows are flat, B = U * c, slot-major: row b belongs to slot b // c.

Backends (`model.attention_backend`, resolved as in `attention_kernels`):
  * `reference` and `blockwise` at one block (prompt and suffix each at
    most `attention_kernels.BLOCK`: the demo's 32 + 31): the masked product
    over [prompt keys | own keys], the prompt part one batched product per
    slot (c x T x Q query rows against its keys), autodiffed.
  * `blockwise` beyond: the online softmax over the prompt's key blocks,
    then the row's own key blocks, with a custom VJP that recomputes each
    block's probabilities (flash-attention style), memory linear in length.
  * `splash` (TPU): the prompt's keys broadcast to the slot's rows and put
    before the row's own ([B, Wp + T]); the kernel takes queries shorter
    than keys (a causal mask offset by the prompt width) and separate query
    and key segment ids, so no query is spent on prompt positions.
  * `pallas_gpu` and `cudnn`: the stated fallback. Both kernels take one
    length for queries and keys (Pallas GPU: one segment-id array, causal
    aligned at the first position; cuDNN: no bottom-right causal mask in
    jax's API), so the attention product runs on the full row `prompt ++
    response` with zero queries at the prompt positions (outputs dropped):
    its scores cost what the repeated row's do, while the projections, the
    MLP and the norms of every layer still compute the prompt once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask)
from jax.sharding import PartitionSpec

from brorl_jax.model import attention_kernels
from brorl_jax.model.attention_kernels import NEG_INF
from brorl_jax.model.config import SPLASH_BLOCK
from brorl_jax.model.sharding import (active_mesh_rules, active_platform,
                                      constrain)

# Backends whose kernel runs the attention product on full `prompt ++ own`
# rows (the stated fallback; see the module docstring).
FULL_ROW_BACKENDS = ("pallas_gpu", "cudnn")
# Splash lengths round to lanes of 128.
_LANE = 128


@struct.dataclass
class PrefixedAttention:
  """Attention strategy of rollout tokens after a shared prompt.

  The per-layer cache is the prompt's `(k, v)`, [U, Wp, K, H] each, as a
  `FullAttention(return_kv=True)` forward of the prompts returns them; it is
  read, never written.

  Attributes:
    prefix_valid: [U, Wp] bool, real prompt tokens (left padding False).
    valid: [B, T] bool, the rows' real tokens (B = U * c, slot-major).
    backend: `model.attention_backend`.
  """

  prefix_valid: jax.Array
  valid: jax.Array
  backend: str = struct.field(pytree_node=False, default="auto")

  def __call__(self, q, k, v, cache):
    prefix_k, prefix_v = cache
    out = attend_prefixed(q, k, v, prefix_k, prefix_v, self.valid,
                          self.prefix_valid, self.backend)
    return out, None


def attend_prefixed(q: jax.Array, k: jax.Array, v: jax.Array,
                    prefix_k: jax.Array, prefix_v: jax.Array,
                    valid: jax.Array, prefix_valid: jax.Array,
                    backend: str = "auto") -> jax.Array:
  """Causal attention of each row over its slot's prompt and its own tokens.

  Args:
    q: [B, T, N, H] the rows' queries (RoPE applied); B = U * c.
    k, v: [B, T, K, H] the rows' own keys and values.
    prefix_k, prefix_v: [U, Wp, K, H] each slot's prompt keys and values.
    valid: [B, T] bool, the rows' real tokens.
    prefix_valid: [U, Wp] bool, the prompts' real tokens.
    backend: a name from `ATTENTION_BACKENDS`.

  Returns:
    [B, T, N, H] in q's dtype; outputs at padding queries are finite and
    unspecified.
  """
  name = attention_kernels.resolve_attention_backend(backend,
                                                     active_platform())
  if name in FULL_ROW_BACKENDS:
    return _full_row(q, k, v, prefix_k, prefix_v, valid, prefix_valid, name)
  if name == "splash":
    return _splash(q, k, v, prefix_k, prefix_v, valid, prefix_valid)
  block = attention_kernels.BLOCK
  if name == "reference" or (prefix_k.shape[1] <= block
                             and q.shape[1] <= block):
    return _dense(q, k, v, prefix_k, prefix_v, valid, prefix_valid)
  return _blockwise(q, k, v, prefix_k, prefix_v, valid, prefix_valid)


def _by_slot(x: jax.Array, slots: int) -> jax.Array:
  """[B, ...] -> [U, c, ...]."""
  return x.reshape(slots, x.shape[0] // slots, *x.shape[1:])


def _group(x: jax.Array, slots: int, kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [U, c, T, K, Q, H]."""
  b, t, n, h = x.shape
  return x.reshape(slots, b // slots, t, kv_heads, n // kv_heads, h)


def _grouped(q: jax.Array, slots: int, kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [U, c, T, K, Q, H], scaled by 1/sqrt(H)."""
  return _group(q, slots, kv_heads) * jnp.asarray(q.shape[-1] ** -0.5,
                                                  q.dtype)


def _ungrouped(out: jax.Array, dtype) -> jax.Array:
  """[U, c, K, Q, T, H] -> [B, T, N, H]."""
  u, c, kh, nq, t, h = out.shape
  out = out.transpose(0, 1, 4, 2, 3, 5).reshape(u * c, t, kh * nq, h)
  return out.astype(dtype)


def _causal(t: int, start, block: int) -> jax.Array:
  """[T, block]: key `start + j` visible to query i (i >= start + j)."""
  return (start + jnp.arange(block))[None, :] <= jnp.arange(t)[:, None]


# ---- dense (reference; blockwise at one block) -----------------------------

def _dense(q, k, v, prefix_k, prefix_v, valid, prefix_valid):
  """The masked product over [prompt keys | own keys], autodiffed.

  As `attention_kernels._one_block_attention`: q is scaled before the
  product, the row maximum is a constant (no gradient through it), and the
  [T, H] output is normalised instead of the probabilities.
  """
  u, _, kh, _ = prefix_k.shape
  t = q.shape[1]
  qg = _grouped(q, u, kh)                                  # [U,c,T,K,Q,H]
  k5, v5, valid3 = _by_slot(k, u), _by_slot(v, u), _by_slot(valid, u)
  s_pre = jnp.einsum("uctkqh,uskh->uckqts", qg, prefix_k,
                     preferred_element_type=jnp.float32)
  s_own = jnp.einsum("uctkqh,ucskh->uckqts", qg, k5,
                     preferred_element_type=jnp.float32)
  m_pre = prefix_valid[:, None, None, None, None, :]       # [U,1,1,1,1,Wp]
  m_own = (_causal(t, 0, t)[None, None]
           & valid3[:, :, None, :])[:, :, None, None]      # [U,c,1,1,T,T]
  s_pre = jnp.where(m_pre, s_pre, NEG_INF)
  s_own = jnp.where(m_own, s_own, NEG_INF)
  m = jax.lax.stop_gradient(jnp.maximum(s_pre.max(-1), s_own.max(-1)))
  # Masked keys: exp(NEG_INF - m) = 0 where a query sees a real key (every
  # real query sees itself); a padding query averages, finite and unread.
  p_pre = jnp.exp(s_pre - m[..., None])
  p_own = jnp.exp(s_own - m[..., None])
  l = p_pre.sum(-1) + p_own.sum(-1)                        # [U,c,K,Q,T]
  out = (jnp.einsum("uckqts,uskh->uckqth", p_pre.astype(v.dtype), prefix_v,
                    preferred_element_type=jnp.float32)
         + jnp.einsum("uckqts,ucskh->uckqth", p_own.astype(v.dtype), v5,
                      preferred_element_type=jnp.float32))
  return _ungrouped(out / l[..., None], q.dtype)


# ---- blockwise (online softmax, recomputed per block backward) -------------

def _split(x: jax.Array, axis: int, block: int) -> jax.Array:
  """Pads `axis` to a multiple of `block` (zeros / False) and moves the
  block index first: [..., S, ...] -> [nb, ..., block, ...]."""
  s = x.shape[axis]
  nb = -(-s // block)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, nb * block - s)
  x = jnp.pad(x, pad)
  x = x.reshape(*x.shape[:axis], nb, block, *x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unsplit(x: jax.Array, axis: int, length: int) -> jax.Array:
  """The inverse of `_split` (axis counted without the block index)."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _block(length: int) -> int:
  return min(attention_kernels.BLOCK, -(-length // 8) * 8)


def _blocks(k, v, valid, prefix_k, prefix_v, prefix_valid):
  """Key blocks of both parts: prompt [nbp, U, bp, ...], own [nbs, U, c,
  bs, ...], with the own blocks' first positions."""
  u = prefix_k.shape[0]
  bp, bs = _block(prefix_k.shape[1]), _block(k.shape[1])
  pre = (_split(prefix_k, 1, bp), _split(prefix_v, 1, bp),
         _split(prefix_valid, 1, bp))
  own = (_split(_by_slot(k, u), 2, bs), _split(_by_slot(v, u), 2, bs),
         _split(_by_slot(valid, u), 2, bs))
  starts = jnp.arange(own[0].shape[0]) * bs
  return pre, own + (starts,)


def _prefix_mask(valid_j):                    # [U, bp] -> [U,1,1,1,1,bp]
  return valid_j[:, None, None, None, None, :]


def _own_mask(valid_j, start, t):             # [U, c, bs] -> [U,c,1,1,T,bs]
  causal = _causal(t, start, valid_j.shape[-1])
  return (causal[None, None] & valid_j[:, :, None, :])[:, :, None, None]


# (scores, output) products of the prompt's and the row's own key blocks,
# and the backward's (scores, dq, dk/dv): the prompt's dk/dv contract the
# slot's c rows, summing every rollout's gradient into its prompt.
_PRE = ("uctkqh,uskh->uckqts", "uckqts,uskh->uckqth")
_OWN = ("uctkqh,ucskh->uckqts", "uckqts,ucskh->uckqth")
_PRE_BWD = (_PRE[0], "uckqts,uskh->uctkqh", "uckqts,uctkqh->uskh")
_OWN_BWD = (_OWN[0], "uckqts,ucskh->uctkqh", "uckqts,uctkqh->ucskh")


def _forward(q, k, v, prefix_k, prefix_v, valid, prefix_valid):
  """-> (out [B, T, N, H], lse [U, c, K, Q, T])."""
  u, _, kh, h = prefix_k.shape
  t = q.shape[1]
  qg = _grouped(q, u, kh)
  pre, own = _blocks(k, v, valid, prefix_k, prefix_v, prefix_valid)

  def step(carry, k_j, v_j, mask, eqs):
    m, l, acc = carry
    s = jnp.einsum(eqs[0], qg, k_j, preferred_element_type=jnp.float32)
    s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[..., None] + jnp.einsum(
        eqs[1], p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
    return (m_new, l * alpha + p.sum(-1), acc)

  shape = (u, q.shape[0] // u, kh, q.shape[2] // kh, t)
  carry = (jnp.full(shape, NEG_INF, jnp.float32),
           jnp.zeros(shape, jnp.float32),
           jnp.zeros(shape + (h,), jnp.float32))
  carry, _ = jax.lax.scan(
      lambda c, xs: (step(c, xs[0], xs[1], _prefix_mask(xs[2]), _PRE), None),
      carry, pre)
  carry, _ = jax.lax.scan(
      lambda c, xs: (step(c, xs[0], xs[1], _own_mask(xs[2], xs[3], t), _OWN),
                     None), carry, own)
  m, l, acc = carry
  out = acc / jnp.maximum(l, 1e-30)[..., None]
  lse = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), NEG_INF)
  return _ungrouped(out, q.dtype), lse


@jax.custom_vjp
def _blockwise(q, k, v, prefix_k, prefix_v, valid, prefix_valid):
  """Online softmax over the prompt's key blocks, then the row's own."""
  return _forward(q, k, v, prefix_k, prefix_v, valid, prefix_valid)[0]


def _blockwise_fwd(q, k, v, prefix_k, prefix_v, valid, prefix_valid):
  out, lse = _forward(q, k, v, prefix_k, prefix_v, valid, prefix_valid)
  return out, (q, k, v, prefix_k, prefix_v, valid, prefix_valid, out, lse)


def _blockwise_bwd(res, d_out):
  q, k, v, prefix_k, prefix_v, valid, prefix_valid, out, lse = res
  u, wp, kh, h = prefix_k.shape
  t = q.shape[1]
  qg = _grouped(q, u, kh)
  dog = _group(d_out, u, kh)
  # D = sum_h dO * O: the softmax Jacobian's row term, [U, c, K, Q, T].
  delta = jnp.einsum("uctkqh,uctkqh->uckqt", dog.astype(jnp.float32),
                     _group(out, u, kh).astype(jnp.float32))
  pre, own = _blocks(k, v, valid, prefix_k, prefix_v, prefix_valid)

  def step(dq, k_j, v_j, mask, eqs):
    score_eq, dq_eq, kv_eq = eqs
    s = jnp.einsum(score_eq, qg, k_j, preferred_element_type=jnp.float32)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    dv_j = jnp.einsum(kv_eq, p.astype(dog.dtype), dog,
                      preferred_element_type=jnp.float32)
    dp = jnp.einsum(score_eq, dog, v_j, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None])
    dq = dq + jnp.einsum(dq_eq, ds.astype(k_j.dtype), k_j,
                         preferred_element_type=jnp.float32)
    dk_j = jnp.einsum(kv_eq, ds.astype(qg.dtype), qg,
                      preferred_element_type=jnp.float32)
    return dq, (dk_j, dv_j)

  dq = jnp.zeros(qg.shape, jnp.float32)
  dq, (dpk, dpv) = jax.lax.scan(
      lambda c, xs: step(c, xs[0], xs[1], _prefix_mask(xs[2]), _PRE_BWD),
      dq, pre)
  dq, (dk, dv) = jax.lax.scan(
      lambda c, xs: step(c, xs[0], xs[1], _own_mask(xs[2], xs[3], t),
                         _OWN_BWD), dq, own)
  b = q.shape[0]
  dq = (dq * h ** -0.5).reshape(q.shape).astype(q.dtype)
  dk = _unsplit(dk, 2, t).reshape(b, t, kh, h).astype(k.dtype)
  dv = _unsplit(dv, 2, t).reshape(b, t, kh, h).astype(v.dtype)
  dpk = _unsplit(dpk, 1, wp).astype(prefix_k.dtype)
  dpv = _unsplit(dpv, 1, wp).astype(prefix_v.dtype)
  return dq, dk, dv, dpk, dpv, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---- kernels ---------------------------------------------------------------

def _rows(prefix: jax.Array, rows: int) -> jax.Array:
  """[U, ...] -> [B, ...]: each slot's prompt part repeated for its rows."""
  out = jnp.repeat(prefix, rows // prefix.shape[0], axis=0)
  return constrain(out, ("batch",) + (None,) * (out.ndim - 1))


def _full_row(q, k, v, prefix_k, prefix_v, valid, prefix_valid, backend):
  """The fallback: the backend's attention over `prompt ++ own` rows, with
  zero queries at the prompt's positions (their outputs are dropped)."""
  b, wp = q.shape[0], prefix_k.shape[1]
  cat = lambda a, x: jnp.concatenate([_rows(a, b), x], axis=1)  # noqa: E731
  q_full = jnp.concatenate(
      [jnp.zeros((b, wp) + q.shape[2:], q.dtype), q], axis=1)
  out = attention_kernels.attend(q_full, cat(prefix_k, k), cat(prefix_v, v),
                                 cat(prefix_valid, valid), backend)
  return out[:, wp:]


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _splash(q, k, v, prefix_k, prefix_v, valid, prefix_valid):
  """Splash attention with T queries over [Wp' prompt | T' own] keys."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  block_q = min(SPLASH_BLOCK, _round_up(t, _LANE))
  tq = _round_up(t, block_q)
  wp = _round_up(prefix_k.shape[1], _LANE)
  tkv = wp + tq
  block_kv = next(x for x in (SPLASH_BLOCK, 256, _LANE) if tkv % x == 0)
  pad = lambda x, lo, hi: jnp.pad(  # noqa: E731
      x, [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
  lead = wp - prefix_k.shape[1]
  keys = lambda pre, own: jnp.concatenate(  # noqa: E731
      [pad(_rows(pre, b), lead, 0), pad(own, 0, tq - t)], axis=1)
  k_full, v_full = keys(prefix_k, k), keys(prefix_v, v)
  seg_kv = keys(prefix_valid, valid).astype(jnp.int32)      # [B, Wp' + T']
  seg_q = pad(valid, 0, tq - t).astype(jnp.int32)           # [B, T']
  q = pad(q, 0, tq - t)
  interpret = active_platform() != "tpu"

  def rows(q, k, v, seg_q, seg_kv):
    mask = splash_mask.MultiHeadMask(
        [splash_mask.CausalMask((tq, tkv), offset=wp)] * (n // kh))
    sizes = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv, block_q_dq=block_q,
        block_kv_dq=block_kv)
    kernel = splash.make_splash_mqa_single_device(
        mask, block_sizes=sizes, interpret=interpret)
    rb = q.shape[0]
    qg = (q * jnp.asarray(h ** -0.5, q.dtype)).reshape(
        rb, tq, kh, n // kh, h).transpose(0, 2, 3, 1, 4)   # [B, K, Q, T', H]

    def one(q1, k1, v1, sq, skv):
      return kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=sq, kv=skv))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head)(qg, k.transpose(0, 2, 1, 3),
                             v.transpose(0, 2, 1, 3), seg_q, seg_kv)
    return out.transpose(0, 3, 1, 2, 4).reshape(rb, tq, n, h)

  out = _over_rows(rows, q, k_full, v_full, seg_q, seg_kv)
  return out[:, :t].astype(q.dtype)


def _over_rows(fn, *args):
  """fn per device on its rows (Pallas calls are not partitioned by GSPMD:
  `shard_map` over the batch axes, as `pallas_attention._over_batch`)."""
  rules = active_mesh_rules()
  if rules is None:
    return fn(*args)
  spec = PartitionSpec(rules.spec(("batch",), (args[0].shape[0],))[0])
  return jax.shard_map(fn, mesh=rules.mesh, in_specs=(spec,) * len(args),
                       out_specs=spec, check_vma=False)(*args)


