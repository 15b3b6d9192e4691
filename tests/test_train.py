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

from brorl_jax import checkpointing
from brorl_jax.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.configs import tiny_rl  # noqa: E402

# Metrics that measure wall time (or depend on it) differ between runs.
TIMING = ("time/", "throughput/", "eval/time_s", "latency")


def _train(workdir, **overrides):
  from brorl_jax import train
  cfg = tiny_rl.get_config()
  for key, value in overrides.items():
    node = cfg
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return train.train(cfg, str(workdir))


def _comparable(workdir):
  rows = []
  for row in read_metrics(workdir):
    rows.append({k: v for k, v in row.items()
                 if not any(t in k for t in TIMING)})
  return rows


def _params(workdir, step):
  _, params, _ = checkpointing.load_policy_params(workdir, step)
  return jax.tree.leaves(jax.device_get(params))


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
  _train(tmp_path / "straight", total_steps=4)
  _train(tmp_path / "resumed", total_steps=2)
  _train(tmp_path / "resumed", total_steps=4)
  a, b = _params(tmp_path / "straight", 4), _params(tmp_path / "resumed", 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # ...and the parameters did move.
  assert any(not np.array_equal(x, y)
             for x, y in zip(_params(tmp_path / "straight", 2), a))
  m_a, m_b = _comparable(tmp_path / "straight"), _comparable(
      tmp_path / "resumed")
  assert [r["step"] for r in m_a] == [r["step"] for r in m_b]
  assert m_a == m_b
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
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
  workdir = tmp_path / "run"
  proc = _cli(workdir, "--config.total_steps=50", "--config.checkpoint.every=0")
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None:
    if metrics.exists() and any(json.loads(l)["step"] >= 1
                                for l in metrics.read_text().splitlines()):
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stdout.read()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  saved = checkpointing.TrainCheckpointer(workdir / "checkpoints", keep=3)
  steps = saved.all_steps()
  saved.close()
  assert len(steps) == 1 and 1 <= steps[0] < 50, (steps, out)
  # Resuming continues from the saved step to the (new) end.
  proc = _cli(workdir, f"--config.total_steps={steps[0] + 1}")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "resumed from step" in out
  assert read_metrics(workdir)[-1]["step"] == steps[0] + 1


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
  assert not (tmp_path / "bad2").exists()
