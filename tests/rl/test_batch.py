"""`prepare` hands the diagnostics the kept groups' inputs itself."""

import jax
import jax.numpy as jnp
import numpy as np

from brorl_jax.rl import advantages as adv_lib
from brorl_jax.rl import batch as batch_lib
from brorl_jax.rl.shaping import ShapingConfig
from brorl_jax.rollout import Rollouts


def test_prepared_carries_the_kept_groups_inputs_of_the_diagnostics():
  rng = np.random.default_rng(0)
  p_over, p, g, t, v = 6, 3, 4, 5, 11
  # Groups 0 and 3 all correct, 4 all wrong: dynamic sampling keeps 1, 2, 5.
  rewards = np.array([[1, 1, 1, 1], [1, 0, 0, 1], [0, 1, 0, 0],
                      [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 1]], np.float32)
  ro = Rollouts(
      tokens=jnp.asarray(rng.integers(0, v, (p_over, g, t)), jnp.int32),
      logprobs=jnp.asarray(-rng.uniform(0, 2, (p_over, g, t)), jnp.float32),
      lengths=jnp.asarray(rng.integers(1, t + 1, (p_over, g)), jnp.int32),
      stopped=jnp.asarray(rng.random((p_over, g)) < 0.8),
      first_probs=jax.nn.softmax(jnp.asarray(rng.normal(size=(p_over, v)),
                                             jnp.float32), -1),
      finished_slots=jnp.int32(30), total_slots=jnp.int32(120))
  prompts = jnp.asarray(rng.integers(1, v, (p_over, 7)), jnp.int32)
  lengths = jnp.asarray(rng.integers(1, 8, (p_over,)), jnp.int32)
  cfg = batch_lib.BatchConfig(
      num_groups=p, max_new_tokens=t, correct_threshold=0.5,
      advantage=adv_lib.AdvantageConfig(dynamic_sampling=True),
      shaping=ShapingConfig())
  out = jax.jit(batch_lib.prepare, static_argnums=0)(
      cfg, prompts, lengths, ro, jnp.asarray(rewards), jnp.int32(0))
  sel = np.asarray(out.selected)
  np.testing.assert_array_equal(sel, [1, 2, 5])
  np.testing.assert_array_equal(out.first_probs,
                                np.asarray(ro.first_probs)[sel])
  np.testing.assert_array_equal(out.rewards, rewards[sel])
  np.testing.assert_array_equal(out.batch.prompt_tokens,
                                np.asarray(prompts)[sel])
  np.testing.assert_array_equal(out.batch.prompt_lengths,
                                np.asarray(lengths)[sel])
  # The decode's slot accounting rides along in the stats.
  assert float(out.stats["rollout/finished_slot_frac"]) == 0.25
  assert float(out.stats["rollout/slot_utilization"]) == 0.75
