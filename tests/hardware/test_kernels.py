"""The GPU attention kernels against the float32 reference, on hardware.

`test_on_hardware` runs `kernel_checks.cases("full")` (the recipes' shapes:
head dim 128, 12 query and 2 KV heads, rows of 4,103 and 17,407 tokens, a
16,384-slot decode buffer) compiled for the GPU; without one it is skipped.
`test_in_interpret_mode` runs the same checks at reduced shapes on CPU, the
kernels in Pallas interpret mode, so CI proves the checks; the last tests
show that the checks fail a broken kernel (NaN gradients at padding, a
TF32-sized error, a read past the rows' lengths).

On a GPU: `JAX_PLATFORMS=cuda python -m pytest -q tests/hardware`, or
`python -m brorl_jax.bench gpu` (these checks and the throughput figures).
"""

import jax
import jax.numpy as jnp
import pytest

from brorl_jax.bench import kernel_checks as kc
from brorl_jax.model import attention_kernels as ak
from brorl_jax.rollout import suffix_attention as sa

ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", kc.cases("full"), ids=lambda c: c.name)
def test_on_hardware(case):
  result = kc.run(case)
  assert result["ok"], result["message"]


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels run compiled")
@pytest.mark.parametrize("case", kc.cases("reduced"), ids=lambda c: c.name)
def test_in_interpret_mode(case):
  result = kc.run(case)
  assert result["ok"], result["message"]


def test_cases_cover_the_recipes_shapes():
  full = kc.cases("full")
  assert {(c.heads, c.kv_heads, c.head_dim) for c in full} == {(12, 2, 128)}
  assert {c.length for c in full if c.kind == "train"} == {4103, 17407}
  # Every full case has its reduced twin (same kind, backend, dtype).
  key = lambda c: (c.kind, c.backend, c.dtype, c.per_row)
  assert set(map(key, full)) == set(map(key, kc.cases("reduced")))


@jax.custom_vjp
def _nan_grad_at_padding(x, valid):
  return x


def _fwd(x, valid):
  return x, valid


def _bwd(valid, g):
  return jnp.where(valid[:, :, None, None], g, jnp.nan), None


_nan_grad_at_padding.defvjp(_fwd, _bwd)


def _train_case(dtype="float32"):
  # The reduced shape: the reference's outputs are cached from above.
  return next(c for c in kc.cases("reduced")
              if c.kind == "train" and c.dtype == dtype)


def test_nan_gradients_at_padding_fail():
  # cuDNN's failure mode: outputs right, dk NaN at padded keys.
  result = kc.run(_train_case(), lambda q, k, v, valid: ak.blockwise_attention(
      q, _nan_grad_at_padding(k, valid), v, valid))
  assert not result["ok"]
  assert "dk not finite" in result["message"]
  assert result["padded_nonzero"]["dk"] > 0
  assert result["errors"]["out"]["ok"] and result["errors"]["dv"]["ok"]


def test_a_tf32_sized_error_fails_float32_not_bfloat16():
  def off(q, k, v, valid):
    out = ak.blockwise_attention(q, k, v, valid)
    return out * jnp.asarray(1 + 2e-3, out.dtype)
  f32 = kc.run(_train_case(), off)
  assert not f32["ok"] and not f32["errors"]["out"]["ok"], f32["message"]
  assert kc.run(_train_case("bfloat16"), off)["ok"]


def test_a_decode_read_past_the_length_fails():
  case = next(c for c in kc.cases("reduced")
              if c.kind == "decode" and c.per_row)

  def whole_buffer(q, k, v, n):  # k arrives time-major: [B, K, S, H]
    s = jnp.einsum("bkqh,bksh->bkqs", q, k) * q.shape[-1] ** -0.5
    mask = jnp.arange(k.shape[2]) < n[:, None, None, None]
    w = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1)
    return jnp.einsum("bkqs,bksh->bkqh", w, v), jnp.zeros(q.shape[:-1])
  result = kc.run(case, whole_buffer)
  assert not result["ok"] and "out not finite" in result["message"]
  assert sa.keys_time_major(case.backend)
