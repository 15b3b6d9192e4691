"""A finite data.num_epochs that runs out ends the run cleanly (issue 36.4)."""

import pathlib
import subprocess
import sys

import pytest

from brorl_jax import checkpointing

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _train(workdir):
  return subprocess.run(
      [sys.executable, "-m", "brorl_jax.train", "--config",
       str(ROOT / "tests/configs/tiny_rl.py"), "--workdir", str(workdir),
       "--config.total_steps=2", "--config.data.num_epochs=1",
       # 6 prompts, 4 per step: one step, then the data is used up.
       "--config.data.synthetic.train=6", "--config.data.synthetic.eval=0",
       "--config.logging.progress=off"],
      cwd=ROOT, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow  # two starts of a tiny run
def test_running_out_of_data_saves_the_last_step_and_exits_0(tmp_path):
  note = ("the training data is exhausted: data.num_epochs = 1 over 6 "
          "prompts gives 1 steps of 4 prompts; step 1 is saved")
  run = _train(tmp_path / "w")
  assert run.returncode == 0, run.stderr[-3000:]
  assert "StopIteration" not in run.stderr
  last = run.stdout.strip().splitlines()[-1]
  assert last.startswith("done: step 1 (1 this run") and note in last, last
  saved = checkpointing.TrainCheckpointer(tmp_path / "w" / "checkpoints",
                                          keep=3)
  assert saved.all_steps() == [1]
  saved.close()
  # A requeued job: says so again, trains nothing, exits 0.
  again = _train(tmp_path / "w")
  assert again.returncode == 0, again.stderr[-3000:]
  last = again.stdout.strip().splitlines()[-1]
  assert last.startswith("done: step 1 (0 this run") and note in last, last
