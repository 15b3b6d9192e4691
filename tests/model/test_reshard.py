"""The train-to-sample reshard: layout moved and, optionally, dtype cast in
one program."""

import jax
import jax.numpy as jnp
import numpy as np

from brorl_jax.model.sharding import (SAMPLE_RULES, TRAIN_RULES, MeshRules,
                                      make_mesh, reshard)


def test_reshard_casts_floats_once_and_moves_the_layout(tiny_policy,
                                                        tiny_params):
  train = MeshRules(make_mesh((1, 8, 1)), TRAIN_RULES)
  sample = MeshRules(make_mesh((1, 8, 1)), SAMPLE_RULES)
  params = reshard(tiny_params, tiny_policy.shardings(train))
  target = tiny_policy.shardings(sample)
  same = reshard(params, target)
  low = reshard(params, target, dtype=jnp.bfloat16)
  for p, s, b, sh in zip(*(jax.tree.leaves(t) for t in (
      tiny_params, same, low, target))):
    # No dtype: the exact f32 values (f32 runs stay bitwise).
    assert s.dtype == p.dtype and np.array_equal(s, p)
    assert b.dtype == jnp.bfloat16 and b.sharding == sh
    np.testing.assert_array_equal(b, p.astype(jnp.bfloat16))
  w = params["layer_0"]["mlp"]["up_proj"]
  assert not w.sharding.is_fully_replicated
  # FSDP dropped: the sampling copy is whole on each device (tensor = 1).
  assert low["layer_0"]["mlp"]["up_proj"].sharding.is_fully_replicated
