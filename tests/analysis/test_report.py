"""analysis/report.py against figures computed by hand."""

import math

import pytest

from brorl_jax.analysis import report as compare_report


def test_eval_curve_reads_tokens_and_step_seconds():
  records = [
      {"step": 0, "eval/pass@1": 0.1},
      # The first step compiles: it counts as the median of the others.
      {"step": 1, "rollout/generated_tokens_total": 100, "time/step_s": 60.0},
      # Evaluations and diagnostics are measurement, not the run's clock.
      {"step": 2, "rollout/generated_tokens_total": 220, "time/step_s": 3.0,
       "time/diag_s": 0.5, "eval/pass@1": 0.2, "time/eval_s": 30.0},
      {"step": 3, "rollout/generated_tokens_total": 300, "time/step_s": 1.5},
      {"step": 4, "rollout/generated_tokens_total": 390, "time/step_s": 1.0,
       "eval/pass@1": 0.25},
  ]
  # Clock: step 1 = median(2.5, 1.5, 1.0) = 1.5, then 2.5, 1.5, 1.0.
  assert compare_report.eval_curve(records) == {
      "step": [0, 2, 4], "tokens": [0, 220, 390],
      "seconds": [0.0, 4.0, 6.5], "pass1": [0.1, 0.2, 0.25]}
  # A run of one step keeps that step's time.
  assert compare_report.eval_curve(records[:2] + [
      {"step": 1, "eval/pass@1": 0.3}])["seconds"] == [0.0, 60.0]
  with pytest.raises(ValueError, match="no held-out pass@1"):
    compare_report.eval_curve(records[1:2])


def _run(tokens, seconds, pass1, **extra):
  return {"curve": {"step": list(range(len(tokens))), "tokens": tokens,
                    "seconds": seconds, "pass1": pass1}, "steps": 2, **extra}


RUNS = {
    "A": {"0": _run([0, 100, 200], [0, 10, 20], [0.10, 0.20, 0.30]),
          "1": _run([0, 100, 210], [0, 12, 24], [0.12, 0.18, 0.26])},
    "B": {"0": _run([0, 110, 220], [0, 5, 10], [0.10, 0.12, 0.16]),
          "1": _run([0, 100, 200], [0, 6, 12], [0.12, 0.13, 0.18])},
}


def test_gains_at_equal_tokens_and_time_by_hand():
  out = compare_report.summarize_arms(RUNS)
  # The fewest tokens (200) and seconds (10) any run reached.
  assert out["budget"] == {"tokens": 200.0, "seconds": 10.0}
  g = out["gains"]
  # A1 at 200 tokens: 0.18 + 0.08 * 100 / 110, minus its start 0.12.
  assert g["A"]["1"]["gain_at_tokens"] == pytest.approx(0.132727, abs=1e-6)
  # B0 at 200 tokens: 0.12 + 0.04 * 90 / 110 - 0.10.
  assert g["B"]["0"]["gain_at_tokens"] == pytest.approx(0.052727, abs=1e-6)
  # B1 at 10 s: 0.13 + 0.05 * 4 / 6 - 0.12.
  assert g["B"]["1"]["gain_at_seconds"] == pytest.approx(0.043333, abs=1e-6)
  assert g["A"]["0"]["gain"] == pytest.approx(0.20)
  # Arm A's gain: 0.20, 0.14 -> mean 0.17, sd 0.06 / sqrt(2), half width
  # t_1 (12.7062) * sd / sqrt(2) = 0.381186.
  a = out["arms"]["A"]["gain"]
  assert a["mean"] == pytest.approx(0.17) and a["n"] == 2
  assert a["half_width"] == pytest.approx(0.381186, abs=1e-5)
  assert out["arms"]["B"]["pass1_start"]["mean"] == pytest.approx(0.11)
  # Paired differences B - A: gains (-0.14, -0.08), at tokens (-0.147273,
  # -0.072727), at seconds (-0.04, -0.006667).
  d = out["differences"]["B"]
  assert d["vs"] == "A" and "A" not in out["differences"]
  assert d["gain"]["mean"] == pytest.approx(-0.11)
  assert d["gain"]["sd"] == pytest.approx(0.06 / math.sqrt(2))
  assert d["gain_at_tokens"]["mean"] == pytest.approx(-0.11)
  assert d["gain_at_tokens"]["sd"] == pytest.approx(0.074545 / math.sqrt(2),
                                                    abs=1e-6)
  assert d["gain_at_seconds"]["mean"] == pytest.approx(-0.023333, abs=1e-6)
  # sd 0.0424 needs n = 72 seeds for +-0.01: t_71 = 1.9939 gives
  # 1.9939 * 0.0424264 / sqrt(72) = 0.00997, n = 71 gives 0.01004.
  assert d["seeds_for_0.01"]["gain"] == 72
  table = compare_report.table(
      {arm: {s: {**r, "mixed_group_share": 0.5, "mass_u2": 1e-3,
                 "frac_margin_positive": 0.2} for s, r in seeds.items()}
       for arm, seeds in RUNS.items()}, out)
  assert "| A | 2 | 2.0 | 0.1100 | 0.2800 | +0.1700 ± 0.3812 | — |" in table
  assert "| B | 2 |" in table and "-0.1100 ± 0.3812" in table
  assert "| at 200 tokens |" in table        # the budget
  assert [compare_report.tokens_text(t) for t in (200, 9_999, 600_400,
                                                  1_234_567)] == [
      "200", "9999", "600k", "1.23M"]
  assert "B − A: seeds for a 95 % interval of ±0.01 at this spread: gain 72" \
      in table


def test_a_run_short_of_the_budget_has_no_value_there():
  runs = {"A": {"0": _run([0, 100], [0, 5], [0.1, 0.2])},
          "B": {"0": _run([0, 50], [0, 50], [0.1, 0.1])}}
  out = compare_report.summarize_arms(runs)
  assert out["budget"] == {"tokens": 50.0, "seconds": 5.0}
  assert out["gains"]["B"]["0"]["gain_at_seconds"] == pytest.approx(0.0)
  # One seed per arm: means without intervals (JSON nulls).
  assert out["arms"]["A"]["gain"]["half_width"] is None
  assert out["differences"]["B"]["gain"]["mean"] == pytest.approx(-0.1)
  assert out["differences"]["B"]["seeds_for_0.01"]["gain"] is None
  # ... and the table claims no seed count it cannot know.
  table = compare_report.table(runs, out)
  assert "+0.1000 (n=1)" in table and "seeds for" not in table
