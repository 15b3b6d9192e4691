"""Golden numbers for each reward-shaping option (L = max_new_tokens = 100)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brorl_jax import config as config_lib
from brorl_jax.rl import shaping

L = 100
REWARDS = jnp.array([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]])
LENGTHS = jnp.array([[0, 50, 100], [25, 81, 90]])
STOPPED = jnp.array([[True, True, False], [True, True, True]])


def _shape(cfg, step=None, rewards=REWARDS, lengths=LENGTHS,
           stopped=STOPPED):
  fn = jax.jit(shaping.shape_rewards, static_argnames=("max_new_tokens",
                                                        "cfg"))
  return np.asarray(fn(rewards, lengths, stopped, max_new_tokens=L, cfg=cfg,
                       step=step))


def test_default_is_off_and_identity():
  cfg = shaping.ShapingConfig()
  assert not cfg.enabled
  np.testing.assert_array_equal(_shape(cfg), np.asarray(REWARDS))


def test_truncation_reward_replaces_the_reward_of_unstopped():
  cfg = shaping.ShapingConfig(truncation_reward=-1.0)
  assert cfg.enabled
  np.testing.assert_array_equal(_shape(cfg), [[1, .5, -1], [0, 1, 1]])


def test_truncation_penalty_is_subtracted():
  cfg = shaping.ShapingConfig(truncation_penalty=0.5)
  out = _shape(cfg, rewards=jnp.array([[1.0, 0.5, 1.0], [0.0, 1.0, 1.0]]))
  np.testing.assert_array_equal(out, [[1, .5, .5], [0, 1, 1]])


def test_cosine_length_penalty_golden():
  # length_reward(t) = -1 + 0.5 * (0 - -1) * (1 + cos(pi t / 100)):
  # t=0: 0; t=50: -0.5; t=100: -1; t=25: -1 + 0.5 (1 + 1/sqrt 2);
  # t=81: -1 + 0.5 (1 + cos(0.81 pi)); t=90: -1 + 0.5 (1 + cos(0.9 pi)).
  # cos(0.81 pi) = -0.8270806, cos(0.9 pi) = -0.9510565.
  cfg = shaping.ShapingConfig(cosine_length_coef=0.5)
  expected = np.asarray(REWARDS) + 0.5 * np.array(
      [[0.0, -0.5, -1.0], [-0.1464466, -0.9135403, -0.9755283]])
  np.testing.assert_allclose(_shape(cfg), expected, atol=1e-6)
  # eta in [0.2, 1], T = 200 (not L): t=100 gives 0.2 + 0.4 (1 + 0) = 0.6,
  # and a length beyond T counts as T.
  cfg = shaping.ShapingConfig(cosine_length_coef=1.0, cosine_eta_min=0.2,
                              cosine_eta_max=1.0, cosine_length_limit=200)
  out = _shape(cfg, rewards=jnp.zeros((1, 3)),
               lengths=jnp.array([[0, 100, 300]]),
               stopped=jnp.ones((1, 3), bool))
  np.testing.assert_allclose(out, [[1.0, 0.6, 0.2]], atol=1e-6)


def test_cosine_cycle_on_off():
  # 2 steps on, 3 off: active at steps 0, 1, 5, 6, ...
  cfg = shaping.ShapingConfig(cosine_length_coef=1.0, cosine_cycle_on=2,
                              cosine_cycle_off=3)
  ones = jnp.ones((1, 1))
  active = [_shape(cfg, step=jnp.int32(s), rewards=ones,
                   lengths=jnp.array([[100]]),
                   stopped=jnp.ones((1, 1), bool))[0, 0] == 0.0
            for s in range(7)]
  assert active == [True, True, False, False, False, True, True]
  with pytest.raises(ValueError, match="pass step="):
    shaping.shape_rewards(ones, jnp.ones((1, 1), jnp.int32),
                          jnp.ones((1, 1), bool), L, cfg)


def test_dapo_overlong_golden():
  # L_cache = 20: no penalty up to t = 80, then (80 - t) / 20.
  cfg = shaping.ShapingConfig(overlong_cache=20)
  out = _shape(cfg, rewards=jnp.zeros((1, 6)),
               lengths=jnp.array([[50, 80, 81, 90, 99, 100]]),
               stopped=jnp.ones((1, 6), bool))
  np.testing.assert_allclose(out, [[0, 0, -.05, -.5, -.95, -1]], atol=1e-6)
  cfg = shaping.ShapingConfig(overlong_cache=20, overlong_coef=0.5)
  out = _shape(cfg, rewards=jnp.ones((1, 2)), lengths=jnp.array([[90, 100]]),
               stopped=jnp.ones((1, 2), bool))
  np.testing.assert_allclose(out, [[0.75, 0.5]], atol=1e-6)


def test_options_compose_in_documented_order():
  # Truncated, length 100, reward 1: set to 0, then + 0.5 * (-1) cosine,
  # then -1 overlong = -1.5. Stopped, length 50, reward 1: 1 - 0.25 + 0.
  cfg = shaping.ShapingConfig(truncation_reward=0.0, cosine_length_coef=0.5,
                              overlong_cache=20)
  out = _shape(cfg, rewards=jnp.ones((1, 2)), lengths=jnp.array([[100, 50]]),
               stopped=jnp.array([[False, True]]))
  np.testing.assert_allclose(out, [[-1.5, 0.75]], atol=1e-6)


def test_config_validation_names_the_key():
  with pytest.raises(config_lib.ConfigError,
                     match="algo.shaping.truncation_penalty"):
    shaping.ShapingConfig(truncation_reward=0.0, truncation_penalty=1.0)
  with pytest.raises(config_lib.ConfigError,
                     match="algo.shaping.cosine_eta_min"):
    shaping.ShapingConfig(cosine_eta_min=1.0, cosine_eta_max=0.0)
  with pytest.raises(config_lib.ConfigError,
                     match="algo.shaping.overlong_cache"):
    shaping.ShapingConfig(overlong_cache=-1)
  with pytest.raises(config_lib.ConfigError,
                     match="algo.shaping.overlong_cache"):
    shaping.shape_rewards(REWARDS, LENGTHS, STOPPED, 10,
                          shaping.ShapingConfig(overlong_cache=20))
