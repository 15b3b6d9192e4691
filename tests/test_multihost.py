"""The train loop on several processes: 2 processes x 2 CPU devices (gloo).

One uninterrupted 2-process run (started through launch/local.sh) is the
reference for: a resumed 2-process run (bitwise), one process with the same
4-device global mesh (rollouts identical, parameters within 1e-5), and the
files only process 0 writes. Failure tests check that the survivors of a
killed or failing process exit non-zero within the heartbeat bound, and that
a SIGTERM to one process makes all of them save the same step and exit 0.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from brorl_jax import checkpointing
from brorl_jax.loop.metrics import read_metrics
from brorl_jax.loop.rollout_archive import RolloutArchive

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests/configs/tiny_multihost.py"
TIMING = ("time/", "throughput/", "latency")
HEARTBEAT_S = 10
pytestmark = pytest.mark.slow


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                      f"{devices}").strip()
  return env


def _local_sh(workdir, *args, timeout=300):
  run = subprocess.run(
      ["bash", str(ROOT / "launch/local.sh"), "2", "--config", str(CONFIG),
       "--workdir", str(workdir), *args], cwd=ROOT, env=_env(2),
      capture_output=True, text=True, timeout=timeout)
  logs = "".join(p.read_text() for p in sorted((workdir / "logs").glob(
      "process_*.log")))
  return run.returncode, run.stdout + run.stderr + logs


def _start(workdir, *args, program=("-m", "brorl_jax.train")):
  """Two processes of `program`, each writing its output to a file."""
  port = portpicker.pick_unused_port()
  procs, logs = [], []
  for i in range(2):
    log = open(f"{workdir}.log{i}", "w")   # noqa: SIM115 (closed by _wait)
    procs.append(subprocess.Popen(
        [sys.executable, *program, "--config", str(CONFIG), "--workdir",
         str(workdir), f"--config.mesh.coordinator_address=127.0.0.1:{port}",
         "--config.mesh.num_processes=2", f"--config.mesh.process_id={i}",
         f"--config.mesh.heartbeat_timeout_s={HEARTBEAT_S}", *args],
        cwd=ROOT, env=_env(2), stdout=log, stderr=subprocess.STDOUT))
    logs.append(log)
  return procs, logs


def _wait_for(predicate, procs, timeout=240):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    assert all(p.poll() is None for p in procs), "a process ended early"
    time.sleep(0.2)
  raise AssertionError("timed out")


def _exit_times(procs, t0, timeout):
  """{index: (returncode, seconds after t0)} once all have ended."""
  ends = {}
  deadline = t0 + timeout
  while len(ends) < len(procs) and time.monotonic() < deadline:
    for i, p in enumerate(procs):
      if i not in ends and p.poll() is not None:
        ends[i] = (p.returncode, time.monotonic() - t0)
    time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  return ends


def _initialized(workdir):
  return lambda: "jax.distributed: process 0 of 2" in pathlib.Path(
      f"{workdir}.log0").read_text()


def _params(workdir, step):
  _, params, _ = checkpointing.load_policy_params(workdir, step)
  return jax.tree.leaves(jax.device_get(params))


def _comparable(workdir):
  return [{k: v for k, v in row.items() if not any(t in k for t in TIMING)}
          for row in read_metrics(workdir)]


def _assert_same_rollouts(a, b):
  for key in ("lengths", "rewards", "status"):
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  for key in ("completion_ids", "logprobs"):
    assert len(a[key]) == len(b[key])
    for x, y in zip(a[key], b[key]):
      np.testing.assert_array_equal(x, y, err_msg=key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The reference: 2 steps on 2 processes, launched by launch/local.sh."""
  workdir = tmp_path_factory.mktemp("mh") / "straight"
  t0 = time.monotonic()
  rc, out = _local_sh(workdir)
  assert rc == 0, out
  print(f"2-process run, 2 steps: {time.monotonic() - t0:.1f} s")
  return workdir


def test_only_process_0_writes_and_checkpoints_are_global(straight):
  rows = read_metrics(straight)
  assert [r["step"] for r in rows] == [1, 2]   # one writer: no duplicates
  assert rows[-1]["verify/items"] == 4 * 8     # counted over both processes
  assert len(list(straight.glob("events.out.tfevents*"))) == 1
  assert sorted(p.name for p in (straight / "logs").iterdir()) == [
      "process_0.log", "process_1.log"]
  step_dir = straight / "checkpoints" / "2"
  # The iterator state is one JSON item, not one file per process.
  assert not list((step_dir / "data").glob("process_*"))
  # The archive holds every process's rollouts: 4 prompts x 8.
  archive = RolloutArchive(straight / "rollouts", read_only=True)
  step = archive.read_step(2)
  assert np.asarray(step["rewards"]).shape == (4 * 8,)
  assert len(step["completion_ids"]) == 4 * 8
  samples = [x for x in archive.read_text_samples() if x["step"] == 2]
  assert len(samples) == 4 and all(isinstance(x["completion"], str)
                                   for x in samples)


def test_resume_on_two_processes_is_bitwise_exact(straight, tmp_path):
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("logs"))
  shutil.rmtree(resumed / "checkpoints" / "2")
  t0 = time.monotonic()
  rc, out = _local_sh(resumed)
  assert rc == 0, out
  print(f"2-process resume, 1 step: {time.monotonic() - t0:.1f} s")
  assert "resumed from step 1" in out
  for a, b in zip(_params(straight, 2), _params(resumed, 2)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(
      _params(straight, 1), _params(straight, 2)))
  assert _comparable(straight) == _comparable(resumed)
  a = RolloutArchive(straight / "rollouts", read_only=True).read_step(2)
  b = RolloutArchive(resumed / "rollouts", read_only=True).read_step(2)
  _assert_same_rollouts(a, b)


def test_one_process_with_the_same_mesh_agrees(straight, tmp_path):
  single = tmp_path / "single"
  t0 = time.monotonic()
  run = subprocess.run(
      [sys.executable, "-m", "brorl_jax.train", "--config", str(CONFIG),
       "--workdir", str(single), "--config.total_steps=1"], cwd=ROOT,
      env=_env(4), capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  print(f"1-process run, 1 step: {time.monotonic() - t0:.1f} s")
  a = RolloutArchive(straight / "rollouts", read_only=True).read_step(1)
  b = RolloutArchive(single / "rollouts", read_only=True).read_step(1)
  _assert_same_rollouts(a, b)
  # Cross-process reductions (gloo) may sum in another order.
  for x, y in zip(_params(straight, 1), _params(single, 1)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_stops_the_survivor(tmp_path, victim):
  workdir = tmp_path / "run"
  procs, logs = _start(workdir, "--config.total_steps=50")
  _wait_for(_initialized(workdir), procs)
  time.sleep(1.0)
  procs[victim].send_signal(signal.SIGKILL)
  t0 = time.monotonic()
  ends = _exit_times(procs, t0, timeout=90)
  for log in logs:
    log.close()
  rc, seconds = ends.get(1 - victim, (None, None))
  print(f"victim {victim}: survivor exit {rc} after {seconds:.1f} s")
  assert rc is not None and rc != 0, pathlib.Path(
      f"{workdir}.log{1 - victim}").read_text()[-3000:]
  assert seconds < 60


def test_failing_process_stops_everyone_quickly(tmp_path):
  # Process 1 raises right after jax.distributed starts; without
  # `distributed.exit_on_error` it would wait 5 minutes at JAX's shutdown
  # barrier while process 0 waits for it.
  script = tmp_path / "failing.py"
  script.write_text(
      "import jax\n"
      "from brorl_jax import train\n"
      "from brorl_jax.loop import experiment\n"
      "build = experiment.build\n"
      "def failing(cfg, workdir):\n"
      "  if jax.process_index() == 1:\n"
      "    raise RuntimeError('injected failure')\n"
      "  return build(cfg, workdir)\n"
      "experiment.build = failing\n"
      "train.run()\n")
  workdir = tmp_path / "run"
  procs, logs = _start(workdir, program=(str(script),))
  t0 = time.monotonic()
  ends = _exit_times(procs, t0, timeout=120)
  for log in logs:
    log.close()
  out1 = pathlib.Path(f"{workdir}.log1").read_text()
  print(f"exits (rc, s): {ends}")
  assert "injected failure" in out1 and "exiting now" in out1
  assert ends[1][0] == 1
  assert ends[0][0] != 0
  assert max(t for _, t in ends.values()) < 90


def test_sigterm_to_one_process_saves_the_same_step_everywhere(tmp_path):
  workdir = tmp_path / "run"
  procs, logs = _start(workdir, "--config.total_steps=50",
                       "--config.checkpoint.every=0")
  metrics = workdir / "metrics.jsonl"
  _wait_for(lambda: metrics.exists() and any(
      json.loads(line)["step"] >= 1
      for line in metrics.read_text().splitlines()), procs, timeout=300)
  procs[1].send_signal(signal.SIGTERM)           # only one host is told
  ends = _exit_times(procs, time.monotonic(), timeout=120)
  for log in logs:
    log.close()
  assert [ends[i][0] for i in range(2)] == [0, 0], pathlib.Path(
      f"{workdir}.log0").read_text()[-3000:]
  saved = checkpointing.TrainCheckpointer(workdir / "checkpoints", keep=3)
  steps = saved.all_steps()
  saved.close()
  assert len(steps) == 1 and 1 <= steps[0] < 50
  assert read_metrics(workdir)[-1]["step"] == steps[0]
