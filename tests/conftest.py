"""Shared test setup: 8 fake CPU devices, a persistent compilation cache.

The environment is set before JAX initialises its backend, so every test in
the session sees 8 CPU devices and can build real meshes (1x8x1, 2x2x2, ...).
Subprocesses started by tests (CLI and multi-process tests) inherit the same
variables and share the compilation cache.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# With libtpu installed (extra tpu-aot), skip its GCE metadata lookups.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_threefry_partitionable", True)

# Real tokenizer files and math benchmarks, copied into the repository so a
# clean clone has them (provenance in each folder's README).
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
  """The one shared tiny model config (real classes, toy size), f32."""
  from brorl_jax.model.config import model_config
  return model_config("tiny")


@pytest.fixture(scope="session")
def tiny_policy(tiny_cfg):
  from brorl_jax.model.transformer import Policy
  return Policy.create(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_params(tiny_policy):
  """Random tiny parameters on one device (non-zero biases and norms)."""
  import jax.numpy as jnp
  import numpy as np
  params = tiny_policy.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    if "bias" in name or "scale" in name:
      return x + jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(perturb, params)
