"""A decode step's attention over the rollouts' own suffixes, length-aware.

At decode step `t` every row of a chunk has written suffix slots 0..t (the
slot is shared: rows that stopped keep writing padding), so the suffix part
of shared-prefix attention needs only the first `length = t + 1` slots of a
buffer of `max_new_tokens`. The backends (the model config's
`attention_backend`, resolved by
`model.attention_kernels.resolve_attention_backend`):

  * `reference`: the masked product over the whole buffer (reads every slot;
    the cost of a step follows the buffer, not the length).
  * `blockwise`: pure JAX, a loop over key blocks with a dynamic trip count,
    ceil(length / block), and an online softmax (the CPU default).
  * `pallas_gpu` (and `cudnn`, whose library has no decode kernel with a
    log-sum-exp output): `pallas.ops.gpu.decode_attention.gqa` with per-row
    `kv_seq_len`; its split-K programs past the length skip their keys. Keys
    are stored time-major for it (`keys_time_major`).
  * `splash` (TPU): `_tpu_decode` below, a Pallas TPU kernel over
    (row, kv head, key block) whose index maps clamp the block to the last
    written one (no DMA past the length) and that returns the log-sum-exp.

The refill decode's slots sit at different positions: `length` is then one
per row ([B]). The kernels take it as it is (the GPU kernel's `kv_seq_len`;
the TPU kernel clamps each row's blocks at its own); `reference` and
`blockwise` take the masked product over the whole buffer, which the refill
keeps as narrow as its busy slots (`refill.suffix_width`; a per-row blockwise
loop runs to the longest slot anyway and measured slower on CPU).

Every backend returns the normalized output over the written slots and its
log-sum-exp, which `SharedPrefixAttention` merges with the prefix part.
Kernel backends take `interpret=True` to run their exact program on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding, PartitionSpec as P
try:
  # JAX 0.12 removed its Triton kernels: there `cudnn` decodes with the
  # blockwise loop (`_GPU_KERNEL` is empty) and `pallas_gpu` is refused.
  from jax.experimental.pallas.ops.gpu import decode_attention
except ImportError:
  decode_attention = None

from brorl_jax.model.attention import NEG_INF, masked_softmax_lse
from brorl_jax.model.config import ATTENTION_BACKENDS

_GPU_KERNEL = ("cudnn", "pallas_gpu") if decode_attention else ()
_KERNELS = _GPU_KERNEL + ("splash",)
# Key block of the pure-JAX loop. XLA:CPU copies each block out of the buffer
# before its products, so a step reads whole blocks: at 64 rows of the demo
# model, per-step decode time over the first 64 tokens with a 4096-slot
# buffer over that with 128 slots measured 1.02 with blocks of 64, 1.37 with
# 128 and 1.83 with 256 (the reference: 9.6).
BLOCKWISE_BLOCK = 64
# Kernel buffers are padded to a multiple of this (TPU lanes; GPU blocks).
KERNEL_BLOCK = 128



def reads_per_row(backend: str) -> bool:
  """The backend's read stops at each row's own length (a kernel)."""
  return backend in _KERNELS


def keys_time_major(backend: str) -> bool:
  """Suffix keys stored [B, K, T, H] (GPU kernel) instead of [B, K, H, T]."""
  return backend in _GPU_KERNEL


def suffix_slots(max_new_tokens: int, backend: str) -> int:
  """Slots of the suffix buffer: kernels need whole blocks."""
  if backend not in _KERNELS:
    return max_new_tokens
  return -(-max_new_tokens // KERNEL_BLOCK) * KERNEL_BLOCK


def attend_suffix(q: jax.Array, k: jax.Array, v: jax.Array,
                  length: jax.Array, backend: str, interpret: bool = False,
                  sharding: NamedSharding | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Attention of each row's queries over its first `length` suffix slots.

  Args:
    q: [B, K, Q, H] queries.
    k: [B, K, H, S] keys ([B, K, S, H] where `keys_time_major(backend)`).
    v: [B, K, S, H] values.
    length: int32 scalar, slots written (>= 1), the same for every row; or
      [B] int32, each row's own (the refill decode).
    backend: a resolved backend (not "auto").
    interpret: run a kernel backend in Pallas interpret mode (CPU tests).
    sharding: the suffix buffers' sharding (rows, kv heads, -, -) inside a
      mesh: a kernel backend then runs per device under `shard_map` (the
      SPMD partitioner would gather a custom call's operands); None outside.

  Returns:
    out: [B, K, Q, H] float32 normalized output.
    lse: [B, K, Q] float32 log-sum-exp of the scaled scores.
  """
  if sharding is not None and backend in _KERNELS:
    rows, heads = sharding.spec[0], sharding.spec[1]
    spec4, spec3 = P(rows, heads, None, None), P(rows, heads, None)
    return jax.shard_map(
        functools.partial(attend_suffix, backend=backend,
                          interpret=interpret),
        mesh=sharding.mesh,
        in_specs=(spec4, spec4, spec4, P(rows) if jnp.ndim(length) else P()),
        out_specs=(spec4, spec3), check_vma=False)(q, k, v, length)
  if backend == "reference" or (backend == "blockwise" and jnp.ndim(length)):
    return _reference(q, k, v, length)
  if backend == "blockwise":
    return _blockwise(q, k, v, length, BLOCKWISE_BLOCK)
  if backend in _GPU_KERNEL:
    return _gpu_decode(q, k, v, length, interpret)
  if backend == "cudnn":           # no Triton decode kernel in this JAX
    return attend_suffix(q, k, v, length, "blockwise")
  if backend == "splash":
    return _tpu_decode(q, k, v, length, interpret)
  raise ValueError(f"model.attention_backend: unknown decode backend "
                   f"{backend!r}; use one of {', '.join(ATTENTION_BACKENDS)}")


def _reference(q, k, v, length):
  """The masked product over all S slots (each row's own length if [B])."""
  s = jnp.einsum("bkqh,bkhs->bkqs", q, k,
                 preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  if jnp.ndim(length):
    length = length[:, None, None, None]
  w, lse = masked_softmax_lse(s, jnp.arange(k.shape[-1]) < length)
  out = jnp.einsum("bkqs,bksh->bkqh", w.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out, lse


def _blockwise(q, k, v, length, block):
  """Online softmax over ceil(length / block) key blocks (a while loop).

  A last block that would run past S starts at S - block instead; the slots
  it shares with the block before are masked out by position.
  """
  s_max, scale = k.shape[-1], q.shape[-1] ** -0.5
  if s_max <= block:
    # One block is the whole buffer: the plain product reads the same slots
    # without the loop (~9 % of a demo decode step at 64 slots, measured).
    return _reference(q, k, v, length)

  def body(i, carry):
    m, l, acc = carry
    start = jnp.minimum(i * block, s_max - block)
    kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=3)
    vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
    s = jnp.einsum("bkqh,bkhs->bkqs", q, kb,
                   preferred_element_type=jnp.float32) * scale
    pos = start + jnp.arange(block)
    visible = (pos >= i * block) & (pos < length)
    s = jnp.where(visible, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    acc = acc * corr[..., None] + jnp.einsum(
        "bkqs,bksh->bkqh", p.astype(v.dtype), vb,
        preferred_element_type=jnp.float32)
    return m_new, l * corr + jnp.sum(p, axis=-1), acc

  m0 = jnp.full(q.shape[:-1], NEG_INF, jnp.float32)
  carry = (m0, jnp.zeros_like(m0), jnp.zeros(q.shape, jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, (length + block - 1) // block, body, carry)
  return acc / l[..., None], m + jnp.log(l)


def _gpu_decode(q, k, v, length, interpret):
  """`decode_attention.gqa` over time-major keys, with its residuals."""
  b, kv, nq, h = q.shape
  s_max = k.shape[2]
  # Split-K programs of >= 16 slots (the kernel's minimum), at most 16.
  splits = max(d for d in range(1, 17)
               if s_max % d == 0 and (s_max // d) % 16 == 0)
  block_k = max(x for x in (16, 32, 64, 128) if (s_max // splits) % x == 0)
  # gqa wants [B, S, K, H] and swaps to [B, K, S, H]: the two swaps cancel.
  out, (l, m) = decode_attention.gqa(
      q.reshape(b, kv * nq, h), k.swapaxes(1, 2), v.swapaxes(1, 2),
      kv_seq_len=jnp.broadcast_to(length, (b,)).astype(jnp.int32),
      sm_scale=h ** -0.5,
      block_k=block_k, k_splits=splits, interpret=interpret,
      return_residuals=True)
  return (out.reshape(b, kv, nq, h).astype(jnp.float32),
          (m + jnp.log(l)).reshape(b, kv, nq))


def _tpu_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc,
                acc_sc, *, block: int):
  """One (row, kv head, key block) program; m, l kept lane-broadcast."""
  j, length = pl.program_id(2), len_ref[pl.program_id(0)]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(j * block < length)
  def _step():
    q = q_ref[...]                                            # [Q, H]
    s = jnp.dot(q, k_ref[...], preferred_element_type=jnp.float32)
    s = s * q.shape[-1] ** -0.5                               # [Q, block]
    pos = j * block + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(pos < length, s, NEG_INF)
    m_prev = m_sc[...]                                        # [Q, lanes]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(pos < length, jnp.exp(s - m_new[:, :1]), 0.0)
    corr = jnp.exp(m_prev - m_new)
    l_sc[...] = l_sc[...] * corr + jnp.sum(p, axis=-1, keepdims=True)
    acc_sc[...] = acc_sc[...] * corr[:, :1] + jnp.dot(
        p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    m_sc[...] = m_new

  @pl.when(j == pl.num_programs(2) - 1)
  def _finish():
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / l[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = m_sc[...] + jnp.log(l)


def _tpu_decode(q, k, v, length, interpret, block: int = KERNEL_BLOCK):
  """Pallas TPU decode over [B, K, H, S] keys; blocks past `length` unread.

  Each row's length (a scalar is broadcast) is a prefetched scalar. The
  key/value index maps clamp a row's block index to its last written block:
  later grid steps ask for the block already in VMEM, so the pipeline issues
  no copy for them, and `pl.when` skips their compute.
  """
  b, kv, nq, h = q.shape
  s_max = k.shape[-1]
  lanes = 128

  def last(i, len_ref):
    return (len_ref[i] - 1) // block

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, kv, s_max // block),
      in_specs=[
          pl.BlockSpec((None, None, nq, h), lambda i, n, j, ln: (i, n, 0, 0)),
          pl.BlockSpec((None, None, h, block),
                       lambda i, n, j, ln: (i, n, 0,
                                            jnp.minimum(j, last(i, ln)))),
          pl.BlockSpec((None, None, block, h),
                       lambda i, n, j, ln: (i, n,
                                            jnp.minimum(j, last(i, ln)), 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, nq, h), lambda i, n, j, ln: (i, n, 0, 0)),
          pl.BlockSpec((None, None, nq, lanes),
                       lambda i, n, j, ln: (i, n, 0, 0)),
      ],
      scratch_shapes=[pltpu.VMEM((nq, lanes), jnp.float32),
                      pltpu.VMEM((nq, lanes), jnp.float32),
                      pltpu.VMEM((nq, h), jnp.float32)])
  out, lse = pl.pallas_call(
      functools.partial(_tpu_kernel, block=block),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, kv, nq, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, kv, nq, lanes), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="suffix_decode",
  )(jnp.broadcast_to(length, (b,)).astype(jnp.int32), q, k, v)
  return out, lse[..., 0]
