"""Tests for brorl_jax.step_log: the train loop's per-step log rows."""

import jax.numpy as jnp
import pytest

from brorl_jax.loop import step_log


def test_task_rewards_count_only_the_rollouts_that_exist():
  """Adaptive allocation's unused rows (reward 0) stay out of the means."""
  rec = [type("R", (), {"task": t})() for t in ("math", "gsm", "math")]
  rewards = jnp.asarray([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
  valid = jnp.asarray([[True, True, False], [True, True, True],
                       [True, False, False]])
  assert step_log.task_rewards(rec, rewards, None) == {
      "reward/math/mean": pytest.approx(1.5 / 6),
      "reward/gsm/mean": pytest.approx(2 / 3)}
  assert step_log.task_rewards(rec, rewards, None, valid) == {
      "reward/math/mean": pytest.approx(1.5 / 3),
      "reward/gsm/mean": pytest.approx(2 / 3)}
  assert step_log.task_rewards(rec[:1], rewards[:1], None) == {}
