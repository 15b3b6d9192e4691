"""Golden numbers for the advantage estimators and dynamic sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brorl_jax import config as config_lib
from brorl_jax.rl import advantages as adv_lib

NAN = float("nan")
# Group 0 mixed, group 1 all correct, group 2 has 3 valid rollouts (the NaN
# slot does not exist and must not leak into any statistic).
REWARDS = np.array([[1.0, 0.0, 0.0, 1.0],
                    [1.0, 1.0, 1.0, 1.0],
                    [0.5, 0.0, 1.0, NAN]], np.float32)
VALID = np.array([[1, 1, 1, 1],
                  [1, 1, 1, 1],
                  [1, 1, 1, 0]], bool)
ALL_PROMPTS = np.ones(3, bool)
S3 = math.sqrt(3.0)


def _compute(estimator, dynamic_sampling, prompt_mask=ALL_PROMPTS,
             shaped=None):
  cfg = adv_lib.AdvantageConfig(estimator=estimator,
                                dynamic_sampling=dynamic_sampling)
  fn = jax.jit(adv_lib.compute_advantages,
               static_argnames=("cfg", "correct_threshold"))
  adv, group_mask = fn(jnp.asarray(REWARDS), jnp.asarray(VALID),
                       jnp.asarray(prompt_mask), cfg=cfg,
                       correct_threshold=0.5, shaped_rewards=shaped)
  return np.asarray(adv), np.asarray(group_mask)


# Without dynamic sampling. Group means: 0.5, 1, 0.5 (over 3 valid).
# grpo: group 0 sample std = sqrt(4 * 0.25 / 3) = 1/sqrt(3), so
#   A = +-0.5 * sqrt(3); group 2 deviations (0, -.5, .5), std 0.5.
# rloo: n/(n-1) (r - mean): group 0 4/3 * 0.5, group 2 3/2 * 0.5.
# reinforce_pp_baseline: centered values over 11 valid rollouts are
#   (.5,-.5,-.5,.5, 0,0,0,0, 0,-.5,.5): mean 0, sample var 1.5/10 = 0.15.
R = 0.5 / math.sqrt(0.15)
GOLDEN_ALL = {
    "grpo": [[S3 / 2, -S3 / 2, -S3 / 2, S3 / 2], [0, 0, 0, 0], [0, -1, 1, 0]],
    "drgrpo": [[.5, -.5, -.5, .5], [0, 0, 0, 0], [0, -.5, .5, 0]],
    "rloo": [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0, 0, 0, 0], [0, -.75, .75, 0]],
    "reinforce_pp_baseline": [[R, -R, -R, R], [0, 0, 0, 0], [0, -R, R, 0]],
}


@pytest.mark.parametrize("estimator", sorted(GOLDEN_ALL))
def test_estimators_golden_without_dynamic_sampling(estimator):
  adv, group_mask = _compute(estimator, dynamic_sampling=False)
  np.testing.assert_allclose(adv, GOLDEN_ALL[estimator], atol=1e-5)
  assert group_mask.tolist() == [True, True, True]


def test_reinforce_pp_baseline_excludes_dropped_groups_from_batch_stats():
  # Group 1 (all correct) is dropped: 7 rollouts remain, centered values
  # (.5,-.5,-.5,.5, 0,-.5,.5), mean 0, sample var 1.5/6 = 0.25, std 0.5.
  adv, group_mask = _compute("reinforce_pp_baseline", dynamic_sampling=True)
  np.testing.assert_allclose(
      adv, [[1, -1, -1, 1], [0, 0, 0, 0], [0, -1, 1, 0]], atol=1e-5)
  assert group_mask.tolist() == [True, False, True]


def test_grpo_with_dynamic_sampling_zeroes_dropped_group_only():
  adv, _ = _compute("grpo", dynamic_sampling=True)
  np.testing.assert_allclose(adv, GOLDEN_ALL["grpo"], atol=1e-5)


def test_padded_prompt_gets_zero_and_is_out_of_the_batch():
  # Prompt 0 is padding: reinforce++ stats over groups 1, 2 only: centered
  # (0,0,0,0, 0,-.5,.5), mean 0, sample var 0.5/6, so A = .5/sqrt(1/12).
  adv, group_mask = _compute("reinforce_pp_baseline", dynamic_sampling=False,
                             prompt_mask=np.array([False, True, True]))
  a = 0.5 / math.sqrt(0.5 / 6)
  np.testing.assert_allclose(
      adv, [[0, 0, 0, 0], [0, 0, 0, 0], [0, -a, a, 0]], atol=1e-5)
  assert group_mask.tolist() == [False, True, True]


def test_shaped_rewards_drive_advantages_but_not_correctness():
  # Shaping lowers group 1's rewards below the threshold; the group is
  # still all-correct by its verifier rewards and stays dropped.
  shaped = np.array([[0.8, 0.0, 0.0, 0.6],
                     [0.4, 0.3, 0.4, 0.3],
                     [0.5, 0.0, 1.0, 0.0]], np.float32)
  adv, group_mask = _compute("drgrpo", dynamic_sampling=True,
                             shaped=jnp.asarray(shaped))
  assert group_mask.tolist() == [True, False, True]
  np.testing.assert_allclose(
      adv, [[.45, -.35, -.35, .25], [0, 0, 0, 0], [0, -.5, .5, 0]],
      atol=1e-6)


def test_dynamic_sampling_drops_exactly_all_correct_and_all_wrong():
  rewards = np.array([
      [0.5, 0.49, 0.49, 0.49],  # 0.5 is correct (>=): mixed, keep
      [0.49, 0.2, 0.0, 0.3],    # all wrong, fractional: drop
      [0.5, 0.7, 1.0, 0.5],     # all correct, fractional: drop
      [1.0, 0.0, 1.0, 0.0],     # one valid rollout only: drop
      [0.6, 0.4, 0.0, 0.0],     # two valid, one each: keep
      [1.0, 0.0, 1.0, 0.0],     # no valid rollout (padding): drop
      [1.0, 1.0, 0.0, 0.0],     # the wrong ones do not exist: drop
  ], np.float32)
  valid = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0],
                    [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], bool)
  keep = jax.jit(adv_lib.dynamic_sampling_mask, static_argnums=2)(
      rewards, valid, 0.5)
  assert np.asarray(keep).tolist() == [True, False, False, False, True,
                                       False, False]
  # Another threshold moves the decision, from the same one definition.
  keep = adv_lib.dynamic_sampling_mask(
      jnp.array([[0.5, 1.0, 0.99, 0.0], [0.99, 0.5, 0.0, 0.0]]),
      jnp.ones((2, 4), bool), 1.0)
  assert np.asarray(keep).tolist() == [True, False]
  correct, n = adv_lib.group_counts(jnp.asarray(rewards), jnp.asarray(valid),
                                    0.5)
  assert np.asarray(correct).tolist() == [1, 0, 4, 1, 1, 0, 2]
  assert np.asarray(n).tolist() == [4, 4, 4, 1, 2, 0, 2]


def test_select_groups_takes_first_kept_then_pads_masked():
  keep = jnp.array([False, True, False, True, True, False])
  select = jax.jit(adv_lib.select_groups, static_argnums=1)
  idx, valid = select(keep, 2)
  assert np.asarray(idx).tolist() == [1, 3]
  assert np.asarray(valid).tolist() == [True, True]
  idx, valid = select(keep, 5)
  assert np.asarray(idx).tolist() == [1, 3, 4, 0, 2]
  assert np.asarray(valid).tolist() == [True, True, True, False, False]
  idx, valid = select(jnp.zeros(4, bool), 2)
  assert np.asarray(idx).tolist() == [0, 1]
  assert not np.asarray(valid).any()
  with pytest.raises(ValueError, match="sample more prompts"):
    adv_lib.select_groups(keep, 7)


def test_config_validation_names_the_key():
  with pytest.raises(config_lib.ConfigError, match="algo.advantage.estimator"):
    adv_lib.AdvantageConfig(estimator="ppo")
  with pytest.raises(config_lib.ConfigError,
                     match="algo.advantage.oversample_factor"):
    adv_lib.AdvantageConfig(oversample_factor=0.5)
  with pytest.raises(config_lib.ConfigError,
                     match="algo.advantage.oversample_factor"):
    adv_lib.AdvantageConfig(dynamic_sampling=False, oversample_factor=1.5)
  with pytest.raises(config_lib.ConfigError, match="algo.advantage.eps"):
    adv_lib.AdvantageConfig(eps=0.0)
  with pytest.raises(config_lib.ConfigError, match="algo.advantage.bogus"):
    config_lib.from_mapping(adv_lib.AdvantageConfig, {"bogus": 1},
                            "algo.advantage")
  cfg = config_lib.from_mapping(adv_lib.AdvantageConfig,
                                {"oversample_factor": 1.5}, "algo.advantage")
  assert cfg.prompts_to_sample(128) == 192
  assert cfg.prompts_to_sample(5) == 8  # ceil(7.5)
