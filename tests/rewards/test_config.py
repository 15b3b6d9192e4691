"""RewardsConfig: nested sections, dotted-key errors, the correct threshold."""

import ml_collections
import numpy as np
import pytest

from brorl_jax.config import ConfigError
from brorl_jax.rewards.config import RewardsConfig, is_correct


def test_defaults():
  config = RewardsConfig()
  assert config.correct_threshold == 0.5
  assert config.code.time_budget_s == 5.0
  assert config.default_score == 0.0
  assert not config.code.allow_unsandboxed
  assert config.format.require == ()


def test_from_config_dict_builds_nested_sections():
  section = ml_collections.ConfigDict({
      "correct_threshold": 0.75, "timeout_s": 20.0,
      "math": {"answer_pattern": r"####\s*(.+)"},
      "code": {"allow_unsandboxed": True, "time_budget_s": 3.0},
      "format": {"require": ["answer_tag"], "after_think": True},
      "worker_cpus": [1]})
  config = RewardsConfig.from_mapping(section)
  assert config.correct_threshold == 0.75
  assert config.math.answer_pattern == r"####\s*(.+)"
  assert config.code.allow_unsandboxed and config.code.time_budget_s == 3.0
  assert config.format.require == ("answer_tag",)  # list -> tuple
  assert config.format.after_think
  assert config.worker_cpus == (1,)
  hash(config)  # frozen all the way down: usable as a cache key


@pytest.mark.parametrize("section, key", [
    ({"nope": 1}, "rewards.nope"),
    ({"math": {"answer_patern": "x"}}, "rewards.math.answer_patern"),
    ({"code": {"sandbox": "docker"}}, "rewards.code.sandbox"),
    ({"math": {"answer_pattern": "(unclosed"}}, "rewards.math.answer_pattern"),
    ({"format": {"require": ["box"]}}, "rewards.format.require"),
    ({"timeout_s": 4.0, "code": {"time_budget_s": 5.0}},
     "rewards.code.time_budget_s"),
    ({"timeout_s": 1.0, "code": {"time_budget_s": 0.75}},
     "rewards.code.time_budget_s"),
    ({"num_workers": -1}, "rewards.num_workers"),
    ({"worker_cpus": [-1]}, "rewards.worker_cpus"),
    ({"code": 3}, "rewards.code"),
])
def test_errors_name_the_dotted_key(section, key):
  with pytest.raises(ConfigError, match=f"'{key}'"):
    RewardsConfig.from_mapping(section)


@pytest.mark.parametrize("timeout_s, budget_s", [
    (0.5, 0.25), (2.0, 1.0), (5.0, 4.0), (6.0, 5.0), (30.0, 5.0)])
def test_code_budget_is_derived_from_the_timeout(timeout_s, budget_s):
  config = RewardsConfig.from_mapping({"timeout_s": timeout_s})
  assert config.code.time_budget_s == budget_s
  # An explicit budget is kept, not re-derived.
  explicit = RewardsConfig.from_mapping(
      {"timeout_s": 30.0, "code": {"time_budget_s": 2.5}})
  assert explicit.code.time_budget_s == 2.5


def test_is_correct_uses_threshold_inclusively():
  rewards = np.array([[0.0, 0.5, 1.0], [0.49, 0.51, 0.25]])  # [P, G]
  np.testing.assert_array_equal(
      is_correct(rewards, 0.5), [[False, True, True], [False, True, False]])
  assert is_correct(1.0, 1.0)
