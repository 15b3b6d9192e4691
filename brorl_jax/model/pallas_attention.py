"""Pallas attention backends: splash attention (TPU), the flash kernel (GPU).

Both take rows' validity as segment ids (real tokens 1, padding 0) under a
causal mask: a real query sees the real keys before it; a padding query sees
padding keys only (never an empty row, which these kernels cannot softmax).
Pallas calls are not partitioned by GSPMD, so both run under `shard_map`
over the batch axes of the active mesh (each device attends its own rows,
with all heads). Off their platform (tests on CPU) they run in interpret
mode, the kernels' exact program. The sequence is padded to the kernels'
block size here only, and sliced back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
try:
  # JAX 0.12 removed its Triton kernels: there `pallas_gpu` is refused by
  # attention_kernels.resolve_attention_backend before this is reached.
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
except ImportError:
  gpu_attention = None
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask)
from jax.sharding import PartitionSpec

from brorl_jax.model.config import GPU_BLOCK, SPLASH_BLOCK
from brorl_jax.model.sharding import active_mesh_rules, active_platform

# The GPU kernel's forward blocks in float32 (GPU_BLOCK in model/config.py:
# bfloat16). At 128 x 128 with head dim 128 the forward asks for 262,656
# bytes of shared memory, past an H100's 232,448 per block (XLA:GPU,
# compiled for the H100: RESOURCE_EXHAUSTED); 64 x 64 fits, and divides
# GPU_BLOCK, the length the rows are padded to.
GPU_BLOCK_F32 = 64


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pad_rows(x: jax.Array, t: int) -> jax.Array:
  """Pads axis 1 of x to length t with zeros (False for validity)."""
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, t - x.shape[1])
  return jnp.pad(x, pad)


def _over_batch(fn, q, k, v, valid):
  """Runs fn per device on its rows (shard_map over the batch axes)."""
  rules = active_mesh_rules()
  if rules is None:
    return fn(q, k, v, valid)
  rows = rules.spec(("batch",), (q.shape[0],))[0]
  spec = PartitionSpec(rows)
  # check_vma=False: pallas_call does not declare how its outputs vary over
  # the mesh axes (ENV.md §12).
  return jax.shard_map(fn, mesh=rules.mesh, in_specs=(spec,) * 4,
                       out_specs=spec, check_vma=False)(q, k, v, valid)


def splash_attention(q, k, v, valid):
  """Splash attention (GQA via the MQA kernel per kv head).

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H]; valid: [B, T] bool.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  interpret = active_platform() != "tpu"

  def rows(q, k, v, valid):
    b, t, n, h = q.shape
    kh = k.shape[2]
    block = min(SPLASH_BLOCK, _round_up(t, 128))
    tp = _round_up(t, block)
    q, k, v, valid = (_pad_rows(x, tp) for x in (q, k, v, valid))
    mask = splash_mask.MultiHeadMask(
        [splash_mask.CausalMask((tp, tp))] * (n // kh))
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mqa_single_device(
        mask, block_sizes=sizes, interpret=interpret)
    # Splash takes pre-scaled queries.
    qg = (q * jnp.asarray(h ** -0.5, q.dtype)).reshape(
        b, tp, kh, n // kh, h).transpose(0, 2, 3, 1, 4)      # [B, K, Q, T, H]
    kt = k.transpose(0, 2, 1, 3)                             # [B, K, T, H]
    vt = v.transpose(0, 2, 1, 3)
    seg = valid.astype(jnp.int32)                            # [B, T]

    def one(q1, k1, v1, s1):          # [Q, T, H], [T, H], [T, H], [T]
      return kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=s1, kv=s1))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head)(qg, kt, vt, seg)                # [B, K, Q, T, H]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)
    return out[:, :t].astype(q.dtype)

  return _over_batch(rows, q, k, v, valid)


def pallas_gpu_attention(q, k, v, valid):
  """The Pallas GPU (Triton) flash kernel `mha` with segment ids.

  The kernel is multi-head only: keys and values are repeated to N heads
  ([B, T, N, H], no [T, T] array).

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H]; valid: [B, T] bool.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  interpret = active_platform() != "gpu"

  def rows(q, k, v, valid):
    t, n, h = q.shape[1:]
    tp = _round_up(t, GPU_BLOCK)
    q, k, v, valid = (_pad_rows(x, tp) for x in (q, k, v, valid))
    reps = n // k.shape[2]
    block = GPU_BLOCK if q.dtype.itemsize <= 2 else GPU_BLOCK_F32
    out = gpu_attention.mha(
        q, jnp.repeat(k, reps, axis=2), jnp.repeat(v, reps, axis=2),
        segment_ids=valid.astype(jnp.int32), sm_scale=h ** -0.5, causal=True,
        block_sizes=gpu_attention.BlockSizes(
            block_q=block, block_k=block, block_q_dkv=32, block_kv_dkv=32,
            block_q_dq=32, block_kv_dq=32),
        interpret=interpret)
    return out[:, :t].astype(q.dtype)

  return _over_batch(rows, q, k, v, valid)
