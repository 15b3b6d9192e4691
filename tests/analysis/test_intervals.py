"""analysis/intervals.py against values computed by hand (t quantiles from
tables)."""

import math

import pytest

from brorl_jax.analysis import intervals


def test_t_quantiles_match_the_table():
  # Two-sided 95 %: t_{0.975, dof}; one-sided 95 %: t_{0.95, dof}.
  assert intervals.t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
  assert intervals.t_quantile(0.95, 2) == pytest.approx(4.3027, abs=1e-4)
  assert intervals.t_quantile(0.95, 9) == pytest.approx(2.2622, abs=1e-4)
  assert intervals.t_quantile(0.95, 2, two_sided=False) == pytest.approx(
      2.9200, abs=1e-4)
  with pytest.raises(ValueError, match="dof >= 1"):
    intervals.t_quantile(0.95, 0)
  with pytest.raises(ValueError, match="confidence"):
    intervals.t_quantile(1.5, 3)


def test_t_interval_by_hand():
  # [1, 2, 3]: mean 2, sd 1, half width 4.3027 / sqrt(3) = 2.4841.
  iv = intervals.t_interval([1.0, 2.0, 3.0])
  assert (iv.mean, iv.sd, iv.n) == (2.0, 1.0, 3)
  assert iv.half_width == pytest.approx(2.48414, abs=1e-5)
  assert (iv.low, iv.high) == pytest.approx((2 - 2.48414, 2 + 2.48414),
                                            abs=1e-5)
  assert not iv.excludes_zero()
  # Two seeds: sd = 0.02 / sqrt(2), half width 12.7062 * sd / sqrt(2).
  iv = intervals.t_interval([0.01, 0.03])
  assert iv.mean == pytest.approx(0.02)
  assert iv.half_width == pytest.approx(0.127062, abs=1e-6)
  assert iv.text() == "+0.0200 ± 0.1271"
  # One seed: a mean without an interval, JSON nulls.
  one = intervals.t_interval([0.05])
  assert math.isnan(one.half_width) and one.text() == "+0.0500 (n=1)"
  assert one.to_dict()["low"] is None and one.to_dict()["n"] == 1
  with pytest.raises(ValueError, match="non-empty"):
    intervals.t_interval([])
  with pytest.raises(ValueError, match="non-finite"):
    intervals.t_interval([0.1, float("nan")])


def test_paired_interval_uses_the_common_seeds():
  a = {"0": 0.05, "1": 0.07, "2": 0.06, "3": 0.5}
  b = {"0": 0.02, "1": 0.05, "2": 0.05}
  assert intervals.paired_differences(a, b) == pytest.approx(
      {"0": 0.03, "1": 0.02, "2": 0.01})
  iv = intervals.paired_interval(a, b)
  # Differences 0.03, 0.02, 0.01: mean 0.02, sd 0.01.
  assert iv.n == 3 and iv.mean == pytest.approx(0.02)
  assert iv.sd == pytest.approx(0.01)
  assert iv.half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3),
                                        rel=1e-5)
  assert not iv.excludes_zero()        # 0.02 +- 0.0248 holds 0
  # Differences 0.03, 0.02, 0.025: mean 0.025 +- 4.3027 * 0.005 / sqrt(3).
  iv = intervals.paired_interval(a, {**b, "2": 0.035})
  assert iv.half_width == pytest.approx(0.012421, abs=1e-6)
  assert iv.excludes_zero()
  with pytest.raises(ValueError, match="no seed in common"):
    intervals.paired_interval({"0": 1.0}, {"1": 1.0})


def test_value_at_interpolates_inside_and_refuses_outside():
  x, y = [0, 100, 300], [0.1, 0.2, 0.4]
  assert intervals.value_at(x, y, 50) == pytest.approx(0.15)
  assert intervals.value_at(x, y, 200) == pytest.approx(0.3)
  assert intervals.value_at(x, y, 300) == pytest.approx(0.4)
  assert math.isnan(intervals.value_at(x, y, 301))
  with pytest.raises(ValueError, match="non-decreasing"):
    intervals.value_at([0, 2, 1], y, 1)


def test_seeds_for_half_width_by_hand():
  # sd 0.01, target 0.01: n = 6 gives 2.5706 * 0.01 / sqrt(6) = 0.01049,
  # n = 7 gives 2.4469 * 0.01 / sqrt(7) = 0.00925.
  assert intervals.seeds_for_half_width(0.01, 0.01) == 7
  assert intervals.seeds_for_half_width(0.0, 0.01) == 2
  assert intervals.seeds_for_half_width(1.0, 1e-4, max_seeds=50) is None


def test_slope_test_by_hand():
  # y = [0, 1, 1, 2] on x = 0..3: slope 3/5 = 0.6, residuals (-0.1, 0.3,
  # -0.3, 0.1), se = sqrt(0.2 / 2 / 5), bound = 2.9200 * se = 0.4129.
  fit = intervals.fit_slope([0, 1, 2, 3], [0, 1, 1, 2])
  assert fit.slope == pytest.approx(0.6)
  assert fit.se == pytest.approx(math.sqrt(0.02))
  assert fit.bound == pytest.approx(0.41295, abs=1e-5)
  assert fit.rising
  assert not intervals.plateaued([0, 1, 2, 3], [0, 1, 1, 2], window=4)
  # Flat within its scatter (slope -0.002): stopped rising.
  flat = [0.30, 0.31, 0.29, 0.30]
  assert intervals.plateaued([0, 20, 40, 60], flat, window=4)
  # Rising early, flat over the last window: the window decides.
  x = [0, 20, 40, 60, 80, 100, 120]
  y = [0.10, 0.20, 0.30, 0.30, 0.31, 0.29, 0.30]
  assert not intervals.plateaued(x[:4], y[:4], window=4)
  assert intervals.plateaued(x, y, window=4)
  assert not intervals.plateaued(x[:3], y[:3], window=4)  # too few yet
  with pytest.raises(ValueError, match=">= 3"):
    intervals.plateaued(x, y, window=2)
  with pytest.raises(ValueError, match="distinct x"):
    intervals.fit_slope([1, 1, 1], [0, 1, 2])
