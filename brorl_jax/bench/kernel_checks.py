"""The GPU attention kernels against a float32 reference, on hardware.

One check per case: a backend (`cudnn`, `pallas_gpu`), a dtype, a kind and
its shapes. `train` cases run the training/prefill attention
(`model.attention_kernels.attend`, the call the model makes) forward and
backward on rows with left, right and two-sided padding and one fully
padded row; `decode` cases run the decode step's suffix read
(`rollout.suffix_attention.attend_suffix`) with one length for every row
(fixed chunks) or one per row (the refill), NaN in every slot past a row's
last read block (a kernel that reads past its length fails).

What a case asserts:
  * outputs (and gradients, and the decode's log-sum-exp) finite
    everywhere, padding queries included;
  * outputs at real queries and the gradients equal the reference's:
    float32 cases run under `jax.default_matmul_precision("highest")` (an
    H100 otherwise multiplies float32 in TF32, ~1e-3 relative) at float32
    tolerances; bfloat16 cases take bf16 inputs, the reference the same
    values in float32, at bf16 tolerances (each limit is scaled by
    max(1, the reference's largest magnitude), and a relative L2 error
    bounds the whole tensor);
  * gradients exactly zero at padded positions (dq at padding queries, dk
    and dv at padding keys): a NaN there reaches the projections' weight
    gradients and the update skips every mini-batch (`rl/update.py`).

`cases("full")` are the recipes' shapes (head dim 128, 12 query and 2 KV
heads, rows of 4,103 and 17,407 tokens, a 16,384-slot decode buffer): what
`python -m brorl_jax.bench gpu` and `tests/hardware/` run on a GPU.
`cases("reduced")` are the same cases at small shapes, which run on CPU
against the kernels in Pallas interpret mode (`cudnn` through XLA's
implementation of the same call: its layout, not cuDNN), so CI proves the
checks themselves. The reference attends by query chunks, each
rematerialized in the backward, so it fits at 17,407 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from brorl_jax.model import attention_kernels as ak
from brorl_jax.model.attention import NEG_INF
from brorl_jax.rollout import suffix_attention as sa

# Limits, as fractions of max(1, max |reference|): (max abs error, relative
# L2 error). bf16: an output is a bf16 rounding of a sum of bf16-rounded
# probabilities times values (2^-8 relative each); the limits leave ~3x
# over what interpret mode measured on CPU (see tests/hardware/).
TOLERANCES = {
    ("float32", "out"): (2e-5, 1e-5),
    ("float32", "grad"): (1e-4, 2e-5),
    ("float32", "lse"): (2e-5, 1e-6),
    ("bfloat16", "out"): (4e-2, 1.5e-2),
    ("bfloat16", "grad"): (8e-2, 3e-2),
    ("bfloat16", "lse"): (2e-3, 1e-4),
}
# Queries per chunk of the reference (scores [B, K, Q, chunk, T] float32).
REFERENCE_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Case:
  """One kernel check.

  Attributes:
    kind: "train" (training/prefill attention, forward and backward) or
      "decode" (the suffix read of a decode step).
    backend: "cudnn" or "pallas_gpu".
    dtype: "float32" or "bfloat16".
    length: tokens per row (train) or slots of the suffix buffer (decode).
    heads, kv_heads, head_dim: N, K, H.
    read_lengths: decode: each row's written slots (one row each); with
      `per_row` False the first long one is every row's length.
    per_row: decode: one length per row (refill) instead of one for all.
  """

  kind: str
  backend: str
  dtype: str
  length: int
  heads: int
  kv_heads: int
  head_dim: int
  read_lengths: tuple[int, ...] = ()
  per_row: bool = False

  @property
  def name(self) -> str:
    extra = "" if self.kind == "train" else (
        "-per_row" if self.per_row else "-one_length")
    return f"{self.kind}-{self.backend}-{self.dtype}-{self.length}{extra}"


def cases(size: str = "full") -> list[Case]:
  """The checks: "full" (the recipes' shapes, on a GPU), "reduced" (the
  same cases small enough for interpret mode on CPU) or "smoke" (two of
  the reduced ones, bf16: `bench gpu --tiny`)."""
  if size == "smoke":
    return [c for c in cases("reduced") if c.dtype == "bfloat16"
            and c.backend == "pallas_gpu" and c.kind == "train" or (
                c.dtype == "bfloat16" and c.per_row)]
  if size == "full":
    heads, kv, h, lengths = 12, 2, 128, (4103, 17407)
    slots, reads = 16384, (1, 127, 4103, 16384)
  elif size == "reduced":
    heads, kv, h, lengths = 4, 2, 16, (130,)   # 2 blocks of the kernels
    slots, reads = 384, (1, 129, 256, 300)
  else:
    raise ValueError(f"cases: size must be 'full', 'reduced' or 'smoke', "
                     f"got {size!r}")
  out = []
  for t in lengths:
    for backend, dtype in (("pallas_gpu", "float32"),
                           ("pallas_gpu", "bfloat16"),
                           ("cudnn", "bfloat16")):  # cuDNN is 16-bit only
      out.append(Case("train", backend, dtype, t, heads, kv, h))
  for dtype in ("float32", "bfloat16"):
    for per_row in (False, True):
      out.append(Case("decode", "pallas_gpu", dtype, slots, heads, kv, h,
                      read_lengths=reads, per_row=per_row))
  if not ak.triton_kernels_available():   # JAX >= 0.12: cuDNN only
    out = [c for c in out if c.backend != "pallas_gpu"]
  return out


def spans(t: int) -> list[tuple[int, int]]:
  """[start, end) of real tokens per row: a left-padded prompt, a
  right-padded response, prompt + response (both sides), a padding row."""
  return [(t // 4, t), (0, t - t // 3), (t // 8, t - t // 5), (0, 0)]


# ---- the reference ----------------------------------------------------------

def chunked_reference(q, k, v, valid, chunk: int = REFERENCE_CHUNK):
  """Causal attention in float32 by query chunks, each rematerialized.

  The same masked softmax product as `attention_kernels.reference_attention`
  (which holds all [T, T] scores), `chunk` queries at a time.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  chunk = min(chunk, t)
  nc = -(-t // chunk)
  qp = jnp.pad(q, ((0, 0), (0, nc * chunk - t), (0, 0), (0, 0)))
  qc = qp.reshape(b, nc, chunk, kh, n // kh, h).transpose(1, 0, 2, 3, 4, 5)
  key_pos = jnp.arange(t)

  @jax.checkpoint
  def one(args):
    qi, start = args                                  # [B, c, K, Q, H]
    s = jnp.einsum("bckqh,bskh->bkqcs", qi, k) * h ** -0.5
    causal = key_pos[None, :] <= (start + jnp.arange(chunk))[:, None]
    mask = (causal[None] & valid[:, None, :])[:, None, None]
    s = jnp.where(mask, s, NEG_INF)
    p = jnp.where(mask, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bkqcs,bskh->bckqh", p, v)

  out = jax.lax.map(one, (qc, jnp.arange(nc) * chunk))  # [nc, B, c, K, Q, H]
  out = out.transpose(1, 0, 2, 3, 4, 5).reshape(b, nc * chunk, n, h)
  return out[:, :t]


# ---- comparisons ------------------------------------------------------------

def _compare(got, want, dtype: str, what: str, mask=None) -> dict:
  """Errors of `got` against `want` (float32 numpy) and whether they pass."""
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  if mask is not None:
    got, want = np.where(mask, got, 0.0), np.where(mask, want, 0.0)
  atol, rel = TOLERANCES[(dtype, what)]
  scale = max(1.0, float(np.abs(want).max(initial=0.0)))
  diff = np.abs(got - want)
  max_err = float(diff.max(initial=0.0)) if np.isfinite(got).all() else np.inf
  norm = float(np.linalg.norm(want))
  rel_l2 = float(np.linalg.norm(got - want) / max(norm, 1e-30))
  if not np.isfinite(rel_l2):
    rel_l2 = np.inf
  return {"max_err": max_err, "max_err_limit": atol * scale,
          "rel_l2": rel_l2, "rel_l2_limit": rel,
          "ok": bool(max_err <= atol * scale and rel_l2 <= rel)}


def _inputs(case: Case, seed: int = 0):
  r = jax.random.split(jax.random.key(seed), 4)
  dt = jnp.dtype(case.dtype)
  if case.kind == "train":
    b, t = len(spans(case.length)), case.length
    q = jax.random.normal(r[0], (b, t, case.heads, case.head_dim))
    k = jax.random.normal(r[1], (b, t, case.kv_heads, case.head_dim))
    v = jax.random.normal(r[2], (b, t, case.kv_heads, case.head_dim))
    pos = np.arange(t)
    valid = jnp.asarray(np.stack([(pos >= s) & (pos < e)
                                  for s, e in spans(t)]))
    # A loss over real queries only: padding outputs are unspecified.
    ct = jax.random.normal(r[3], q.shape) * valid[:, :, None, None]
    return (q.astype(dt), k.astype(dt), v.astype(dt)), valid, ct
  b, kv, nq = len(case.read_lengths), case.kv_heads, case.heads // case.kv_heads
  q = jax.random.normal(r[0], (b, kv, nq, case.head_dim))
  k = jax.random.normal(r[1], (b, kv, case.head_dim, case.length))
  v = jax.random.normal(r[2], (b, kv, case.length, case.head_dim))
  return (q.astype(dt), k.astype(dt), v.astype(dt)), None, None


def train_fn(backend: str) -> Callable:
  """The training attention `backend` as the model calls it; on CPU the
  kernels interpreted and cuDNN's layout through XLA's implementation."""
  if backend == "cudnn" and jax.default_backend() != "gpu":
    return lambda q, k, v, valid: ak.cudnn_attention(
        q, k, v, valid, implementation="xla")
  return lambda q, k, v, valid: ak.attend(q, k, v, valid, backend=backend)


def _precision(dtype: str):
  # float32 as float32 (no TF32); bf16 inputs run as the model runs them.
  return jax.default_matmul_precision(
      "highest" if dtype == "float32" else "default")


def _out_and_grads(fn, valid, ct):
  """jit: (q, k, v) -> (fn's output, d(sum(out * ct))/d(q, k, v))."""
  def go(q, k, v):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, valid), q, k, v)
    return out, vjp(ct.astype(out.dtype))
  return jax.jit(go)


@functools.lru_cache(maxsize=4)
def _train_reference(kind_shape: tuple, dtype: str):
  """The reference's output and gradients for a case's inputs (cached:
  cases that differ only in the backend share them)."""
  case = Case("train", "reference", dtype, *kind_shape)
  (q, k, v), valid, ct = _inputs(case)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  with jax.default_matmul_precision("highest"):
    out, g = _out_and_grads(chunked_reference, valid, ct)(*f32)
  return jax.device_get((out, g))


def check_train(case: Case, fn: Callable | None = None) -> dict:
  """Forward and backward of `fn` (default: the case's backend)."""
  fn = fn or train_fn(case.backend)
  (q, k, v), valid, ct = _inputs(case)
  with _precision(case.dtype):
    out, g = jax.block_until_ready(_out_and_grads(fn, valid, ct)(q, k, v))
  ref, g_ref = _train_reference(
      (case.length, case.heads, case.kv_heads, case.head_dim), case.dtype)
  m = np.asarray(valid)[:, :, None, None]
  res = {"out": _compare(out, ref, case.dtype, "out", m)}
  finite = {"out": bool(np.isfinite(np.asarray(out, np.float32)).all())}
  pad_nonzero = {}
  for name, gi, gr in zip(("dq", "dk", "dv"), g, g_ref):
    gi = np.asarray(gi, np.float32)
    res[name] = _compare(gi, gr, case.dtype, "grad")
    finite[name] = bool(np.isfinite(gi).all())
    # Exactly zero where the position is padding (NaN counts as nonzero).
    pad_nonzero[name] = int((~(np.where(~m, gi, 0.0) == 0)).sum())
  return _verdict(case, res, finite, pad_nonzero)


def check_decode(case: Case, fn: Callable | None = None) -> dict:
  """The suffix read of one decode step against the masked product."""
  (q, k, v), _, _ = _inputs(case)
  lengths = np.asarray(case.read_lengths, np.int32)
  if not case.per_row:
    lengths = np.full_like(lengths, max(n for n in lengths
                                        if n < case.length))
  interpret = jax.default_backend() != "gpu"
  fn = fn or (lambda q, k, v, n: sa.attend_suffix(
      q, k, v, n, case.backend, interpret=interpret))
  # NaN in every slot past each row's last kernel block: never read.
  pk, pv = k, v
  for i, n in enumerate(lengths):
    read = -(-int(n) // sa.KERNEL_BLOCK) * sa.KERNEL_BLOCK
    pk = pk.at[i, ..., read:].set(jnp.nan)
    pv = pv.at[i, :, read:].set(jnp.nan)
  if sa.keys_time_major(case.backend):
    pk = pk.swapaxes(2, 3)
  n_arg = jnp.asarray(lengths) if case.per_row else jnp.int32(lengths[0])
  with _precision(case.dtype):
    out, lse = jax.block_until_ready(jax.jit(fn)(q, pk, pv, n_arg))
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  with jax.default_matmul_precision("highest"):
    ref_out, ref_lse = jax.jit(lambda q, k, v, n: sa.attend_suffix(
        q, k, v, n, "reference"))(*f32, jnp.asarray(lengths))
  res = {"out": _compare(out, ref_out, case.dtype, "out"),
         "lse": _compare(lse, ref_lse, case.dtype, "lse")}
  finite = {"out": bool(np.isfinite(np.asarray(out)).all()),
            "lse": bool(np.isfinite(np.asarray(lse)).all())}
  return _verdict(case, res, finite, {})


def _verdict(case, res, finite, pad_nonzero) -> dict:
  problems = [f"{k} not finite" for k, ok in finite.items() if not ok]
  problems += [f"{k}: {n} values not exactly zero at padded positions"
               for k, n in pad_nonzero.items() if n]
  problems += [
      f"{k}: max error {r['max_err']:.3g} (limit {r['max_err_limit']:.3g}), "
      f"relative L2 {r['rel_l2']:.3g} (limit {r['rel_l2_limit']:.3g})"
      for k, r in res.items() if not r["ok"]]
  return {"case": case.name, "ok": not problems,
          "message": f"{case.name}: " + ("; ".join(problems) or "ok"),
          "errors": res, "finite": finite,
          "padded_nonzero": pad_nonzero}


def run(case: Case, fn: Callable | None = None) -> dict:
  """One case's verdict; an exception (a kernel that fails to compile or
  runs out of memory) is a failed case with its message, not a crash."""
  t0 = time.perf_counter()
  try:
    out = (check_train if case.kind == "train" else check_decode)(case, fn)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0][:300]
    out = {"case": case.name, "ok": False,
           "message": f"{case.name}: {type(e).__name__}: {first}"}
  out["seconds"] = time.perf_counter() - t0
  return out
