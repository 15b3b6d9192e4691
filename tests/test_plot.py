"""Tests for brorl_jax.plot: PNGs from fake runs, compare mode, errors."""

import subprocess
import sys

import numpy as np
import pytest

from brorl_jax import plot
from brorl_jax.loop.metrics import MetricsWriter, read_metrics

MASS = ("p_pos", "p_neg", "unsampled_mass", "u2", "term1_lb", "term2_lb",
        "term3_bound", "margin", "frac_margin_positive", "d_correct_mass",
        "d_incorrect_mass", "dlogp_correct", "dlogp_incorrect",
        "frac_correct_rose", "worst_dlogp_correct", "new_metric")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(workdir, *, seed=0, steps=6, mass=True, tokens_per_step=1000):
  """A metrics.jsonl as the loop writes it: eval at step 0 before any RL."""
  rng = np.random.default_rng(seed)
  with MetricsWriter(workdir, tensorboard=False) as writer:
    writer.write(0, {"eval/pass@1": 0.1 + 0.01 * seed})
    for step in range(1, steps + 1):
      metrics = {
          "reward/mean": step / steps + rng.normal(0, 0.05),
          "rollout/response_len_mean": 50 + step,
          "rollout/generated_tokens_total": step * tokens_per_step
                                            + seed * 37,
          "loss/kl_ref": 1e-3 * step, "loss/entropy": 1.0 - 0.05 * step,
          "loss/clip_frac_low": 0.01, "loss/clip_frac_high": 0.02,
          "time/sample_s": 1.0, "time/score_s": 0.2, "time/update_s": 0.5,
      }
      if mass:
        metrics |= {f"mass/{m}": rng.normal() for m in MASS}
        metrics["mass/u2"] = float("nan") if step == 3 else 1e-4
      writer.write(step, metrics)
      if step % 3 == 0:
        writer.write(step, {"eval/pass@1": 0.1 + 0.05 * step})


def _is_png(path):
  data = path.read_bytes()
  return data[:8] == PNG_MAGIC and len(data) > 5000


def test_panels_skip_absent_metrics_and_take_unknown_mass():
  names = ["reward/mean", "loss/clip_frac_high", "time/a_s", "mass/u2",
           "mass/zz_new", "other/x"]
  chosen = dict(plot.panels(names))
  assert chosen["Clip fractions"] == ("loss/clip_frac_high",)
  assert chosen["Time per step (s)"] == ("time/a_s",)
  assert chosen["mass/zz_new"] == ("mass/zz_new",)
  assert "Held-out pass@1" not in chosen
  assert len(chosen) == 5 and plot.panels(["other/x"]) == []


def test_series_merges_lines_by_step():
  records = [{"step": 0, "eval/pass@1": 0.1}, {"step": 1, "a": 1.0},
             {"step": 1, "eval/pass@1": None}, {"step": 2, "a": 2}]
  data = plot.series(records)
  np.testing.assert_array_equal(data["a"][0], [1, 2])
  np.testing.assert_array_equal(data["eval/pass@1"][1], [0.1, np.nan])


def test_tokens_axis_uses_latest_logged_step():
  data = plot.series([{"step": 0, "eval/pass@1": 0.1},
                      {"step": 1, "rollout/generated_tokens_total": 10},
                      {"step": 3, "rollout/generated_tokens_total": 30}])
  np.testing.assert_array_equal(plot.tokens_axis(data, np.array([0, 1, 2, 3])),
                                [0, 10, 10, 30])


@pytest.mark.parametrize("mass", [True, False])
def test_plot_run_writes_png(tmp_path, mass):
  fake_run(tmp_path, mass=mass)
  out = plot.plot_run(tmp_path)
  assert out == tmp_path / "metrics.png" and _is_png(out)


def test_compare_two_arms_two_seeds(tmp_path):
  arms = []
  for arm, tokens in (("prorl", 1000), ("brorl", 1500)):
    arms.append([tmp_path / f"{arm}_s{seed}" for seed in range(2)])
    for seed, workdir in enumerate(arms[-1]):
      fake_run(workdir, seed=seed, tokens_per_step=tokens)
  out = tmp_path / "cmp.png"
  assert plot.main(["--compare", ",".join(map(str, arms[0])),
                    ",".join(map(str, arms[1])), "--out", str(out)]) == 0
  assert _is_png(out)
  assert plot._default_label(arms[0]) == "prorl_s"
  # Interpolated band of an arm: at the shared x values, mean of the seeds.
  runs = [plot.series(read_metrics(w)) for w in arms[0]]
  x, mean, low, high = plot._arm_curve(runs, "reward/mean")
  assert x.min() >= 1037 and x.max() <= 6000
  assert np.all(low <= mean) and np.all(mean <= high)


def test_compare_label_count_and_missing_tokens(tmp_path):
  fake_run(tmp_path / "a")
  with pytest.raises(ValueError, match="2 labels for 1 arms"):
    plot.plot_compare([[tmp_path / "a"]], tmp_path / "x.png", ["A", "B"])
  with MetricsWriter(tmp_path / "b", tensorboard=False) as writer:
    writer.write(1, {"reward/mean": 0.5})
  with pytest.raises(ValueError, match="rollout/generated_tokens_total"):
    plot.plot_compare([[tmp_path / "b"]], tmp_path / "x.png")


def test_cli_missing_file_is_a_clear_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "brorl_jax.plot", "--workdir",
       str(tmp_path / "nope")], capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert f"error: {tmp_path / 'nope' / 'metrics.jsonl'}: no such file" in (
      result.stderr)
  assert plot.main(["--compare", str(tmp_path / "nope")]) == 2
