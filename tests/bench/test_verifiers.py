"""The verifier benchmark: valid items, the overlap arithmetic, a tiny run."""

import json
import time

import pytest

from brorl_jax.bench import verifiers as bench
from brorl_jax.rewards import RewardPool, score
from tests.rewards.sandbox_marks import needs_sandbox


def test_math_items_are_distinct_and_half_right():
  items = bench.math_items(16, seed=3)
  assert len({(i.completion, i.answer) for i in items}) == 16
  assert [score(i) for i in items] == [1.0, 0.0] * 8


@needs_sandbox
def test_code_items_score_as_designed():
  items = bench.code_items(6, seed=3)
  assert [score(i) for i in items] == [1.0, 1.0, 0.0] * 2


def test_scoring_is_fully_hidden_behind_an_idle_decode():
  """A decode that sleeps leaves the cores to the workers: hidden ~ 1."""
  with RewardPool(num_workers=1) as pool:
    assert pool.wait_ready()
    start = time.perf_counter()
    pool.score(bench.math_items(40, seed=9))
    t_score = time.perf_counter() - start
    result = bench.measure_overlap(
        pool, lambda s: bench.math_items(40, seed=s),
        lambda: time.sleep(1.5 * t_score), repeats=1)
  assert result["t_overlapped"] < result["t_score_alone"] + result[
      "t_decode_alone"]
  assert result["hidden"] > 0.5


@pytest.mark.slow
@needs_sandbox
def test_main_writes_the_report(tmp_path):
  path = tmp_path / "bench.json"
  report = bench.main(["--workers", "1", "--math_items", "30",
                       "--code-items", "3", "--overlap-items", "30",
                       "--overlap-workers", "1", "--json", str(path)])
  assert json.loads(path.read_text()) == report
  rows = report["throughput"]
  assert [(r["verifier"], r["workers"]) for r in rows] == [("math", 1),
                                                           ("code", 1)]
  assert all(r["items_per_s"] > 0 and r["not_ok"] == 0 for r in rows)
  (row,) = report["overlap"]
  assert row["pinned"] == (report["cores"] >= 2)
  assert set(row["decode_cpus"]).isdisjoint(row["worker_cpus"]) or not row[
      "pinned"]
  assert row["target"] is None or report["cores"] >= 3
