"""Chunked token log-probs equal the full-logits computation, in values,
gradients and without a [B, T, V] buffer."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brorl_jax.rl import logprobs


def _naive(hidden, w, targets, temperature):
  logits = (hidden @ w) / temperature  # [B, T, V]
  logp_all = jax.nn.log_softmax(logits)
  logp = jnp.take_along_axis(logp_all, targets[..., None], -1)[..., 0]
  entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
  return logp, entropy


def _inputs(b, t, d, v, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(k[0], (b, t, d))
  w = jax.random.normal(k[1], (d, v)) / math.sqrt(d) * 2.0
  targets = jax.random.randint(k[2], (b, t), 0, v)
  return hidden, w, targets


def _values_and_grads(fn):
  """jit of (logp, entropy, d/d(hidden, w) of a mix of both)."""
  def scalar(hidden, w):
    logp, entropy = fn(hidden, w)
    # Distinct weights per position, so every gradient entry counts.
    weights = jnp.linspace(0.5, 1.5, logp.size).reshape(logp.shape)
    total = (weights * logp).sum() + (entropy * weights[::-1]).sum()
    return total, (logp, entropy)
  return jax.jit(jax.grad(scalar, (0, 1), has_aux=True))


# (B, T, D, V, vocab_chunk, seq_chunk): V divisible by the chunk and not, T
# divisible and not, one chunk covering everything.
CASES = [(2, 8, 16, 64, 16, 4), (2, 7, 16, 50, 16, 3), (3, 5, 8, 37, 64, 8)]


@pytest.mark.parametrize("b,t,d,v,vc,tc", CASES)
def test_values_and_gradients_match_full_logits(b, t, d, v, vc, tc):
  hidden, w, targets = _inputs(b, t, d, v)
  temperature = 0.7
  grads, (logp, entropy) = _values_and_grads(
      lambda h, w_: logprobs.token_logprobs(
          h, w_, targets, temperature, vocab_chunk=vc, seq_chunk=tc))(
              hidden, w)
  ref_grads, (ref_logp, ref_entropy) = _values_and_grads(
      lambda h, w_: _naive(h, w_, targets, temperature))(hidden, w)
  assert logp.shape == (b, t) and logp.dtype == jnp.float32
  np.testing.assert_allclose(logp, ref_logp, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


def test_large_logits_entropy_is_accurate():
  # Logits of size ~100: m + log s - E[z] would lose digits to cancellation.
  hidden, w, targets = _inputs(2, 4, 8, 40, seed=1)
  w = w * 60.0
  logp, entropy = logprobs.token_logprobs(hidden, w, targets, 1.0,
                                          vocab_chunk=16, seq_chunk=4)
  # f64 reference in numpy, from JAX's own f32 logits: the f32 matmul's
  # rounding (~1e-5 at logits of ~100, and different between XLA versions:
  # jax 0.12's read 2.6e-6 off in entropy against an f64 matmul) is not
  # what this test is about.
  z = np.asarray(jnp.einsum("btd,dv->btv", hidden, w,
                            precision="highest"), np.float64)
  assert np.abs(z).max() > 50
  log_p = z - z.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  ref_entropy = -(np.exp(log_p) * log_p).sum(-1)
  ref_logp = np.take_along_axis(log_p, np.asarray(targets)[..., None], -1)
  np.testing.assert_allclose(logp, ref_logp[..., 0], atol=2e-5, rtol=1e-6)
  np.testing.assert_allclose(entropy, ref_entropy, atol=2e-6)


def test_uniform_distribution_golden():
  # w = 0: every logit is 0, so logp = -log V and H = log V exactly.
  hidden, _, targets = _inputs(2, 3, 4, 50)
  logp, entropy = logprobs.token_logprobs(
      hidden, jnp.zeros((4, 50)), targets, 1.0, vocab_chunk=16, seq_chunk=2)
  np.testing.assert_allclose(logp, -math.log(50) * np.ones((2, 3)), atol=1e-6)
  np.testing.assert_allclose(entropy, math.log(50) * np.ones((2, 3)),
                             atol=1e-6)


def test_without_entropy_and_out_of_range_targets():
  hidden, w, targets = _inputs(2, 6, 8, 40)
  targets = targets.at[0, 0].set(-1).at[1, 1].set(40)  # padding ids
  logp, entropy = logprobs.token_logprobs(hidden, w, targets, 1.0,
                                          vocab_chunk=16, seq_chunk=4,
                                          return_entropy=False)
  assert entropy is None
  ref, _ = _naive(hidden, w, jnp.clip(targets, 0, 39), 1.0)
  log_z = jax.nn.logsumexp(hidden @ w, axis=-1)
  np.testing.assert_allclose(logp[0, 1:], ref[0, 1:], atol=1e-5)
  np.testing.assert_allclose(logp[1, 2:], ref[1, 2:], atol=1e-5)
  # An id outside [0, V) picks no logit: logp = -log Z (documented).
  np.testing.assert_allclose([logp[0, 0], logp[1, 1]],
                             [-log_z[0, 0], -log_z[1, 1]], atol=1e-5)


def test_bf16_hidden_with_f32_weights():
  hidden, w, targets = _inputs(2, 8, 32, 100)
  logp, entropy = logprobs.token_logprobs(hidden.astype(jnp.bfloat16), w,
                                          targets, 1.0, vocab_chunk=32,
                                          seq_chunk=4)
  ref_logp, ref_entropy = _naive(hidden, w, targets, 1.0)
  assert logp.dtype == jnp.float32
  np.testing.assert_allclose(logp, ref_logp, atol=0.1)
  np.testing.assert_allclose(entropy, ref_entropy, atol=0.1)
  grad_w = jax.grad(lambda w_: logprobs.token_logprobs(
      hidden.astype(jnp.bfloat16), w_, targets, 1.0, vocab_chunk=32,
      seq_chunk=4)[0].sum())(w)
  assert grad_w.dtype == jnp.float32  # accumulated in the weights' dtype


def _largest_f32_buffer(hlo_text):
  sizes = [math.prod(int(x) for x in dims.split(",") if x)
           for dims in re.findall(r"f32\[([0-9,]*)\]", hlo_text)]
  return max(sizes)


def test_no_full_logits_buffer_forward_or_backward():
  b, t, d, v = 8, 1024, 16, 8192  # B*T*V*4 bytes = 256 MiB
  full = b * t * v
  shapes = (jax.ShapeDtypeStruct((b, t, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))

  def chunked(h, w, tgt):
    logp, entropy = logprobs.token_logprobs(h, w, tgt, 1.0, vocab_chunk=512,
                                            seq_chunk=128)
    return logp.sum() + entropy.sum()

  def naive(h, w, tgt):
    logp, entropy = _naive(h, w, tgt, 1.0)
    return logp.sum() + entropy.sum()

  def compiled(fn):
    return jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*shapes).compile()

  for fn in (chunked, jax.value_and_grad(chunked, (0, 1))):
    c = jax.jit(fn).lower(*shapes).compile()
    # Working set: a few [8, 128, 512] tiles and [16, 8192] weight-sized
    # gradient buffers, against 256 MiB of full logits.
    assert c.memory_analysis().temp_size_in_bytes < full * 4 / 8
    assert _largest_f32_buffer(c.as_text()) <= full // 64
  # The same checks catch the full-logits version.
  c = compiled(naive)
  assert c.memory_analysis().temp_size_in_bytes >= full * 4
  assert _largest_f32_buffer(c.as_text()) >= full
