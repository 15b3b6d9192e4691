"""The dry run on the GPU compiler, for two H100s that are not there.

Needs the compile-only CUDA plugin and cuDNN (`pip install -e
'.[gpu-aot]'`, ENV.md §13); skipped without them. A tiny run compiles every
program the loop runs with cuDNN (bf16, an odd update length: 40 + 10 - 1)
and with the Pallas GPU kernel in float32 at head dim 128, the two paths
the GPU compiler once rejected (an odd cuDNN training length; the float32
kernel's shared memory).
"""

import importlib.util
import pathlib
import sys

import pytest

from brorl_jax import run_config, sizing
from brorl_jax.aot import topology
from brorl_jax.loop import programs
from brorl_jax.model.sharding import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.configs import tiny_rl  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        topology.plugin_missing() is not None
        or importlib.util.find_spec("nvidia.cudnn") is None,
        reason="the [gpu-aot] extra (CUDA plugin, cuDNN) is not installed"),
    pytest.mark.slow,
]


def _config(backend: str, dtype: str):
  c = tiny_rl.get_config()
  c.mesh.shape = (2, 1, 1)
  c.model.attention_backend = backend
  c.model.dtype = dtype
  c.model.head_dim = 128
  c.eval.every = 0               # the evaluation's programs: the recipes'
  return run_config.load(c)


def _run(backend: str, dtype: str):
  lines = []
  result = sizing.dry_run(_config(backend, dtype), topology="h100:1x1x2",
                          out=lines.append)
  return result, "\n".join(lines)


def test_every_program_compiles_for_two_h100s_with_cudnn():
  result, text = _run("auto", "bfloat16")       # auto on GPU = cudnn
  assert "XLA:GPU compiler, NVIDIA H100 80GB HBM3, topology h100:1x1x2" \
      in text
  assert result["compiler"].startswith("XLA:GPU")
  assert result["target"]["devices"] == 2 and result["fits"]
  programs = result["attention_backends"]
  assert programs["update"] == programs["prefill"] == "cudnn"
  assert any(n.startswith("refill segment") for n in programs)
  decode = [n for n in programs if n.startswith("decode chunk")]
  assert decode and all(programs[n].endswith("pallas_gpu decode kernel")
                        for n in decode)
  e = result["estimate"]
  assert 0 < e["decode_s"] < e["step_s"]
  assert e["generation_samples_per_s"] > 0
  assert "estimate (NVIDIA H100 80GB HBM3 roofline" in text


def test_pallas_gpu_update_compiles_in_float32_at_head_dim_128():
  # The update alone (the other programs share the cuDNN run's kernels):
  # float32 blocks of 128 asked more shared memory than an H100 has.
  c = _config("pallas_gpu", "float32")
  devices = topology.devices(topology.parse("h100:1x1x2"))
  model_cfg, _ = programs.model_config(c)
  builder = programs.StepPrograms(c, model_cfg,
                                  make_mesh(c.mesh.shape, devices), 2)
  text = builder.update().compile().as_text()
  assert "__gpu$xla.gpu.triton" in text
