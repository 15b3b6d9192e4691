"""The plateau stop, a branch from its checkpoint, and compare --from.

One tiny run evaluates every step and stops once held-out pass@1 stops
rising (`eval.plateau_window`); `branch.export` turns its last checkpoint
into the model directory the arms start from; `compare --from` wires it
(the arms' training is faked here: their metrics are written directly, so
the test checks compare's bookkeeping, intervals and plot, not RL).
"""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from brorl_jax import checkpointing, cli, compare
from brorl_jax.analysis import intervals
from brorl_jax.loop import branch
from brorl_jax.loop.metrics import MetricsWriter, read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.configs import tiny_rl  # noqa: E402

WINDOW = 3


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory):
  """tiny_rl, evaluated every step, stopped by the plateau test."""
  from brorl_jax import train
  workdir = tmp_path_factory.mktemp("plateau") / "run"
  train.train(cli.set_keys(tiny_rl.get_config(), {
      "total_steps": 12, "eval.every": 1, "eval.plateau_window": WINDOW,
      "checkpoint.every": 1, "checkpoint.keep": 2, "diagnostics.every": 0,
      "logging.tensorboard": False}), str(workdir))
  return workdir


@pytest.mark.slow
def test_the_run_stops_at_the_first_plateau_and_saves_it(plateau_run):
  rows = read_metrics(plateau_run)
  evals = [(r["step"], r["eval/pass@1"]) for r in rows
           if r.get("eval/pass@1") is not None]
  tokens = {r["step"]: r["rollout/generated_tokens_total"] for r in rows
            if "rollout/generated_tokens_total" in r}
  tokens[0] = 0
  x = [tokens[s] for s, _ in evals]
  y = [p for _, p in evals]
  # The stop is the first evaluation at which the slope test says "not
  # rising" (a random tiny model's pass@1 is flat), long before step 12.
  first = next(i for i in range(len(y))
               if intervals.plateaued(x[:i + 1], y[:i + 1], WINDOW))
  stop = evals[first][0]
  assert len(evals) == first + 1 and stop < 12
  assert rows[-1]["step"] == stop
  assert [r["step"] for r in rows if r.get("eval/plateau") == 1] == [stop]
  ckpt = checkpointing.TrainCheckpointer(plateau_run / "checkpoints", keep=2)
  assert ckpt.latest_step() == stop
  ckpt.close()
  # Running it again resumes at the plateau and trains no further step.
  from brorl_jax import train
  train.train(cli.set_keys(tiny_rl.get_config(), {
      "total_steps": 12, "eval.every": 1, "eval.plateau_window": WINDOW,
      "checkpoint.every": 1, "checkpoint.keep": 2, "diagnostics.every": 0,
      "logging.tensorboard": False}), str(plateau_run))
  assert read_metrics(plateau_run)[-1]["step"] == stop


@pytest.mark.slow
def test_export_makes_a_model_directory_of_the_checkpoint(plateau_run,
                                                           tmp_path):
  step = read_metrics(plateau_run)[-1]["step"]
  with pytest.raises(branch.BranchError, match="no such step"):
    branch.resolve(plateau_run / "checkpoints" / "999")
  with pytest.raises(branch.BranchError, match="no checkpoints/"):
    branch.resolve(tmp_path)
  assert branch.resolve(plateau_run) == (plateau_run, step)
  point = branch.export(plateau_run / "checkpoints" / str(step),
                        tmp_path / "b")
  assert (point.step, point.workdir) == (step, str(plateau_run))
  assert point.tokens == read_metrics(plateau_run)[-1][
      "rollout/generated_tokens_total"]
  assert point.pass1_step == step
  _, exported, tok = checkpointing.load_policy_params(tmp_path / "b")
  _, saved, _ = checkpointing.load_policy_params(plateau_run, step)
  for a, b in zip(jax.tree.leaves(jax.device_get(exported)),
                  jax.tree.leaves(jax.device_get(saved))):
    np.testing.assert_array_equal(a, b)
  assert tok == tmp_path / "b" / "tokenizer"
  # Exported once; another source into the same directory is refused.
  assert branch.export(plateau_run, tmp_path / "b") == point
  other = plateau_run.parent / "other"
  (other / "checkpoints" / "1").mkdir(parents=True)
  with pytest.raises(branch.BranchError, match="use a new --workdir"):
    branch.export(other, tmp_path / "b")


def _fake_arm_run(cmd, check, env):
  """Stands in for `python -m brorl_jax.train`: writes a run's metrics."""
  del check, env
  args = dict(a.split("=", 1) for a in cmd if a.startswith("--config."))
  workdir = pathlib.Path(cmd[cmd.index("--workdir") + 1])
  seed = int(args["--config.seed"])
  assert args["--config.warmstart.steps"] == "0"
  assert pathlib.Path(args["--config.init.path"]).name == compare.BRANCH
  tokens_per_step = 100 if "brorl" in workdir.parent.name else 120
  rise = 0.01 if "brorl" in workdir.parent.name else 0.02
  with MetricsWriter(workdir, tensorboard=False) as writer:
    writer.write(0, {"eval/pass@1": 0.30})
    for step in range(1, 7):
      writer.write(step, {
          "rollout/generated_tokens": tokens_per_step,
          "rollout/generated_tokens_total": step * tokens_per_step,
          "time/step_s": 1.0 + 0.1 * seed, "reward/mean": 0.3,
          "mass/u2": 1e-3, "eval/pass@1": 0.30 + step * rise
          + 0.002 * seed * (step % 2)})
  return None


@pytest.mark.slow
def test_compare_from_a_checkpoint_writes_intervals(plateau_run, tmp_path,
                                                    monkeypatch):
  monkeypatch.setattr(compare.subprocess, "run", _fake_arm_run)
  step = read_metrics(plateau_run)[-1]["step"]
  out = tmp_path / "cmp"
  assert compare.main([
      "brorl-compare", "--config", str(ROOT / "configs" / "compare_cpu.py"),
      "--workdir",
      str(out), "--arms", "prorl,brorl", "--seeds", "0,1",
      "--from", str(plateau_run / "checkpoints" / str(step))]) == 0
  result = json.loads((out / "compare.json").read_text())
  assert result["from"]["step"] == step
  assert set(result["runs"]) == {"prorl", "brorl"}
  assert result["budget"]["tokens"] == 600.0     # brorl's 6 x 100
  # At 600 tokens prorl (step 5) read 0.40 and 0.402: gains 0.10, 0.102.
  prorl = result["arms"]["prorl"]["gain_at_tokens"]
  assert prorl["n"] == 2 and prorl["mean"] == pytest.approx(0.101)
  assert prorl["low"] < prorl["mean"] < prorl["high"]
  diff = result["differences"]["brorl"]
  assert diff["vs"] == "prorl"
  # At 600 tokens prorl read 0.30 + 5 * 0.02 (+0.002 on seed 1), brorl
  # 0.30 + 6 * 0.01: the paired difference is -0.04 and -0.042.
  assert diff["gain_at_tokens"]["mean"] == pytest.approx(-0.041)
  assert diff["gain_at_tokens"]["half_width"] is not None
  assert (out / "compare.png").stat().st_size > 5000
