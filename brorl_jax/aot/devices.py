"""The devices a dry run compiles for, and each one's memory.

This machine's devices (CPU devices faked to the target's count with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`), a TPU topology's
(`--dry_run_topology v5p:4x4x2`: JAX's ahead-of-time topologies, libtpu
installed) or a GPU topology's (`--dry_run_topology h100:8x1x8`: the CUDA
plugin's compile-only devices, `topology.py`).
"""

from __future__ import annotations

import re
import sys

import jax

from brorl_jax.aot import topology as gpu_topology

GiB = 2**30
# HBM per chip (GB) of TPU generations, by topology-name prefix.
TPU_HBM_GB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
DEFAULT_GB = 80.0  # H100


def tpu_devices(topology: str):
  try:
    # Imported here: inside the try, so a JAX without it reports below.
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu",
                                        topology_name=topology).devices
  except Exception as e:  # ImportError, or libtpu missing / bad name
    raise SystemExit(
        f"error: --dry_run_topology={topology}: JAX cannot describe this TPU "
        f"topology here ({type(e).__name__}: {str(e).splitlines()[0]}). "
        "Install libtpu (pip install -e '.[tpu]') and name it as "
        "'<generation>:<chips x y z>', e.g. v5p:4x4x2 for a v5p-64 slice "
        "(32 chips, 64 TensorCores)") from None


def gpu_topology_of(topology: str | None):
  """The GPU topology `topology` names (None: none, or a TPU's name)."""
  if not topology:
    return None
  try:
    return gpu_topology.parse(topology)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


def gpu_devices(gpu):
  """The compile-only devices of a GPU topology (exit 2 naming the fix)."""
  try:
    return gpu_topology.devices(gpu)
  except RuntimeError as e:
    print(f"error: --dry_run_topology={gpu}: {e}", file=sys.stderr)
    raise SystemExit(2) from None


def target_devices(topology: str | None):
  """(devices, GPU topology or None) for `--dry_run_topology` (None: the
  devices JAX has)."""
  gpu = gpu_topology_of(topology)
  if gpu:
    return gpu_devices(gpu), gpu
  return (tpu_devices(topology) if topology else jax.devices()), None


def default_memory_gib(devices, topology: str | None) -> tuple[float, str]:
  """(memory per device in GiB, where that figure comes from)."""
  gpu = gpu_topology_of(topology)
  if gpu:
    return (gpu.target.memory_bytes / GiB,
            f"{gpu.target.name}, {gpu.target.source}")
  if topology:
    gen = re.split(r"[:-]", topology)[0].lower()
    if gen in TPU_HBM_GB:
      return TPU_HBM_GB[gen], f"{gen} HBM per chip"
  stats = getattr(devices[0], "memory_stats", lambda: None)()
  if stats and stats.get("bytes_limit"):
    return stats["bytes_limit"] / GiB, "this device's JAX memory limit"
  return DEFAULT_GB, "an H100's 80 GiB (set --device_memory_gb)"
