"""Length-aware decode attention: every backend against the reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from brorl_jax.model import attention_kernels
from brorl_jax.model.config import model_config
from brorl_jax.model.sharding import SAMPLE_RULES, MeshRules, make_mesh, reshard
from brorl_jax.model.transformer import Policy
from brorl_jax.rollout import Sampler, SamplerConfig
from brorl_jax.rollout import suffix_attention as sa


# JAX 0.12 no longer ships the Pallas Triton kernels: `pallas_gpu` is then
# refused by design (attention_kernels), so its cases are skipped there.
_NO_TRITON = pytest.mark.skipif(
    not attention_kernels.triton_kernels_available(),
    reason="this JAX ships no Pallas Triton kernels (removed in 0.12)")


@pytest.mark.parametrize("backend", [
    "blockwise", pytest.param("pallas_gpu", marks=_NO_TRITON), "splash"])
def test_backends_read_only_written_blocks(backend):
  """Equal to the reference, with NaN in every slot past the last block read.

  The reference reads all slots (NaN values would poison its output); a
  length-aware backend never touches the NaN blocks. One batch holds rows
  of several lengths' worth of queries; each length is one call, as in
  decode (all rows of a chunk share the step). The kernels run in Pallas
  interpret mode.
  """
  rng = np.random.default_rng(0)
  b, kv, nq, h, s = 3, 2, 2, 16, 256
  q = jnp.asarray(rng.normal(size=(b, kv, nq, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, kv, h, s)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, kv, s, h)), jnp.float32)
  run = jax.jit(lambda q, k, v, n: sa.attend_suffix(
      q, k, v, n, backend, interpret=True))
  for length in (1, 63, 64, 65, 130, 256):
    want_out, want_lse = sa.attend_suffix(q, k, v, jnp.int32(length),
                                          "reference")
    read = -(-length // sa.KERNEL_BLOCK) * sa.KERNEL_BLOCK
    if backend == "blockwise":
      read = -(-length // sa.BLOCKWISE_BLOCK) * sa.BLOCKWISE_BLOCK
    pk, pv = k.at[..., read:].set(jnp.nan), v.at[:, :, read:].set(jnp.nan)
    if sa.keys_time_major(backend):
      pk = pk.swapaxes(2, 3)
    out, lse = run(q, pk, pv, jnp.int32(length))
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=2e-6,
                               err_msg=f"length {length}")
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=2e-6,
                               err_msg=f"length {length}")


def _per_row_case(backend, interpret):
  """[B] lengths (the refill's slots): each row equal to the reference at
  its own length. The kernels read no block past a row's own (NaN there);
  blockwise takes the masked product, so its buffer holds no NaN."""
  rng = np.random.default_rng(1)
  b, kv, nq, h, s = 4, 2, 2, 16, 384
  q = jnp.asarray(rng.normal(size=(b, kv, nq, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, kv, h, s)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, kv, s, h)), jnp.float32)
  lengths = np.array([1, 129, 256, 300], np.int32)
  pk, pv = k, v
  if sa.reads_per_row(backend):
    for i, n in enumerate(lengths):
      read = -(-n // sa.KERNEL_BLOCK) * sa.KERNEL_BLOCK
      pk, pv = pk.at[i, ..., read:].set(jnp.nan), pv.at[i, :, read:].set(
          jnp.nan)
  if sa.keys_time_major(backend):
    pk = pk.swapaxes(2, 3)
  out, lse = jax.jit(lambda q, k, v, n: sa.attend_suffix(
      q, k, v, n, backend, interpret=interpret))(q, pk, pv,
                                                 jnp.asarray(lengths))
  for i, n in enumerate(lengths):
    want_out, want_lse = sa.attend_suffix(q[i:i + 1], k[i:i + 1],
                                          v[i:i + 1], jnp.int32(n),
                                          "reference")
    np.testing.assert_allclose(out[i:i + 1], want_out, rtol=1e-5, atol=2e-6,
                               err_msg=f"row {i}, length {n}")
    np.testing.assert_allclose(lse[i:i + 1], want_lse, rtol=1e-6, atol=2e-6,
                               err_msg=f"row {i}, length {n}")


# The GPU kernel's per-row case (the same rows, f32 and bf16) is in
# tests/hardware (`kernel_checks`, decode ... per_row).
@pytest.mark.parametrize("backend", ["blockwise", "splash"])
def test_per_row_lengths_read_each_row_to_its_own(backend):
  _per_row_case(backend, interpret=True)


def _generate(backend, mesh_shape=None, **sampler_kw):
  """Tiny model, f32, 80 new tokens at temperature 0.7, rows stopping."""
  rng = np.random.default_rng(1)
  lp = 10
  tokens = rng.integers(3, 512, (2, lp)).astype(np.int32)
  tokens[1, :4] = 0
  lengths = np.asarray([lp, lp - 4], np.int32)
  policy = Policy.create(model_config("tiny", {"attention_backend": backend}))
  params = policy.init(jax.random.key(0))
  rules = None
  if mesh_shape:
    rules = MeshRules(make_mesh(mesh_shape), SAMPLE_RULES)
    params = reshard(params, policy.shardings(rules))
  sampler = Sampler(policy, SamplerConfig(
      n=3, max_prompt_len=lp, max_new_tokens=80, temperature=0.7,
      **sampler_kw), stop_ids=(7, 11, 13), pad_id=0, mesh_rules=rules)
  assert sampler.decode_backend == backend
  return sampler.generate(params, tokens, lengths, jax.random.key(2))


@pytest.fixture(scope="module")
def reference_rollouts():
  return _generate("reference")


@pytest.mark.parametrize("backend,mesh_shape,refill", [
    ("blockwise", None, False),
    pytest.param("pallas_gpu", (4, 1, 2), False, marks=_NO_TRITON),
    ("blockwise", None, True), ("splash", None, True),
    pytest.param("pallas_gpu", (4, 1, 2), True, marks=_NO_TRITON)])
def test_decode_equals_reference_decode(backend, mesh_shape, refill,
                                        reference_rollouts):
  """Sampler level, f32: equal tokens, log-probs within 1e-5.

  80 new tokens cross a blockwise block boundary (blocks of 64: the second
  is the buffer's last 64 slots, overlapping the first); rows stop at
  different steps. The GPU kernel (interpret mode) also exercises its suffix
  layout (time-major keys, padded to 128 slots) and, in a mesh (rows over
  data, kv heads over tensor), `shard_map`; the TPU kernel's layout is the
  blockwise one, padded, and its numerics are checked above. With `refill`
  (2 slots per prompt, 3 rollouts each, segments of 32 steps) the slots
  sit at different positions: the kernels read each row to its own length,
  blockwise's buffer is cut to the busy slots between segments.
  """
  kw = dict(refill=True, max_decode_rows=4, segment_steps=32) if refill else {}
  ref, new = reference_rollouts, _generate(backend, mesh_shape, **kw)
  lens = np.asarray(ref.lengths)
  assert lens.max() > sa.BLOCKWISE_BLOCK and lens.min() < lens.max(), lens
  np.testing.assert_array_equal(new.tokens, ref.tokens)
  np.testing.assert_array_equal(new.lengths, ref.lengths)
  np.testing.assert_allclose(new.logprobs, ref.logprobs, atol=1e-5, rtol=0)


def test_default_backend_on_cpu_is_blockwise(tiny_policy):
  sampler = Sampler(tiny_policy, SamplerConfig(max_prompt_len=4,
                                               max_new_tokens=4),
                    stop_ids=(1,), pad_id=0)
  assert tiny_policy.cfg.attention_backend == "auto"
  assert sampler.decode_backend == "blockwise"



def test_tpu_kernel_compiles_ahead_of_time_for_v5p():
  """Where libtpu is installed: the TPU decode kernel lowers through Mosaic
  and compiles against a v5p:2x2x1 topology (no TPU needed), under
  shard_map, 1.5B-model head shapes in bf16."""
  pytest.importorskip("libtpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  devices = np.asarray(topologies.get_topology_desc("v5p:2x2x1",
                                                    "tpu").devices)
  mesh = Mesh(devices.reshape(-1), ("data",))
  rows = NamedSharding(mesh, PartitionSpec("data"))
  b, kv, nq, h, s = 8 * devices.size, 2, 6, 128, 2048
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=rows)
          for shape in ((b, kv, nq, h), (b, kv, h, s), (b, kv, s, h))]
  # One length for every row (a fixed chunk), or one per row (refill).
  lengths = (jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(
      mesh, PartitionSpec())), jax.ShapeDtypeStruct((b,), jnp.int32,
                                                    sharding=rows))
  for length in lengths:
    compiled = jax.jit(lambda q, k, v, n: sa.attend_suffix(
        q, k, v, n, "splash", sharding=NamedSharding(
            mesh, PartitionSpec("data", None, None, None)))
                       ).lower(*args, length).compile()
    assert "tpu_custom_call" in compiled.as_text()
    out = compiled.memory_analysis()
    # Output and lse only: no [B, K, Q, S] scores.
    assert out.temp_size_in_bytes < b * kv * nq * s * 4 // devices.size
