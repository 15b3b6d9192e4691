"""Ahead-of-time TPU compile of the update's forward + backward (no TPU).

Needs libtpu (`pip install -e '.[tpu-aot]'`, ENV.md §12); skipped without it.
Compiles against a v5p topology: "auto" resolves to splash there (the HLO
holds its Mosaic custom call) and its temporaries stay below one layer's
full scores.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from brorl_jax.model.config import model_config
from brorl_jax.model.sharding import (TRAIN_RULES, MeshRules,
                                      activation_rules, make_mesh)
from brorl_jax.model.transformer import Policy
from brorl_jax.rl.logprobs import response_logprobs

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason="libtpu is not installed (extra tpu-aot)"),
    pytest.mark.slow,
]


def _compile(rules, backend: str, rows: int, t: int):
  cfg = model_config("tiny", dict(
      head_dim=128, dtype="bfloat16", remat=True,
      max_position_embeddings=t, attention_backend=backend))
  policy = Policy.create(cfg)

  def loss(params, inputs, valid):
    with activation_rules(rules):
      logp, _ = response_logprobs(
          policy, params, inputs, valid, inputs[:, t // 2:], temperature=1.0,
          vocab_chunk=cfg.vocab_size, seq_chunk=512, with_entropy=False)
      return logp.sum()

  def sds(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=s), tree, shardings)

  params = sds(policy.abstract_params(), policy.shardings(rules))
  row_sharding = rules.sharding(("batch", None), (rows, t))
  inputs = jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=row_sharding)
  valid = jax.ShapeDtypeStruct((rows, t), bool, sharding=row_sharding)
  return jax.jit(jax.grad(loss)).lower(params, inputs, valid).compile()


def test_splash_update_compiles_for_v5p():
  from jax.experimental import topologies  # needs libtpu to describe a TPU
  devices = topologies.get_topology_desc(
      platform="tpu", topology_name="v5p:2x2x1").devices
  rules = MeshRules(make_mesh((len(devices), 1, 1), devices), TRAIN_RULES)
  rows, t = len(devices), 4096              # one row per chip
  compiled = _compile(rules, "auto", rows, t)
  assert "tpu_custom_call" in compiled.as_text()
  temp = compiled.memory_analysis().temp_size_in_bytes
  # Full scores of one layer, [K, Q, T, T] f32 for the chip's row (256 MiB),
  # are what the reference backend needs at least (551 MiB measured).
  full_scores = 4 * t * t * 4
  assert temp < full_scores / 2, temp
