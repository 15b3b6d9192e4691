"""Compile-only GPU devices: XLA:GPU compiling for GPUs that are not there.

`--dry_run_topology=h100:8x1x8` names a GPU kind and its layout, "slices x
hosts x devices per host" (JAX's deviceless GPU topology; `1x1x8` is one
8-GPU host, `8x1x8` sixty-four H100s on eight). The kind picks a target
description shipped beside this module (`targets/*.txtpb`, XLA's
`GpuTargetConfigProto` in text format: device limits, memory size and
bandwidth, compute capability, the cuDNN and CUDA versions compiled for,
the bf16 tensor-core rate), and JAX's CUDA plugin gives devices that
programs lower and compile against (`memory_analysis()`, `as_text()`;
nothing runs). Needs the compile-only pieces of the `[gpu-aot]` extra: the
CUDA plugin wheels matching jax, and the cuDNN wheel for cuDNN's custom
calls (found by the plugin in the same environment; no driver, no GPU).

TPU names (`v5p:4x4x2`) are not GPU kinds: `parse` returns None for them.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import re

import jax

# GPU kind -> its target description in targets/.
TARGET_FILES = {"h100": "h100_sxm_80gb.txtpb", "h200": "h200_sxm_141gb.txtpb"}
_LAYOUT = re.compile(r"^(\d+)x(\d+)x(\d+)$")
# xla_data.proto's PrimitiveType number of bfloat16 (the matrix unit's key).
_BF16 = 16


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """What the estimate and the memory check read from a target description.

  Attributes:
    kind: the name on the command line ("h100").
    name: the device's description string ("NVIDIA H100 80GB HBM3").
    memory_bytes: device memory.
    bandwidth: memory bandwidth, bytes/s.
    bf16_flops: dense bf16 tensor-core peak, FLOP/s (2 per FMA).
    text: the description itself, as the compiler takes it.
    source: the file it came from (package-relative).
  """

  kind: str
  name: str
  memory_bytes: int
  bandwidth: float
  bf16_flops: float
  text: str
  source: str


def _field(text: str, name: str) -> str:
  m = re.search(rf"^\s*{name}:\s*(\S+)", text, re.M)
  if m is None:
    raise ValueError(f"GPU target description: no {name!r} field")
  return m.group(1).strip('"')


def parse_target(kind: str, text: str, source: str = "") -> GpuTarget:
  """A `GpuTarget` from a target description's text (comments allowed)."""
  body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
  unit = re.search(
      r"matrix_unit_description\s*{(.*?)\n  }", body, re.S)
  rate = None
  if unit:
    for info in re.finditer(r"rate_infos\s*{\s*key:\s*(\d+)\s*value\s*{"
                            r"([^}]*)}", unit.group(1)):
      if int(info.group(1)) == _BF16:
        rate = info.group(2)
  if rate is None:
    raise ValueError(f"GPU target {source or kind}: no bf16 rate "
                     f"(matrix_unit_description rate_infos key {_BF16})")
  per_clock = (float(_field(rate, "units_per_core"))
               * float(_field(rate, "ops_per_clock")))
  bf16 = (2.0 * int(_field(body, "core_count")) * per_clock
          * float(_field(rate, "clock_rate_ghz")) * 1e9)
  desc = re.search(r'device_description_str:\s*"([^"]*)"', body)
  return GpuTarget(
      kind=kind, name=desc.group(1) if desc else kind,
      memory_bytes=int(_field(body, "device_memory_size")),
      bandwidth=float(_field(body, "memory_bandwidth")), bf16_flops=bf16,
      text=text, source=source)


def load_target(kind: str) -> GpuTarget:
  """The shipped description of GPU `kind` (a key of `TARGET_FILES`)."""
  if kind not in TARGET_FILES:
    raise ValueError(f"GPU kind {kind!r}: known kinds are "
                     f"{', '.join(sorted(TARGET_FILES))}")
  name = TARGET_FILES[kind]
  text = (importlib.resources.files(__package__) / "targets" / name
          ).read_text()
  return parse_target(kind, text, f"brorl_jax/aot/targets/{name}")


@dataclasses.dataclass(frozen=True)
class GpuTopology:
  """`kind:SxHxD`: S slices x H hosts x D devices per host of one GPU kind."""

  target: GpuTarget
  slices: int
  hosts: int
  per_host: int

  @property
  def layout(self) -> str:
    return f"{self.slices}x{self.hosts}x{self.per_host}"

  @property
  def num_devices(self) -> int:
    return self.slices * self.hosts * self.per_host

  def __str__(self) -> str:
    return f"{self.target.kind}:{self.layout}"


def parse(spec: str) -> GpuTopology | None:
  """`"h100:8x1x8"` -> GpuTopology; None when `spec` names no GPU kind.

  Raises:
    ValueError: a GPU kind with a malformed layout (the message names the
      expected form).
  """
  kind, _, layout = spec.partition(":")
  kind = kind.strip().lower()
  if kind not in TARGET_FILES:
    return None
  m = _LAYOUT.match(layout.strip())
  if m is None or min(int(x) for x in m.groups()) < 1:
    raise ValueError(
        f"--dry_run_topology={spec}: a GPU topology is "
        f"'<kind>:<slices>x<hosts>x<devices per host>', e.g. {kind}:8x1x8 "
        "for 64 GPUs on 8 hosts, or " f"{kind}:1x1x8 for one 8-GPU host")
  return GpuTopology(load_target(kind), *(int(x) for x in m.groups()))


def plugin_missing() -> str | None:
  """Why the GPU compiler cannot run here (None: its pieces are installed)."""
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    return ("the CUDA plugin is not installed: pip install -e '.[gpu-aot]' "
            f"(jax-cuda12-plugin/-pjrt=={jax.__version__}, compile only)")
  return None


def devices(topology: GpuTopology):
  """The topology's compile-only devices (XLA:GPU, ahead of time).

  Raises:
    RuntimeError: the plugin is missing, or JAX cannot describe the
      topology (the message says why and what to do).
  """
  missing = plugin_missing()
  if missing:
    raise RuntimeError(missing)
  # Imported here: jax.experimental.topologies is needed only by ahead-of-
  # time compiles, and this keeps it inside the error handling below.
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(
        topology.target.kind, "cuda", target_config=topology.target.text,
        topology=topology.layout).devices
  except Exception as e:  # noqa: BLE001 (the plugin raises several kinds)
    first = (str(e).splitlines() or [""])[0]
    hint = ("; run with JAX_PLATFORMS=cpu (without a GPU the CUDA plugin "
            "fails to start otherwise)" if "not implemented for cuda"
            in first else "")
    raise RuntimeError(f"JAX cannot describe GPU topology {topology} "
                       f"({type(e).__name__}: {first}){hint}") from None
