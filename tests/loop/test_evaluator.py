"""The evaluator's arithmetic: pass@k against closed forms, the result's
flat metrics and report."""

import json
import math

import numpy as np
import pytest

from brorl_jax.loop import evaluator as evaluator_lib


# ---- pass@k ----------------------------------------------------------------


def _closed_form(n, c, k):
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n,c,k,want", [
    (4, 0, 4, 0.0),            # n = k, nothing correct
    (4, 1, 4, 1.0),            # n = k: any correct sample is drawn
    (5, 0, 1, 0.0),
    (5, 5, 3, 1.0),            # c = n
    (5, 2, 1, 0.4),            # pass@1 = c / n
    (5, 2, 2, 0.7),            # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 4, 5 / 6),         # 1 - C(7,4)/C(10,4) = 1 - 35/210
    (16, 1, 4, 0.25),          # one correct of 16: k / n
    (6, 4, 3, 1.0),            # n - c = 2 < k
])
def test_pass_at_k_hand_cases(n, c, k, want):
  assert evaluator_lib.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
  assert evaluator_lib.pass_at_k_array(n, [c], k)[0] == pytest.approx(want,
                                                                 abs=1e-12)


def test_pass_at_k_array_matches_binomials():
  for n in (1, 2, 7, 16, 64):
    c = np.arange(n + 1)
    for k in sorted({1, min(2, n), n // 2 or 1, n}):
      want = [_closed_form(n, int(ci), k) for ci in c]
      np.testing.assert_allclose(evaluator_lib.pass_at_k_array(n, c, k), want,
                                 rtol=1e-10, atol=1e-12)
  # Mixed n per prompt broadcast with c.
  got = evaluator_lib.pass_at_k_array([4, 8, 8], [1, 0, 3], 2)
  np.testing.assert_allclose(got, [_closed_form(4, 1, 2), 0.0,
                                   _closed_form(8, 3, 2)])
  for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 5), (4, 2, 0)]:
    with pytest.raises(ValueError, match="pass@k"):
      evaluator_lib.pass_at_k(*bad)
    with pytest.raises(ValueError, match="pass@k"):
      evaluator_lib.pass_at_k_array(*bad)


def test_eval_result_metrics_and_report():
  result = evaluator_lib.EvalResult(
      n=4, ks=(1, 2), step=5, greedy=False, correct=np.array([0, 2, 4]),
      tasks=["a", "a", "b"], reward_sum=6.0, length_sum=120.0, truncated=3.0,
      seconds=1.0)
  flat = result.flat()
  assert flat["eval/pass@1"] == pytest.approx(0.5)          # (0 + .5 + 1)/3
  assert flat["eval/pass@2"] == pytest.approx((0 + 5 / 6 + 1) / 3)
  assert flat["eval/a/pass@1"] == pytest.approx(0.25)
  assert flat["eval/a/pass@2"] == pytest.approx(5 / 12)
  assert flat["eval/b/pass@2"] == 1.0
  assert flat["eval/num_prompts"] == 3 and flat["eval/a/num_prompts"] == 2
  assert flat["eval/reward_mean"] == 0.5
  assert flat["eval/response_len_mean"] == 10.0
  assert flat["eval/truncated_frac"] == 0.25
  report = result.report()
  assert report["pass@1"] == pytest.approx(0.5) and report["n"] == 4
  assert report["step"] == 5
  assert set(report["pass@k"]) == {"1", "2"}
  assert report["per_task"]["a"] == {"pass@1": 0.25, "pass@k": {
      "1": 0.25, "2": pytest.approx(5 / 12)}, "n_prompts": 2}
  json.dumps(report)
  lines = result.table().splitlines()
  assert lines[0].split() == ["task", "prompts", "pass@1", "pass@2"]
  assert lines[2].split() == ["all", "3", "0.5000", "0.6111"]
  assert lines[3].split() == ["a", "2", "0.2500", "0.4167"]
