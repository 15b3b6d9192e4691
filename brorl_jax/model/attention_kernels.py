"""Attention backends: how the causal softmax product over a sequence is
computed, without a `[T, T]` mask.

Training, prefill and the diagnostics attend causally over rows whose real
tokens form one contiguous span (left-padded prompt, response, right
padding). Every backend takes the row's validity `[B, T]` (the segment ids:
real tokens 1, padding 0) instead of a mask and returns `[B, T, N, H]`;
outputs at padding queries are finite and unspecified (no caller reads them:
they are never targets, and no real query sees their keys).

  * `reference`: einsum scores `[B, K, Q, T, T]` in float32 (the original
    attention; kept as the yardstick of the tests and the bench).
  * `blockwise`: online softmax in pure JAX, a scan over key blocks with a
    custom VJP that recomputes each block's probabilities in the backward
    (flash-attention style): `[B, K, Q, T, block]` at a time, memory linear
    in T. A row that fits one block (T <= 512: the demo's 63 tokens) takes
    the plain masked product under autodiff instead, which is that one
    block with nothing recomputed. The CPU default.
  * `splash` (TPU) and `pallas_gpu`: Pallas kernels, in `pallas_attention`.
  * `cudnn` (GPU): `jax.nn.dot_product_attention(implementation="cudnn")`,
    whose padding is right padding only (`query_seq_lengths`): each row is
    rotated so its real span starts at 0, attended, and rotated back.

("Strategy" in `attention.py` is how keys/values are cached; the backend is
how the product is computed.) `model.attention_backend` picks one; "auto"
resolves by platform (`resolve_attention_backend`).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp

from brorl_jax.model.config import ATTENTION_BACKENDS, GPU_BLOCK, SPLASH_BLOCK
from brorl_jax.model.sharding import active_platform

# Finite, so a fully masked row gives exp(0) instead of nan; masked
# probabilities are zeroed explicitly (attention.py and the decode use it).
NEG_INF = -1e30
# Key block of `blockwise`: scores of [B, K, Q, T, 512] f32 at a time.
BLOCK = 512
_AUTO = {"cpu": "blockwise", "gpu": "cudnn", "tpu": "splash"}


def triton_kernels_available() -> bool:
  """Whether this JAX has the Pallas Triton kernels `pallas_gpu` runs on.

  `jax.experimental.pallas.ops.gpu.attention` (flash attention with segment
  ids) and `.decode_attention` (decode with per-row lengths and log-sum-exp
  residuals) are in JAX 0.10 and 0.11; JAX 0.12 removed them (their
  successor is the separate tokamax package, not used here).
  """
  try:
    return importlib.util.find_spec(
        "jax.experimental.pallas.ops.gpu.decode_attention") is not None
  except ImportError:
    return False


def resolve_attention_backend(name: str, platform: str) -> str:
  """The backend that `model.attention_backend = name` means on `platform`.

  Args:
    name: one of `ATTENTION_BACKENDS` ("auto" picks by platform).
    platform: "cpu", "gpu" (or "cuda"/"rocm") or "tpu".

  Returns:
    A concrete backend name (never "auto").
  """
  if name not in ATTENTION_BACKENDS:
    raise ValueError(f"model.attention_backend: got {name!r}; allowed values: "
                     f"{', '.join(map(repr, ATTENTION_BACKENDS))}")
  if name == "pallas_gpu" and not triton_kernels_available():
    raise ValueError(
        f"model.attention_backend: 'pallas_gpu' needs the Pallas Triton "
        f"kernels (jax.experimental.pallas.ops.gpu.attention and "
        f".decode_attention) that JAX {jax.__version__} no longer ships "
        f"(removed in 0.12); use 'cudnn' (or 'auto'), or install "
        f"'jax>=0.10.2,<0.12'")
  if name != "auto":
    return name
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  return _AUTO.get(platform, "blockwise")


def length_granule(backend: str, t: int) -> int:
  """The backend's block at sequence length `t`: lengths that are multiples
  of it are computed without padding (the update's length buckets).

  Args:
    backend: a resolved backend (not "auto").
    t: the sequence length.
  """
  if backend == "blockwise":     # one block of round_up(t, 8), else BLOCK
    return BLOCK if t > BLOCK else 8
  if backend == "splash":        # pallas_attention: min(SPLASH_BLOCK, 128k)
    return SPLASH_BLOCK if t > SPLASH_BLOCK else 128
  if backend == "pallas_gpu":    # pallas_attention.GPU_BLOCK
    return GPU_BLOCK
  if backend in ("reference", "cudnn"):
    return 8
  raise ValueError(f"length_granule: {backend!r} is not a resolved "
                   f"attention backend; resolve it with "
                   f"resolve_attention_backend first")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array,
           backend: str = "auto") -> jax.Array:
  """Causal self-attention over rows with one contiguous span of real tokens.

  Args:
    q: [B, T, N, H] queries (RoPE applied).
    k: [B, T, K, H] keys.
    v: [B, T, K, H] values.
    valid: [B, T] bool, True at real tokens: one contiguous span per row,
      possibly empty (`cudnn` relies on it; the others take any pattern).
    backend: a name from `ATTENTION_BACKENDS`.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  name = resolve_attention_backend(backend, active_platform())
  if name == "reference":
    return reference_attention(q, k, v, valid)
  if name == "blockwise":
    return blockwise_attention(q, k, v, valid)
  if name == "cudnn":
    return cudnn_attention(q, k, v, valid)
  return _pallas(name)(q, k, v, valid)


def _pallas(name: str):
  """The Pallas backend `name` ("splash" or "pallas_gpu")."""
  # Imported here: the kernel modules pull in the Mosaic and Triton lowerings
  # (13% of `import brorl_jax.model.attention`, measured), which only runs
  # that pick a Pallas backend use.
  from brorl_jax.model import pallas_attention
  return {"splash": pallas_attention.splash_attention,
          "pallas_gpu": pallas_attention.pallas_gpu_attention}[name]


def _group(x: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, N, H] -> [B, T, K, Q, H]."""
  b, t, n, h = x.shape
  return x.reshape(b, t, kv_heads, n // kv_heads, h)


def reference_attention(q, k, v, valid):
  """Full `[B, K, Q, T, T]` float32 scores under a `[B, T, T]` mask."""
  b, t, n, h = q.shape
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
  qg = _group(q, k.shape[2])                                 # [B, T, K, Q, H]
  s = jnp.einsum("btkqh,bskh->bkqts", qg, k,
                 preferred_element_type=jnp.float32) * h ** -0.5
  mask = mask[:, None, None]
  s = jnp.where(mask, s, NEG_INF)
  p = jnp.where(mask, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
  p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
  out = jnp.einsum("bkqts,bskh->btkqh", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


# ---- blockwise -------------------------------------------------------------

def _key_blocks(k, v, valid, block):
  """Pads keys to a multiple of `block` -> per-block [nb, ...] stacks."""
  b, s, kh, h = k.shape
  nb = -(-s // block)
  pad = nb * block - s
  k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  valid = jnp.pad(valid, ((0, 0), (0, pad)))
  k = k.reshape(b, nb, block, kh, h).transpose(1, 0, 2, 3, 4)
  v = v.reshape(b, nb, block, kh, h).transpose(1, 0, 2, 3, 4)
  valid = valid.reshape(b, nb, block).transpose(1, 0, 2)
  return k, v, valid, jnp.arange(nb) * block


def _block_mask(valid_blk, start, t, block):
  """[B, block] key validity of one block -> [B, 1, 1, T, block] mask."""
  key_pos = start + jnp.arange(block)
  causal = key_pos[None, :] <= jnp.arange(t)[:, None]          # [T, block]
  return (causal[None] & valid_blk[:, None, :])[:, None, None]


def _block_size(t: int) -> int:
  return min(BLOCK, -(-t // 8) * 8)


def _blockwise_fwd_core(q, k, v, valid):
  """Online softmax over key blocks -> (out [B,T,N,H], lse [B,K,Q,T])."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  block = _block_size(t)
  qg = _group(q, kh) * jnp.asarray(h ** -0.5, q.dtype)       # [B, T, K, Q, H]
  kb, vb, validb, starts = _key_blocks(k, v, valid, block)

  def body(carry, xs):
    m, l, acc = carry                      # [B,K,Q,T], [B,K,Q,T], [B,K,Q,T,H]
    k_j, v_j, valid_j, start = xs
    s = jnp.einsum("btkqh,bskh->bkqts", qg, k_j,
                   preferred_element_type=jnp.float32)
    mask = _block_mask(valid_j, start, t, block)
    s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = l * alpha + p.sum(-1)
    acc = acc * alpha[..., None] + jnp.einsum(
        "bkqts,bskh->bkqth", p.astype(v.dtype), v_j,
        preferred_element_type=jnp.float32)
    return (m_new, l, acc), None

  q_heads = n // kh
  init = (jnp.full((b, kh, q_heads, t), NEG_INF, jnp.float32),
          jnp.zeros((b, kh, q_heads, t), jnp.float32),
          jnp.zeros((b, kh, q_heads, t, h), jnp.float32))
  (m, l, acc), _ = jax.lax.scan(body, init, (kb, vb, validb, starts))
  out = acc / jnp.maximum(l, 1e-30)[..., None]               # [B, K, Q, T, H]
  lse = jnp.where(l > 0, m + jnp.log(jnp.maximum(l, 1e-30)), NEG_INF)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
  return out, lse


def blockwise_attention(q, k, v, valid):
  """Causal attention by online softmax over key blocks; see module doc."""
  if k.shape[1] <= _block_size(q.shape[1]):
    return _one_block_attention(q, k, v, valid)
  return _blockwise_scan(q, k, v, valid)


def _one_block_attention(q, k, v, valid):
  """All keys in one block: the masked softmax product, autodiffed.

  At one block the custom VJP's recompute (a second QK^T and exp in the
  backward) and the online-softmax bookkeeping cost more than they save
  (`bench step`'s update_backend_ratio read 1.09 with them at the demo's
  63 tokens). Against `reference` this also scales q before the product,
  normalises the [T, H] output instead of the [T, T] probabilities, and
  treats the row maximum as a constant (softmax does not depend on it), so
  no gradient flows through the max.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = _group(q, kh) * jnp.asarray(h ** -0.5, q.dtype)       # [B, T, K, Q, H]
  s = jnp.einsum("btkqh,bskh->bkqts", qg, k,
                 preferred_element_type=jnp.float32)
  causal = jnp.arange(k.shape[1])[None, :] <= jnp.arange(t)[:, None]
  mask = (causal[None] & valid[:, None, :])[:, None, None]   # [B,1,1,T,S]
  s = jnp.where(mask, s, NEG_INF)
  m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
  # Masked keys: exp(NEG_INF - m) = 0 where a row has a real key; a fully
  # masked (padding) query averages all values, finite and unread.
  p = jnp.exp(s - m)                                         # [B,K,Q,T,S]
  l = p.sum(-1).transpose(0, 3, 1, 2)[..., None]             # [B, T, K, Q, 1]
  out = jnp.einsum("bkqts,bskh->btkqh", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32) / l
  return out.reshape(b, t, n, h).astype(q.dtype)


@jax.custom_vjp
def _blockwise_scan(q, k, v, valid):
  """Several key blocks: online softmax, recomputed per block backward."""
  return _blockwise_fwd_core(q, k, v, valid)[0]


def _blockwise_fwd(q, k, v, valid):
  out, lse = _blockwise_fwd_core(q, k, v, valid)
  return out, (q, k, v, valid, out, lse)


def _blockwise_bwd(res, d_out):
  q, k, v, valid, out, lse = res
  b, t, n, h = q.shape
  s_len, kh = k.shape[1], k.shape[2]
  block = _block_size(t)
  scale = h ** -0.5
  qg = _group(q, kh) * jnp.asarray(scale, q.dtype)           # [B, T, K, Q, H]
  dog = _group(d_out, kh)
  # D_i = sum_h dO_i * O_i: the softmax Jacobian's row term.
  delta = jnp.einsum("btkqh,btkqh->bkqt", dog.astype(jnp.float32),
                     _group(out, kh).astype(jnp.float32))
  kb, vb, validb, starts = _key_blocks(k, v, valid, block)

  def body(dq, xs):
    k_j, v_j, valid_j, start = xs
    s = jnp.einsum("btkqh,bskh->bkqts", qg, k_j,
                   preferred_element_type=jnp.float32)
    mask = _block_mask(valid_j, start, t, block)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)   # [B,K,Q,T,blk]
    dv_j = jnp.einsum("bkqts,btkqh->bskh", p.astype(dog.dtype), dog,
                      preferred_element_type=jnp.float32)
    dp = jnp.einsum("btkqh,bskh->bkqts", dog, v_j,
                    preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None])
    dq = dq + jnp.einsum("bkqts,bskh->btkqh", ds.astype(k_j.dtype), k_j,
                         preferred_element_type=jnp.float32)
    dk_j = jnp.einsum("bkqts,btkqh->bskh", ds.astype(qg.dtype), qg,
                      preferred_element_type=jnp.float32)
    return dq, (dk_j, dv_j)

  dq0 = jnp.zeros(qg.shape, jnp.float32)
  dq, (dk, dv) = jax.lax.scan(body, dq0, (kb, vb, validb, starts))
  dq = (dq * scale).reshape(b, t, n, h).astype(q.dtype)

  def unblock(x):                          # [nb, B, blk, K, H] -> [B, S, K, H]
    x = x.transpose(1, 0, 2, 3, 4).reshape(b, -1, kh, h)[:, :s_len]
    return x.astype(k.dtype)

  return dq, unblock(dk), unblock(dv), None


_blockwise_scan.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---- cuDNN -----------------------------------------------------------------

def _span(valid):
  """[B, T] -> (start, length) int32 [B] of each row's real span."""
  length = valid.sum(-1).astype(jnp.int32)
  start = jnp.where(length > 0, jnp.argmax(valid, -1), 0).astype(jnp.int32)
  return start, length


def _rotate(x, shift):
  """Row b of [B, T, ...] rotated left by shift[b] (x'[t] = x[t + shift])."""
  t = x.shape[1]
  idx = (jnp.arange(t)[None] + shift[:, None]) % t            # [B, T]
  return jnp.take_along_axis(
      x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


# cuDNN's training kernels take even lengths only: jax 0.10's
# `check_is_flash_attention` rejects an odd T whenever there is a bias, and
# its forward rule passes a placeholder bias even when none is given, so
# every differentiated call at an odd length fails to lower ("Unsupported
# sequence length Q 17407, KV 17407": the update's longest bucket is
# Lp + T - 1). Rows are padded to a multiple of this, inside the backend.
CUDNN_GRANULE = 2


def cudnn_attention(q, k, v, valid, implementation: str | None = "cudnn"):
  """`jax.nn.dot_product_attention` on rows rotated to right padding.

  cuDNN's flash attention takes padding as per-row lengths at the end of
  the row. A row's real tokens are one span [start, start + length): rotate
  it to [0, length), zero what lies past the length (so padding positions
  get exactly zero gradients, whatever the kernel does with masked keys),
  pad the sequence to an even length (`CUDNN_GRANULE`), attend causally
  with those lengths, rotate back. cuDNN has no float32 kernel: float32
  compute takes the Pallas GPU kernel.

  Args:
    q, k, v, valid: as `attend`.
    implementation: "cudnn", or "xla"/None to check the layout on CPU.
  """
  if implementation == "cudnn" and q.dtype not in (jnp.bfloat16,
                                                   jnp.float16):
    if not triton_kernels_available():   # JAX >= 0.12: the XLA loop
      return blockwise_attention(q, k, v, valid)
    return _pallas("pallas_gpu")(q, k, v, valid)
  t = q.shape[1]
  start, length = _span(valid)
  real = jnp.arange(t)[None, :] < length[:, None]             # [B, T]
  tp = -(-t // CUDNN_GRANULE) * CUDNN_GRANULE

  def right_padded(x):
    x = jnp.where(real[:, :, None, None], _rotate(x, start), 0)
    return jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))

  # A zero length is no layout cuDNN promises to handle; the row's outputs
  # are zeroed below either way.
  lengths = jnp.maximum(length, 1)
  out = jax.nn.dot_product_attention(
      right_padded(q), right_padded(k), right_padded(v),
      scale=q.shape[-1] ** -0.5, is_causal=True, query_seq_lengths=lengths,
      key_value_seq_lengths=lengths, implementation=implementation)
  out = _rotate(out[:, :t], -start)
  return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)
