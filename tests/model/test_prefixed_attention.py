"""Shared-prefix training attention equals attention over repeated rows.

Each backend's `attend_prefixed` (slots of c rows after one prompt) against
the full-scores reference over the rows `prompt ++ own` with the prompt
repeated per row: outputs at real queries and the gradients of queries,
the rows' own keys/values and the prompts' keys/values (the repeated rows'
gradient summed over each slot's rows).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brorl_jax.model import attention_kernels as ak
from brorl_jax.model import prefixed_attention as pa
from brorl_jax.model.sharding import TRAIN_RULES, MeshRules, activation_rules
from brorl_jax.model.sharding import make_mesh


def _case(u=2, c=3, wp=7, t=9, n=4, kv=2, h=16, seed=0):
  r = jax.random.split(jax.random.key(seed), 6)
  b = u * c
  q = jax.random.normal(r[0], (b, t, n, h))
  k = jax.random.normal(r[1], (b, t, kv, h))
  v = jax.random.normal(r[2], (b, t, kv, h))
  pk = jax.random.normal(r[3], (u, wp, kv, h))
  pv = jax.random.normal(r[4], (u, wp, kv, h))
  prompt_len = np.array([wp, 4] + [wp - 1] * (u - 2))[:u]
  prefix_valid = np.arange(wp)[None] >= (wp - prompt_len)[:, None]
  lengths = np.array([t, 5, 0, 1, t, 3] * b)[:b]      # one row without any
  valid = np.arange(t)[None] < lengths[:, None]
  ct = jax.random.normal(r[5], q.shape) * valid[:, :, None, None]
  return (q, k, v, pk, pv, jnp.asarray(valid),
          jnp.asarray(prefix_valid)), ct


def _repeated(q, k, v, pk, pv, valid, prefix_valid):
  """The reference over `prompt ++ own` rows, prompt repeated per row."""
  b, wp = q.shape[0], pk.shape[1]
  rep = lambda x: jnp.repeat(x, b // x.shape[0], axis=0)  # noqa: E731
  cat = lambda a, x: jnp.concatenate([rep(a), x], axis=1)  # noqa: E731
  q_full = jnp.concatenate([jnp.zeros((b, wp) + q.shape[2:]), q], axis=1)
  out = ak.reference_attention(q_full, cat(pk, k), cat(pv, v),
                               cat(prefix_valid, valid))
  return out[:, wp:]


def _check(fn, args, ct):
  valid = args[5]

  def grads(f):
    return jax.jit(jax.grad(lambda *x: jnp.sum(f(*x, *args[5:]) * ct),
                            (0, 1, 2, 3, 4)))(*args[:5])

  out, ref = jax.jit(fn)(*args), _repeated(*args)
  m = valid[:, :, None, None]
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(jnp.where(m, out, 0), jnp.where(m, ref, 0),
                             atol=2e-5, rtol=0)
  for name, g, g_ref in zip(("q", "k", "v", "prefix_k", "prefix_v"),
                            grads(fn), grads(_repeated)):
    assert float(jnp.abs(g_ref).max()) > 0, name
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0, err_msg=name)


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_dense_matches_repeated_rows(backend):
  _check(lambda *a: pa.attend_prefixed(*a, backend=backend), *_case())


@pytest.mark.parametrize("block", [4, 8])  # partial last blocks / whole ones
def test_blockwise_scan_matches_repeated_rows(monkeypatch, block):
  monkeypatch.setattr(ak, "BLOCK", block)
  args, ct = _case(wp=8 if block == 8 else 7, t=16 if block == 8 else 9)
  assert args[3].shape[1] > block or args[0].shape[1] > block  # the scan
  _check(lambda *a: pa.attend_prefixed(*a, backend="blockwise"), args, ct)


def test_full_row_fallback_matches_repeated_rows():
  # The cuDNN / Pallas GPU fallback's layout (zero queries at the prompt's
  # positions), through the reference backend on CPU.
  _check(lambda *a: pa._full_row(*a, "reference"), *_case())
  _check(lambda *a: pa._full_row(*a, "blockwise"), *_case(seed=1))


def test_strategy_runs_under_a_mesh():
  # 2 slots x 4 rows over a data axis of 8 rows: the einsums shard.
  rules = MeshRules(make_mesh((8, 1, 1)), TRAIN_RULES)
  args, ct = _case(u=2, c=4)

  def sharded(*a):
    with activation_rules(rules):
      return pa.PrefixedAttention(a[6], a[5], "blockwise")(
          *a[:3], (a[3], a[4]))[0]
  _check(sharded, args, ct)


@pytest.mark.slow  # interpret mode
def test_splash_matches_repeated_rows_under_shard_map():
  rules = MeshRules(make_mesh((2, 4, 1)), TRAIN_RULES)
  args, ct = _case(u=2, c=2, wp=7, t=9)

  def sharded(*a):
    with activation_rules(rules):
      return pa.attend_prefixed(*a, backend="splash")
  _check(sharded, args, ct)
