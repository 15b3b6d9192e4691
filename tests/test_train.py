"""End-to-end: the loop runs, resumes exactly, survives SIGTERM, exports."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from brorl_jax import checkpointing, cli
from brorl_jax.loop.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.configs import tiny_rl  # noqa: E402

# Metrics that measure wall time (or depend on it) differ between runs.
TIMING = ("time/", "throughput/", "eval/time_s", "latency")


def _train(workdir, **overrides):
  from brorl_jax import train
  return train.train(cli.set_keys(tiny_rl.get_config(), overrides),
                     str(workdir))


def _comparable(workdir):
  rows = []
  for row in read_metrics(workdir):
    rows.append({k: v for k, v in row.items()
                 if not any(t in k for t in TIMING)})
  return rows


def _params(workdir, step):
  _, params, _ = checkpointing.load_policy_params(workdir, step)
  return jax.tree.leaves(jax.device_get(params))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The reference: 4 uninterrupted steps of tiny_rl (refill decode)."""
  workdir = tmp_path_factory.mktemp("train") / "straight"
  _train(workdir, total_steps=4)
  return workdir


def _assert_same_run(a, b, step):
  for x, y in zip(_params(a, step), _params(b, step)):
    np.testing.assert_array_equal(x, y)
  m_a, m_b = _comparable(a), _comparable(b)
  assert [r["step"] for r in m_a] == [r["step"] for r in m_b]
  assert m_a == m_b


@pytest.mark.slow
def test_resume_is_exact(straight, tmp_path):
  _train(tmp_path / "resumed", total_steps=2)
  _train(tmp_path / "resumed", total_steps=4)
  _assert_same_run(straight, tmp_path / "resumed", 4)
  # ...and the parameters did move.
  a = _params(straight, 4)
  assert any(not np.array_equal(x, y)
             for x, y in zip(_params(straight, 2), a))
  m_a = _comparable(straight)
  steps = [r["step"] for r in m_a]
  assert steps == [0, 1, 2, 3, 4]
  last = m_a[-1]
  for key in ("reward/mean", "loss/entropy", "mass/u2",
              "rollout/generated_tokens_total", "eval/pass@1",
              "rollout/logp_diff_max", "optim/grad_norm"):
    assert key in last, key
  assert last["rollout/generated_tokens_total"] > 0
  assert last["optim/updates_total"] == 8  # 4 steps x 2 mini-batches


def _cli(workdir, *args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.Popen(
      [sys.executable, "-m", "brorl_jax.train", "--config",
       str(ROOT / "tests/configs/tiny_rl.py"), "--workdir", str(workdir),
       *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_mid_decode_saves_within_the_grace_and_resumes_exactly(
    straight, tmp_path, monkeypatch, caplog):
  # The process sends itself a real SIGTERM right after the first segment
  # of the decode that would make step 2, while the rest of the decode is
  # still to run: no sleep, no race with a fast decode (the marker is the
  # segment itself). tiny_rl: 10 tokens in segments of 3 steps.
  from brorl_jax.rollout import Sampler
  segments = Sampler.segments
  seen = {"decodes": 0, "sigterm_at": None, "after": 0}

  def sigterm_mid_decode(self, *args, **kwargs):
    training = self.cfg.section == "rollout"     # not the evaluation's
    index = seen["decodes"]
    seen["decodes"] += training
    for seg, out in enumerate(segments(self, *args, **kwargs)):
      if seen["sigterm_at"] is not None:
        seen["after"] += 1                    # decoded after the signal
      if training and index == 1 and seg == 0:
        assert not out[2], "the decode must still have segments to run"
        seen["sigterm_at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
      yield out

  monkeypatch.setattr(Sampler, "segments", sigterm_mid_decode)
  grace = tiny_rl.get_config().checkpoint.preempt_grace_s
  workdir = tmp_path / "run"
  with caplog.at_level("WARNING", logger="brorl_jax.loop.trainer"):
    _train(workdir, total_steps=4)
  # Honoured at the next segment boundary: no segment ran after it, and
  # the last completed step (1) was saved within the grace, which the loop
  # reads and reports.
  assert seen["sigterm_at"] is not None and seen["after"] == 0
  assert time.monotonic() - seen["sigterm_at"] < grace
  assert "preempted: step 1 saved" in caplog.text
  assert f"preempt_grace_s = {grace:.1f} s" in caplog.text
  saved = checkpointing.TrainCheckpointer(workdir / "checkpoints", keep=3)
  assert saved.all_steps() == [1]
  saved.close()
  assert read_metrics(workdir)[-1]["step"] == 1
  # Resuming gives the uninterrupted run's parameters and metrics.
  monkeypatch.undo()
  _train(workdir, total_steps=4)
  _assert_same_run(straight, workdir, 4)


@pytest.mark.slow
def test_demo_config_runs_two_iterations_and_exports(tmp_path):
  transformers = pytest.importorskip("transformers")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  workdir = tmp_path / "demo"
  run = subprocess.run(
      [sys.executable, "-m", "brorl_jax.train", "--config",
       str(ROOT / "configs/demo_cpu.py"), "--workdir", str(workdir),
       "--config.total_steps=2", "--config.warmstart.steps=10",
       "--config.eval.max_prompts=16", "--config.logging.progress_bar=False"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stdout + run.stderr
  rows = read_metrics(workdir)
  assert rows[-1]["step"] == 2 and "eval/pass@1" in rows[-1]
  assert any(r["step"] == 0 and "eval/pass@1" in r for r in rows)
  export = subprocess.run(
      [sys.executable, "-m", "brorl_jax.hf", "export", "--workdir",
       str(workdir), "--out", str(tmp_path / "hf")], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300)
  assert export.returncode == 0, export.stdout + export.stderr
  model = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")
  assert model.config.num_hidden_layers == 4


def test_bad_config_is_rejected_before_anything_runs(tmp_path):
  from brorl_jax.config import ConfigError
  with pytest.raises(ConfigError, match="algo.micro_batch_size"):
    _train(tmp_path / "bad", **{"algo.micro_batch_size": 3})
  with pytest.raises(ConfigError, match="rollout.top_p"):
    _train(tmp_path / "bad2", **{"rollout.top_p": 1.5})
  with pytest.raises(ConfigError, match=r"mesh.shape.*needs 3 devices"):
    _train(tmp_path / "bad3", **{"mesh.shape": (3, 1, 1)})
  assert not any((tmp_path / b).exists() for b in ("bad", "bad2", "bad3"))


def test_unusable_workdir_is_one_error_line_with_status_2(tmp_path):
  (tmp_path / "file").write_text("x")
  proc = _cli(tmp_path / "file")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2, out
  assert out.strip().splitlines()[-1] == (
      f"error: --workdir {tmp_path / 'file'} is a file, not a directory; "
      "give a directory path (it is created when missing)"), out
  assert "Traceback" not in out


def _read_until(proc, text, timeout=300):
  """The child's output up to the first line containing `text`."""
  lines, deadline = [], time.monotonic() + timeout
  for line in proc.stdout:
    lines.append(line)
    if text in line or time.monotonic() > deadline:
      break
  assert text in "".join(lines[-1:]), "".join(lines)
  return "".join(lines)


def _wait_for_step(proc, metrics, step, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    if metrics.exists() and any(json.loads(l)["step"] >= step
                                for l in metrics.read_text().splitlines()):
      return
    time.sleep(0.2)
  raise AssertionError(proc.stdout.read() if proc.poll() is not None
                       else "timed out")


@pytest.mark.slow
def test_restarts_after_sigterm_in_the_warm_start_and_kill9_before_the_first_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  metrics = workdir / "metrics.jsonl"
  args = ("--config.total_steps=2", "--config.checkpoint.every=0",
          "--config.checkpoint.preempt_grace_s=30")
  # 1. SIGTERM during a (long) warm start: exit 0 within the grace, nothing
  #    kept; the next start redoes the warm start.
  proc = _cli(workdir, *args, "--config.warmstart.steps=1000000")
  _read_until(proc, "warm start: 1000000 steps")
  t0 = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  # Within the grace although the signal may land in the first step's
  # compile (25 s of the 28 s measured on 2 cores at load 19).
  assert time.monotonic() - t0 < 30, out
  assert "preempted during the warm start" in out
  assert not metrics.exists() or read_metrics(workdir) == []
  # 2. kill -9 after step 1 was logged, before any checkpoint.
  proc = _cli(workdir, *args, "--config.warmstart.steps=3")
  _wait_for_step(proc, metrics, 1)
  proc.kill()
  proc.wait()
  assert not (workdir / "checkpoints" / "1").exists()
  # 3. The restart cuts the logs back to nothing and runs to the end, each
  #    step logged once.
  proc = _cli(workdir, *args, "--config.warmstart.steps=3")
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert "dropped what was logged after the start" in out
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [0, 0, 1, 2], rows
  assert sum("eval/pass@1" in r for r in rows if r["step"] == 0) == 1
  assert sum("warmstart/loss" in r for r in rows) == 1
  # 4. A changed model is refused before anything runs, naming the key.
  from brorl_jax.loop.workdir import WorkdirError
  with pytest.raises(WorkdirError, match="model.preset 'tiny' -> 'demo'"):
    _train(workdir, **{"model.preset": "demo"})
  assert read_metrics(workdir) == rows


def test_failed_checkpoint_save_stops_the_run_and_keeps_nothing_after(
    tmp_path, monkeypatch):
  from tests.test_checkpointing import _fail_json_writes
  from brorl_jax.checkpointing import CheckpointError
  from brorl_jax import train
  _fail_json_writes(monkeypatch, 1)      # the meta item of step 1: ENOSPC
  started, iteration = [], train.Trainer.iteration
  monkeypatch.setattr(train.Trainer, "iteration", lambda self, state, p, step,
                      *a: started.append(step) or iteration(
                          self, state, p, step, *a))
  with pytest.raises(CheckpointError, match=r"checkpoint step 1 could not be "
                     r"saved to .*/checkpoints/1: \[Errno 28\] No space"):
    _train(tmp_path, total_steps=3, **{
        "checkpoint.every": 1, "checkpoint.async_save": True,
        "diagnostics.every": 0, "data.synthetic": {  # no evaluation
            "task": "arithmetic", "train": 300, "eval": 0, "seed": 0}})
  # Stopped at the next step start at the latest (the iteration that makes
  # step 2 may have run while the save was in flight, not the next one); no
  # good checkpoint, so nothing logged is kept.
  assert started in ([0], [0, 1]), started
  assert read_metrics(tmp_path) == []
  assert checkpointing.TrainCheckpointer(tmp_path / "checkpoints",
                                         keep=3).all_steps() == []
