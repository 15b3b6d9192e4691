"""`bench gpu --tiny` end to end on CPU: every part runs, every key."""

import json
import os
import pathlib
import subprocess
import sys

from brorl_jax.bench import gpu

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_gpu_tiny_runs_every_part_and_writes_every_key(tmp_path):
  path = tmp_path / "gpu.json"
  out = subprocess.run(
      [sys.executable, "-m", "brorl_jax.bench", "gpu", "--tiny", "--json",
       str(path)], cwd=ROOT, capture_output=True, text=True, timeout=1800,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  res = json.loads(path.read_text())
  assert set(gpu.KEYS) <= set(res)
  missing = [k for k in gpu.KEYS if res[k] is None]
  assert not missing, missing
  assert res["ok"] and not res["errors"] and not res["skipped"]
  assert res["kernels_passed"] == len(res["kernels"]) == 2
  assert res["kernels_failed"] == 0
  assert set(res["decode_tokens_per_s"]) == {
      "N512_fixed", "N512_refill", "N16_fixed", "N16_refill"}
  assert all(v > 0 for v in res["decode_tokens_per_s"].values())
  for n in ("N512", "N16"):
    d = res["decode"][n]
    assert d["decode_step"]["flops"] > 0 and d["decode_step"]["bytes"] > 0
    for mode in ("fixed", "refill"):
      assert d[mode]["expected_s"] > 0 and d[mode]["decode_steps"] > 0
  up = res["update"]
  assert up["skipped_minibatches"] == 0 and up["tflops_per_s"] > 0
  assert up["expected_s"] > 0 and up["xla_flops"] > 0
  assert res["update_tflops_per_s"] == up["tflops_per_s"]
  assert set(res["part_seconds"]) == {"kernels", "decode", "update"}
