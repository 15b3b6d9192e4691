"""Uncertainty over seeds: Student-t intervals, paired differences, the
value of a learning curve at a budget, and the plateau test.

Pure functions over numbers (numpy and scipy's t quantiles only), used by
`analysis.report` (intervals over a comparison's seeds) and the train loop
(`eval.plateau_window`: stop once held-out pass@1 no longer rises).

Why Student-t over seeds, not a bootstrap: a comparison has 2-8 seeds. With
n seeds a percentile bootstrap of the mean can only return values inside
[min, max] of the n values (with 2 seeds, the interval between the two),
which covers the true mean far less often than its nominal 95 %; the t
interval mean +- t_{n-1} sd / sqrt(n) is exact for normal seed-to-seed
variation and honest about how little 2 or 3 seeds say (t_1 = 12.7, t_2 =
4.30 at 95 %). A paired difference (two arms run with the same seeds from
the same start) is the t interval of the per-seed differences: what the
seeds share (the warm start, the evaluation's problems and draws) cancels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
# scipy is a requirement of jax itself; only its t distribution is used.
from scipy import stats as scipy_stats

CONFIDENCE = 0.95


def t_quantile(confidence: float, dof: int, *, two_sided: bool = True
               ) -> float:
  """The Student-t quantile of a `confidence` interval with `dof` degrees of
  freedom (two-sided: t_{(1 + c) / 2}; one-sided: t_c)."""
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  if dof < 1:
    raise ValueError(f"a t quantile needs dof >= 1, got {dof}")
  q = (1 + confidence) / 2 if two_sided else confidence
  return float(scipy_stats.t.ppf(q, dof))


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean over seeds and its confidence interval.

  Attributes:
    mean: the mean of the values.
    half_width: t_{n-1} * sd / sqrt(n); NaN with fewer than 2 values.
    sd: the sample standard deviation (ddof 1); NaN with fewer than 2.
    n: how many values.
    confidence: the interval's coverage (e.g. 0.95).
  """

  mean: float
  half_width: float
  sd: float
  n: int
  confidence: float = CONFIDENCE

  @property
  def low(self) -> float:
    return self.mean - self.half_width

  @property
  def high(self) -> float:
    return self.mean + self.half_width

  def excludes_zero(self) -> bool:
    """Whether the interval lies entirely on one side of 0."""
    return bool(self.low > 0 or self.high < 0)

  def to_dict(self) -> dict[str, float | int | None]:
    """JSON-ready: NaN (fewer than 2 values) as None."""
    clean = lambda v: None if not math.isfinite(v) else float(v)  # noqa
    return {"mean": clean(self.mean), "low": clean(self.low),
            "high": clean(self.high), "half_width": clean(self.half_width),
            "sd": clean(self.sd), "n": self.n,
            "confidence": self.confidence}

  def text(self, digits: int = 4) -> str:
    """`+0.0123 ± 0.0040`, or `+0.0123 (n=1)` without an interval."""
    if not math.isfinite(self.half_width):
      return f"{self.mean:+.{digits}f} (n={self.n})"
    return f"{self.mean:+.{digits}f} ± {self.half_width:.{digits}f}"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE
               ) -> Interval:
  """The t interval of the mean of `values` (NaN-free, at least one)."""
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or len(x) == 0:
    raise ValueError(f"t_interval needs a non-empty list of numbers, got "
                     f"{values!r}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"t_interval got a non-finite value: {values!r}")
  n = len(x)
  if n < 2:
    return Interval(float(x[0]), math.nan, math.nan, 1, confidence)
  sd = float(x.std(ddof=1))
  half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
  return Interval(float(x.mean()), half, sd, n, confidence)


def paired_differences(a: Mapping[str, float], b: Mapping[str, float]
                       ) -> dict[str, float]:
  """a[s] - b[s] for every seed s both have (finite values only)."""
  return {s: float(a[s]) - float(b[s]) for s in a
          if s in b and a[s] is not None and b[s] is not None
          and math.isfinite(a[s]) and math.isfinite(b[s])}


def paired_interval(a: Mapping[str, float], b: Mapping[str, float],
                    confidence: float = CONFIDENCE) -> Interval:
  """The t interval of the per-seed differences a - b.

  Raises:
    ValueError: the two share no seed with finite values.
  """
  diffs = paired_differences(a, b)
  if not diffs:
    raise ValueError(f"no seed in common between {sorted(a)} and "
                     f"{sorted(b)}: a paired difference needs the same seeds")
  return t_interval(list(diffs.values()), confidence)


def value_at(x: Sequence[float], y: Sequence[float], at: float) -> float:
  """A curve's value at `at` by linear interpolation between its points.

  `x` must be non-decreasing. NaN when `at` lies outside [x[0], x[-1]]: a
  run that never reached a budget has no value there (no extrapolation).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if len(x) == 0 or len(x) != len(y):
    raise ValueError(f"value_at needs equal, non-empty x and y, got "
                     f"{len(x)} and {len(y)} points")
  if np.any(np.diff(x) < 0):
    raise ValueError("value_at needs non-decreasing x")
  if at < x[0] or at > x[-1]:
    return math.nan
  return float(np.interp(at, x, y))


def seeds_for_half_width(sd: float, half_width: float,
                         confidence: float = CONFIDENCE,
                         max_seeds: int = 1000) -> int | None:
  """The fewest seeds n >= 2 whose t interval t_{n-1} sd / sqrt(n) is at
  most `half_width`, for values spread by `sd`; None beyond `max_seeds`."""
  if sd < 0 or half_width <= 0:
    raise ValueError(f"need sd >= 0 and half_width > 0, got {sd}, "
                     f"{half_width}")
  for n in range(2, max_seeds + 1):
    if t_quantile(confidence, n - 1) * sd / math.sqrt(n) <= half_width:
      return n
  return None


@dataclasses.dataclass(frozen=True)
class Slope:
  """A least-squares line through the last points of a curve.

  Attributes:
    slope: fitted rise per unit of x.
    se: its standard error from the residuals (n - 2 degrees of freedom).
    bound: t_{confidence, n-2} (one-sided) * se: the slope is significantly
      positive when it exceeds this.
    n: points in the fit.
  """

  slope: float
  se: float
  bound: float
  n: int

  @property
  def rising(self) -> bool:
    return self.slope > self.bound


def fit_slope(x: Sequence[float], y: Sequence[float],
              confidence: float = CONFIDENCE) -> Slope:
  """Ordinary least squares of y on x with the slope's one-sided test.

  Raises:
    ValueError: fewer than 3 points, or all x equal.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  n = len(x)
  if n < 3 or len(y) != n:
    raise ValueError(f"a slope test needs at least 3 points (x and y of "
                     f"equal length), got {len(x)} and {len(y)}")
  dx = x - x.mean()
  sxx = float(dx @ dx)
  if sxx == 0:
    raise ValueError("a slope test needs at least two distinct x values")
  slope = float(dx @ (y - y.mean())) / sxx
  resid = y - y.mean() - slope * dx
  se = math.sqrt(float(resid @ resid) / (n - 2) / sxx)
  bound = t_quantile(confidence, n - 2, two_sided=False) * se
  return Slope(slope, se, bound, n)


def plateaued(x: Sequence[float], y: Sequence[float], window: int,
              confidence: float = CONFIDENCE) -> bool:
  """Whether a curve stopped rising: over its last `window` points the
  least-squares slope is not significantly positive (one-sided, at
  `confidence`). False while fewer than `window` points exist.

  "Within noise" is read from the points themselves: the residuals about
  the line measure the evaluations' scatter, so a curve that still rises by
  more than its scatter keeps going, and a flat or falling one stops.
  """
  if window < 3:
    raise ValueError(f"the plateau window must be >= 3 evaluations (a "
                     f"slope and its error), got {window}")
  if len(x) < window:
    return False
  return not fit_slope(x[-window:], y[-window:], confidence).rising
