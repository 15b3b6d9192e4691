"""The decoder: mesh-independent logits, KV-cached decode == full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from brorl_jax.model import attention as attn_lib
from brorl_jax.model.config import model_config
from brorl_jax.model.layers import dense
from brorl_jax.model.sharding import (SAMPLE_RULES, TRAIN_RULES, MeshRules,
                                      activation_rules, constrain_merged,
                                      make_mesh, reshard)
from brorl_jax.model.transformer import Policy, positions_from_valid
from tests.model import cached_attention


def _batch(rng, b, t, vocab, pads):
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  valid = np.ones((b, t), bool)
  for i, p in enumerate(pads):
    valid[i, :p] = False
  return jnp.asarray(tokens), jnp.asarray(valid)


def _forward_logits(policy, mesh_rules=None):
  def fwd(params, tokens, valid):
    with activation_rules(mesh_rules):
      model = policy.bind(params)
      hidden, _ = model(tokens, positions_from_valid(valid),
                        attn_lib.FullAttention(valid))
      return model.logits(hidden)
  return jax.jit(fwd)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (8, 1, 1)])
@pytest.mark.parametrize("rules", ["train", "sample"])
def test_mesh_logits_match_single_device(tiny_policy, tiny_params, shape,
                                         rules):
  rng = np.random.default_rng(1)
  tokens, valid = _batch(rng, 8, 12, tiny_policy.cfg.vocab_size,
                         [0, 3, 0, 5, 1, 0, 11, 2])
  ref = np.asarray(_forward_logits(tiny_policy)(tiny_params, tokens, valid))
  mesh_rules = MeshRules(make_mesh(shape),
                         TRAIN_RULES if rules == "train" else SAMPLE_RULES)
  params = reshard(tiny_params, tiny_policy.shardings(mesh_rules))
  if shape == (1, 8, 1) and rules == "train":  # FSDP over 8 devices
    assert not params["layer_0"]["mlp"]["up_proj"].sharding.is_fully_replicated
  got = np.asarray(_forward_logits(tiny_policy, mesh_rules)(
      params, tokens, valid))
  mask = np.asarray(valid)
  np.testing.assert_allclose(got[mask], ref[mask], rtol=1e-5,
                             atol=1e-5 * np.abs(ref).max())


def test_kv_cached_decode_matches_full_forward(tiny_policy, tiny_params):
  """Left-padded prompts of different lengths, then 5 decode steps."""
  cfg = tiny_policy.cfg
  rng = np.random.default_rng(2)
  lp, steps = 9, 5
  tokens, valid = _batch(rng, 3, lp + steps, cfg.vocab_size, [0, 4, 7])
  full = np.asarray(_forward_logits(tiny_policy)(tiny_params, tokens, valid))

  @jax.jit
  def decode(params, tokens, valid):
    model = tiny_policy.bind(params)
    cache = cached_attention.KVCache.zeros(cfg.num_layers, 3, lp + steps,
                                   cfg.num_kv_heads, cfg.head_dim, jnp.float32)
    positions = positions_from_valid(valid)
    layers = tuple(zip(cache.k, cache.v))
    # Prefill the prompt through the cache, then one token at a time.
    strategy = cached_attention.CachedAttention(valid=valid, end=jnp.int32(0))
    hidden, layers = model(tokens[:, :lp], positions[:, :lp], strategy, layers)
    out = [model.logits(hidden)]
    for t in range(lp, lp + steps):
      strategy = cached_attention.CachedAttention(valid=valid, end=jnp.int32(t))
      hidden, layers = model(tokens[:, t:t + 1], positions[:, t:t + 1],
                             strategy, layers)
      out.append(model.logits(hidden))
    return jnp.concatenate(out, axis=1)

  got = np.asarray(decode(tiny_params, tokens, valid))
  mask = np.asarray(valid)
  np.testing.assert_allclose(got[mask], full[mask], rtol=1e-5,
                             atol=1e-5 * np.abs(full).max())


def test_remat_and_bf16_run():
  cfg = model_config("tiny", {"remat": True, "dtype": "bfloat16"})
  policy = Policy.create(cfg)
  params = policy.init(jax.random.key(0))
  # Distinct tokens: with identical ones every value vector is the same, the
  # loss does not depend on the queries, and q_proj's gradient is only
  # rounding noise (exactly 0 with the blockwise backward).
  tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
  valid = jnp.ones((2, 5), bool)

  def loss(params):
    model = policy.bind(params)
    hidden, _ = model(tokens, positions_from_valid(valid),
                      attn_lib.FullAttention(valid))
    return model.logits(hidden).mean()
  grads = jax.jit(jax.grad(loss))(params)
  assert grads["layer_0"]["mlp"]["up_proj"].dtype == jnp.float32
  assert np.isfinite(np.asarray(grads["layer_1"]["attn"]["q_proj"])).all()
  assert np.abs(np.asarray(grads["layer_1"]["attn"]["q_proj"])).sum() > 0


def test_config_errors_name_the_key():
  from brorl_jax.config import ConfigError
  with pytest.raises(ConfigError, match="model.num_kv_heads"):
    model_config("tiny", {"num_kv_heads": 3})
  with pytest.raises(ConfigError, match="model.preset"):
    model_config("nope")
  with pytest.raises(ConfigError, match="model.dtype"):
    model_config("tiny", {"dtype": "float8"})
  assert model_config("qwen2_1p5b").num_params() == 1_777_088_000


@pytest.mark.parametrize("shape,pg,spec", [
    ((8, 1, 1), (8, 4), ("data",)),          # P over data, G whole
    ((8, 1, 1), (1, 16), ("data",)),         # P = 1: G over data
    ((4, 1, 2), (4, 4), ("data", "tensor")),  # kv heads over tensor
    ((8, 1, 1), (2, 8), (None,)),            # G over data under 2 prompts:
])                                           # blocks would interleave
def test_constrain_merged_keeps_contiguous_blocks(shape, pg, spec):
  p, g = pg
  rules = MeshRules(make_mesh(shape), SAMPLE_RULES)
  f = jax.jit(lambda x: constrain_merged(x, ("batch", "group"), (p, g),
                                         ("act_kv", None, None)))
  with activation_rules(rules):
    y = f(jnp.zeros((p * g, 2, 8, 16)))
  want = PartitionSpec(*spec) if spec[0] else PartitionSpec()
  assert y.sharding.spec == want, y.sharding.spec


def test_dense_gradients_equal_the_einsum():
  k = jax.random.split(jax.random.key(0), 3)
  for xs, ws, spec, c in [((3, 5, 8), (8, 12), "btd,df->btf", 1),
                          ((3, 5, 12), (12, 4), "btf,fd->btd", 1),
                          ((3, 5, 8), (8, 2, 4), "btd,dnh->btnh", 1),
                          ((3, 5, 2, 4), (2, 4, 8), "btnh,nhd->btd", 2)]:
    x, w = jax.random.normal(k[0], xs), jax.random.normal(k[1], ws)
    ct = jax.random.normal(k[2], jnp.einsum(spec, x, w).shape)
    got = jax.grad(lambda x, w: (dense(x, w, c) * ct).sum(), (0, 1))(x, w)
    want = jax.grad(lambda x, w: (jnp.einsum(spec, x, w) * ct).sum(),
                    (0, 1))(x, w)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
