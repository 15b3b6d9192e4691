"""Attention backends against the full-scores reference (f32, valid queries).

Rows mix the layouts the stack produces: a left-padded prompt, a right-padded
response, prompt + response (padding on both sides), a fully padded row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brorl_jax.config import ConfigError
from brorl_jax.model import attention_kernels as ak
from brorl_jax.model import pallas_attention
from brorl_jax.model.config import model_config
from brorl_jax.model.sharding import TRAIN_RULES, MeshRules, activation_rules
from brorl_jax.model.sharding import make_mesh


def _case(t=45, n=4, kv=2, h=16, seed=0):
  r = jax.random.split(jax.random.key(seed), 4)
  spans = [(12, t), (0, 30), (7, 33), (0, 0)]   # [start, end) of real tokens
  b = len(spans)
  q = jax.random.normal(r[0], (b, t, n, h))
  k = jax.random.normal(r[1], (b, t, kv, h))
  v = jax.random.normal(r[2], (b, t, kv, h))
  pos = np.arange(t)
  valid = jnp.asarray(np.stack([(pos >= s) & (pos < e) for s, e in spans]))
  # A loss over valid queries only: padding outputs are unspecified.
  ct = jax.random.normal(r[3], q.shape) * valid[:, :, None, None]
  return (q, k, v, valid), ct


def _check(fn, args, ct):
  """fn's outputs (2e-5) and gradients (1e-4) equal the reference's."""
  q, k, v, valid = args

  def grads(f):
    return jax.jit(jax.grad(
        lambda q, k, v: jnp.sum(f(q, k, v, valid) * ct), (0, 1, 2)))(q, k, v)

  out = jax.jit(fn)(*args)
  ref = ak.reference_attention(*args)
  m = valid[:, :, None, None]
  np.testing.assert_allclose(jnp.where(m, out, 0), jnp.where(m, ref, 0),
                             atol=2e-5, rtol=0)
  assert bool(jnp.all(jnp.isfinite(out)))
  for name, g, g_ref in zip("qkv", grads(fn), grads(ak.reference_attention)):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("block", [ak.BLOCK, 16])  # one block; 3, last partial
def test_blockwise_matches_reference(monkeypatch, block):
  monkeypatch.setattr(ak, "BLOCK", block)
  _check(ak.blockwise_attention, *_case())


def test_cudnn_layout_matches_reference():
  # The rotation to right padding, checked through the same call with XLA's
  # implementation (cuDNN itself on a GPU: tests/hardware).
  _check(lambda *a: ak.cudnn_attention(*a, implementation="xla"), *_case())


@pytest.mark.parametrize("t", [45, 46])   # odd: padded to even inside
def test_cudnn_padding_gets_exactly_zero_gradients(t):
  # The cotangent covers every position, padding included: what reaches
  # the kernel past each row's length is zeroed, so padding's q/k/v
  # gradients are exactly 0 (not merely small).
  (q, k, v, valid), _ = _case(t=t)
  ct = jax.random.normal(jax.random.key(1), q.shape)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ak.cudnn_attention(
      q, k, v, valid, implementation="xla") * ct), (0, 1, 2)))(q, k, v)
  pad = ~valid[:, :, None, None]
  for name, g in zip("qkv", grads):
    assert bool(jnp.all(jnp.where(pad, g, 0) == 0)), name
    assert bool(jnp.any(g != 0)), name


@pytest.mark.slow  # interpret mode: ~15-30 s per kernel
@pytest.mark.parametrize("kernel", ["splash", "pallas_gpu"])
def test_pallas_kernels_match_reference_under_shard_map(kernel):
  # 4 rows over a data axis of 4: one row per device, under shard_map.
  rules = MeshRules(make_mesh((4, 2, 1)), TRAIN_RULES)
  fn = getattr(pallas_attention, f"{kernel}_attention")

  def sharded(*a):
    with activation_rules(rules):
      return fn(*a)
  _check(sharded, *_case(t=24))


def test_auto_resolves_by_platform():
  assert [ak.resolve_attention_backend("auto", p)
          for p in ("cpu", "gpu", "cuda", "tpu")] == [
              "blockwise", "cudnn", "cudnn", "splash"]
  assert ak.resolve_attention_backend("reference", "tpu") == "reference"
  with pytest.raises(ValueError, match="model.attention_backend"):
    ak.resolve_attention_backend("flash", "cpu")
  with pytest.raises(ConfigError, match="model.attention_backend"):
    model_config("tiny", {"attention_backend": "flash"})


def test_without_jaxs_triton_kernels_gpu_runs_cudnn_and_the_xla_loops(
    monkeypatch):
  # JAX 0.12 removed jax.experimental.pallas.ops.gpu.{attention,
  # decode_attention}: `pallas_gpu` is refused naming the fix, cuDNN's
  # float32 fallback and its decode read take the XLA loops, and the
  # hardware checks leave the Pallas GPU cases out.
  from brorl_jax.bench import kernel_checks
  from brorl_jax.rollout import suffix_attention as sa
  assert ak.triton_kernels_available()       # jax 0.10 / 0.11 have them
  assert any(c.backend == "pallas_gpu" for c in kernel_checks.cases())
  monkeypatch.setattr(ak, "triton_kernels_available", lambda: False)
  monkeypatch.setattr(sa, "_GPU_KERNEL", ())
  monkeypatch.setattr(sa, "_KERNELS", ("splash",))
  with pytest.raises(ValueError, match=r"pallas_gpu.*jax>=0.10.2,<0.12"):
    ak.resolve_attention_backend("pallas_gpu", "gpu")
  assert ak.resolve_attention_backend("auto", "gpu") == "cudnn"
  assert {c.backend for c in kernel_checks.cases()} == {"cudnn"}
  args, _ = _case()
  np.testing.assert_allclose(
      ak.cudnn_attention(*args), ak.blockwise_attention(*args), rtol=0,
      atol=0)
  assert not sa.keys_time_major("cudnn") and not sa.reads_per_row("cudnn")
  r = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(r[0], (3, 2, 2, 16))
  k = jax.random.normal(r[1], (3, 2, 16, 40))
  v = jax.random.normal(r[2], (3, 2, 40, 16))
  for length in (jnp.int32(23), jnp.array([1, 17, 40], jnp.int32)):
    got = sa.attend_suffix(q, k, v, length, "cudnn")
    want = sa.attend_suffix(q, k, v, length, "blockwise")
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_length_granules_follow_the_kernels_blocks():
  # The update's length buckets round to the kernels' blocks.
  assert [ak.length_granule("blockwise", t) for t in (63, 512, 513)] == [
      8, 8, ak.BLOCK]
  assert [ak.length_granule("splash", t) for t in (100, 4096)] == [128, 512]
  # The float32 GPU blocks tile the bf16 block the rows are padded to.
  assert ak.GPU_BLOCK % pallas_attention.GPU_BLOCK_F32 == 0
  with pytest.raises(ValueError, match="resolve_attention_backend"):
    ak.length_granule("auto", 64)
