"""A run whose first steps skip every mini-batch stops with one line."""

import math
import pathlib
import subprocess
import sys

import pytest

from brorl_jax.rl import nonfinite

ROOT = pathlib.Path(__file__).resolve().parents[2]
DESCRIBE = dict(backend="cudnn", platform="gpu", dtype="bfloat16")
NAN = math.nan


def _row(skipped, **kw):
  row = {"optim/skipped": skipped, "loss/loss": 0.5, "optim/grad_norm": 1.0,
         "optim/param_norm": 10.0, "rollout/logp_diff_mean": 0.01}
  return {**row, **kw}


def test_stops_after_the_first_steps_skip_everything():
  watch = nonfinite.SkipWatch(2, **DESCRIBE)
  watch.check(_row(2, **{"optim/grad_norm": NAN}))
  with pytest.raises(nonfinite.NonFiniteRun) as e:
    watch.check(_row(2, **{"optim/grad_norm": NAN}))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("the first 2 RL steps")
  assert "backward pass" in msg and "'cudnn' on gpu" in msg


def test_a_step_that_trains_disarms_it():
  watch = nonfinite.SkipWatch(2, **DESCRIBE)
  watch.check(_row(1))                 # one mini-batch of two applied
  for _ in range(5):
    watch.check(_row(2, **{"loss/loss": NAN}))


@pytest.mark.parametrize("row,cause", [
    ({"optim/param_norm": NAN, "loss/loss": NAN}, "parameters are not finite"),
    ({"loss/loss": NAN, "rollout/logp_diff_mean": NAN}, "forward pass"),
    ({"loss/loss": -math.inf}, "the loss terms"),
    ({"optim/grad_norm": math.inf}, "backward pass"),
])
def test_likely_cause(row, cause):
  assert cause in nonfinite.likely_cause(_row(1, **row), **DESCRIBE)


@pytest.mark.slow  # a tiny run's compiles, end to end
def test_train_stops_with_one_error_line(tmp_path):
  # An infinite entropy coefficient makes every mini-batch's loss -inf.
  out = subprocess.run(
      [sys.executable, "-m", "brorl_jax.train",
       "--config", str(ROOT / "tests/configs/tiny_rl.py"),
       "--workdir", str(tmp_path / "w"), "--config.total_steps=4",
       "--config.algo.loss.entropy_coef=inf",
       "--config.data.synthetic.eval=0", "--config.logging.progress=off"],
      cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 1, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the first 2 RL steps of this run skipped "
                         "every mini-batch (2 of 2 each"), last
  assert "likely cause: the loss terms" in last
