"""A comparison's figures with their uncertainty (`compare.json`, its table).

Per run, the held-out pass@1 curve against generated tokens and against
wall-clock seconds (`eval_curve`). Per arm, over its seeds, the t interval
(`intervals.t_interval`, 95 %) of

  * `gain`: pass@1 at the run's end minus at its start (the arms stop at
    one token budget, overshooting it by up to a step);
  * `gain_at_tokens`: pass@1 at the common token budget (the fewest tokens
    any run of the comparison reached) minus the start, read off each curve
    by linear interpolation between evaluations: the paper's axis;
  * `gain_at_seconds`: the same at the common wall-clock budget, where a
    run's clock is the sum of its RL steps' `time/step_s` less their
    `time/diag_s` (sampling, scoring, update; not the evaluations or the
    post-update diagnostics, which are measurement, nor start-up). The
    first step carries the one-off compiles (the update's and the
    sampler's: a minute against seconds per step on 2 cores, and unequal
    between arms of different shapes), so it counts as the run's median
    step. Comparable only between runs timed alike (alone on one machine,
    or under the same load);

and, for every arm after the first, the paired difference to the first arm
(`intervals.paired_interval`: per seed, this arm's gain minus the first
arm's with the same seed and start). `seeds_for_0.01` says how many seeds
the observed spread of a difference needs for a 95 % interval of +-0.01.
Pure functions over metrics records and dicts; `compare.py` does the I/O.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from brorl_jax.analysis import intervals

PASS1 = "eval/pass@1"
TOKENS = "rollout/generated_tokens_total"
STEP_TIME = "time/step_s"
DIAG_TIME = "time/diag_s"
# compare.json name of a gain -> the curve axis it is read on (None: at the
# run's end).
GAINS = {"gain": None, "gain_at_tokens": "tokens",
         "gain_at_seconds": "seconds"}
TARGET_HALF_WIDTH = 0.01


def eval_curve(records: Sequence[Mapping[str, Any]]) -> dict[str, list]:
  """A run's held-out pass@1 with the tokens and seconds spent before each.

  Returns:
    {"step", "tokens", "seconds", "pass1"}: one entry per evaluation, in
    step order. `tokens` is the cumulative generated-token count logged at
    the evaluation's step (0 before the first RL step); `seconds` the sum of
    `time/step_s - time/diag_s` over the steps up to it, the first step
    (its compiles) counted as the median of the others.

  Raises:
    ValueError: the run logged no held-out pass@1.
  """
  rows = sorted(records, key=lambda r: r["step"])
  step_time = {r["step"]: r[STEP_TIME] - (r.get(DIAG_TIME) or 0.0)
               for r in rows if r.get(STEP_TIME) is not None}
  if len(step_time) > 1:       # the compiling first step: a typical one
    first = min(step_time)
    step_time[first] = float(np.median(
        [t for s, t in step_time.items() if s != first]))
  steps, tokens, seconds, pass1 = [], [], [], []
  total_tokens, clock = 0, 0.0
  for r in rows:
    if r.get(TOKENS) is not None:
      total_tokens = r[TOKENS]
    if r.get(STEP_TIME) is not None:
      clock += step_time[r["step"]]
    if r.get(PASS1) is not None:
      if steps and steps[-1] == r["step"]:     # one evaluation per step
        steps.pop(), tokens.pop(), seconds.pop(), pass1.pop()
      steps.append(r["step"])
      tokens.append(total_tokens)
      seconds.append(clock)
      pass1.append(r[PASS1])
  if not pass1:
    raise ValueError("the run logged no held-out pass@1 (eval/pass@1)")
  return {"step": steps, "tokens": tokens, "seconds": seconds,
          "pass1": pass1}


def budgets(runs: Mapping[str, Mapping[str, Mapping[str, Any]]]
            ) -> dict[str, float]:
  """The common budgets: the fewest tokens and seconds any run reached at
  its last evaluation."""
  curves = [run["curve"] for seeds in runs.values() for run in seeds.values()]
  if not curves:
    raise ValueError("no runs to compare")
  return {"tokens": float(min(c["tokens"][-1] for c in curves)),
          "seconds": float(min(c["seconds"][-1] for c in curves))}


def run_gains(curve: Mapping[str, list], budget: Mapping[str, float]
              ) -> dict[str, float]:
  """One run's `gain`, `gain_at_tokens` and `gain_at_seconds` (NaN when the
  run's curve does not reach the budget)."""
  start = curve["pass1"][0]
  out = {}
  for name, axis in GAINS.items():
    if axis is None:
      out[name] = curve["pass1"][-1] - start
    else:
      out[name] = intervals.value_at(curve[axis], curve["pass1"],
                                     budget[axis]) - start
  return out


def _finite(values: Mapping[str, float]) -> dict[str, float]:
  return {k: v for k, v in values.items() if v is not None
          and math.isfinite(v)}


def summarize_arms(runs: Mapping[str, Mapping[str, Mapping[str, Any]]],
                   confidence: float = intervals.CONFIDENCE
                   ) -> dict[str, Any]:
  """Intervals over seeds and paired differences to the first arm.

  Args:
    runs: {arm: {seed: run}}, arms in order (the first is the reference);
      each run has `curve` (`eval_curve`).
    confidence: the intervals' coverage.

  Returns:
    {"confidence", "interval", "budget", "gains" ({arm: {seed: {gain...}}}),
    "arms" ({arm: {gain / gain_at_tokens / gain_at_seconds / pass1_start /
    pass1_end: interval dict}}), "differences" ({arm: {"vs": first arm,
    name: interval dict, "seeds_for_0.01": {name: n, or None when the
    difference has no spread yet (one seed) or needs more than 1000}}})}.
  """
  budget = budgets(runs)
  gains = {arm: {seed: run_gains(run["curve"], budget)
                 for seed, run in seeds.items()}
           for arm, seeds in runs.items()}
  arms: dict[str, Any] = {}
  for arm, seeds in runs.items():
    arms[arm] = {
        "pass1_start": intervals.t_interval(
            [r["curve"]["pass1"][0] for r in seeds.values()],
            confidence).to_dict(),
        "pass1_end": intervals.t_interval(
            [r["curve"]["pass1"][-1] for r in seeds.values()],
            confidence).to_dict()}
    for name in GAINS:
      values = _finite({s: g[name] for s, g in gains[arm].items()})
      arms[arm][name] = (intervals.t_interval(list(values.values()),
                                              confidence).to_dict()
                         if values else None)
  names = list(runs)
  differences: dict[str, Any] = {}
  for arm in names[1:]:
    diff: dict[str, Any] = {"vs": names[0], "seeds_for_0.01": {}}
    for name in GAINS:
      a = _finite({s: g[name] for s, g in gains[arm].items()})
      b = _finite({s: g[name] for s, g in gains[names[0]].items()})
      if not intervals.paired_differences(a, b):
        diff[name] = None
        continue
      iv = intervals.paired_interval(a, b, confidence)
      diff[name] = iv.to_dict()
      diff["seeds_for_0.01"][name] = (
          intervals.seeds_for_half_width(iv.sd, TARGET_HALF_WIDTH,
                                         confidence)
          if math.isfinite(iv.sd) else None)
    differences[arm] = diff
  clean = {arm: {seed: {k: (v if math.isfinite(v) else None)
                        for k, v in g.items()} for seed, g in seeds.items()}
           for arm, seeds in gains.items()}       # JSON has no NaN
  return {"confidence": confidence,
          "interval": "Student t over seeds (mean +- t_{n-1} sd / sqrt(n))",
          "budget": budget, "gains": clean, "arms": arms,
          "differences": differences}


def tokens_text(tokens: float) -> str:
  """A token budget for a label: `600k`, `1.2M`, or `200` below 10k."""
  if tokens >= 1e6:
    return f"{tokens / 1e6:.3g}M"
  if tokens >= 1e4:
    return f"{tokens / 1e3:.0f}k"
  return f"{tokens:.0f}"


def _iv_text(iv: Mapping[str, Any] | None, digits: int = 4) -> str:
  if iv is None:
    return "n/a"
  if iv["half_width"] is None:
    return f"{iv['mean']:+.{digits}f} (n={iv['n']})"
  return f"{iv['mean']:+.{digits}f} ± {iv['half_width']:.{digits}f}"


def table(runs: Mapping[str, Mapping[str, Mapping[str, Any]]],
          summary: Mapping[str, Any]) -> str:
  """Markdown: per arm, means over seeds and the gains' 95 % intervals, and
  each later arm's paired difference to the first."""
  budget = summary["budget"]
  pct = round(100 * summary["confidence"])
  lines = [
      f"| arm | seeds | steps | pass@1 start | end | gain ({pct} % CI) | "
      f"gain − first arm | at {tokens_text(budget['tokens'])} tokens | "
      f"− first arm | at {budget['seconds']:.0f} s | − first arm | "
      "mixed_group_share | mass_u2 | frac_margin_positive |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
      "| --- | --- | --- |"]
  for arm, seeds in runs.items():
    values = list(seeds.values())
    mean = lambda k: (np.mean([r[k] for r in values if r.get(k) is not None])  # noqa: E731
                      if any(r.get(k) is not None for r in values)
                      else math.nan)
    a, d = summary["arms"][arm], summary["differences"].get(arm)
    diff = lambda name: "—" if d is None else _iv_text(d[name])  # noqa: E731
    lines.append(
        f"| {arm} | {len(values)} | {mean('steps'):.1f} | "
        f"{a['pass1_start']['mean']:.4f} | {a['pass1_end']['mean']:.4f} | "
        f"{_iv_text(a['gain'])} | {diff('gain')} | "
        f"{_iv_text(a['gain_at_tokens'])} | {diff('gain_at_tokens')} | "
        f"{_iv_text(a['gain_at_seconds'])} | {diff('gain_at_seconds')} | "
        f"{mean('mixed_group_share'):.3f} | {mean('mass_u2'):.5f} | "
        f"{mean('frac_margin_positive'):.3f} |")
  for arm, d in summary["differences"].items():
    # Only differences with a spread (2+ seeds): None there is > 1000.
    need = {name: n for name, n in d["seeds_for_0.01"].items()
            if d[name] is not None and d[name]["sd"] is not None}
    if need:
      lines.append(
          f"\n{arm} − {d['vs']}: seeds for a {pct} % interval of ±0.01 "
          "at this spread: " + ", ".join(
              f"{name} {n if n is not None else '>1000'}"
              for name, n in need.items()))
  return "\n".join(lines)
