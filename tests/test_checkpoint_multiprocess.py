"""Two processes restoring one checkpoint directory take one decision
(issue 36.3): a transient error on one of them is retried and moves nothing;
damage that only one of them sees makes both fall back to the same step."""

import json
import os
import pathlib
import re
import subprocess
import sys

import portpicker
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_two_processes_restore_the_same_step(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2"
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.checkpoint_two_processes", str(port),
       str(i), str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outputs
  results = [json.loads((tmp_path / f"result_{i}.json").read_text())
             for i in range(2)]
  assert results[0] == results[1], results
  transient, damage = results[0]["transient"], results[0]["damage"]
  assert transient == {"step": 3, "w": 3.0, "steps_left": [1, 2, 3],
                       "damaged": []}
  assert damage == {"step": 2, "w": 2.0, "steps_left": [1, 2],
                    "damaged": ["3"]}
