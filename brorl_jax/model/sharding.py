"""Mesh construction and logical-axis sharding rules.

Every parameter carries logical axis names (its `axes` metadata, e.g.
`("embed", "mlp")`), and so do the main activations. One small rule table per
layout maps logical names to the mesh axes `("data", "fsdp", "tensor")`:

  * `TRAIN_RULES`: parameters sharded over `fsdp` (ZeRO-3 style) and `tensor`;
  * `SAMPLE_RULES`: no FSDP while decoding (every decode step would otherwise
    all-gather all the weights), tensor parallelism kept.

Parameters move between the two layouts on device, by a jitted identity with
other `out_shardings` (`reshard`), never through the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from brorl_jax.config import check

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names. Parameters: vocab, embed, q_heads, kv_heads, head_dim,
# mlp, norm. Activations: batch (rows, or prompts P in the sampler), group
# (G), length, act_embed, act_heads, act_kv, act_mlp, act_vocab.
Rules = tuple[tuple[str, Any], ...]

TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    # Rollouts of a group take the data axes when the prompts could not
    # (P = 1 with G = 512): a mesh axis is never used twice in one spec.
    ("group", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
SAMPLE_RULES: Rules = tuple(r for r in TRAIN_RULES if r[0] != "embed")


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None
              ) -> Mesh:
  """Builds a `(data, fsdp, tensor)` mesh with classic (Auto) GSPMD axes.

  Args:
    shape: sizes of the three axes; one entry may be -1 (fill with the rest of
      the devices).
    devices: devices to use; all devices by default.

  Returns:
    The mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  check(len(shape) == 3, "mesh.shape",
        f"needs 3 sizes for axes {MESH_AXES}, got {shape}")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    check(shape.count(-1) == 1 and len(devices) % known == 0, "mesh.shape",
          f"cannot fill -1 in {shape} with {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  check(int(np.prod(shape)) == len(devices), "mesh.shape",
        f"{shape} needs {int(np.prod(shape))} devices, "
        f"{len(devices)} are available")
  # jax.make_mesh orders devices for the physical topology (ICI rings on TPU,
  # NVLink islands on GPU); jax 0.10 defaults to Explicit axes, we want Auto.
  return jax.make_mesh(tuple(shape), MESH_AXES,
                       axis_types=(AxisType.Auto,) * 3, devices=devices)


@dataclasses.dataclass(frozen=True)
class MeshRules:
  """A mesh and a logical-to-mesh rule table.

  Attributes:
    mesh: the device mesh.
    rules: (logical name, mesh axis or tuple of mesh axes or None) pairs.
  """

  mesh: Mesh
  rules: Rules

  def spec(self, axes: Sequence[str | None],
           shape: Sequence[int] | None = None) -> PartitionSpec:
    """The PartitionSpec of an array with logical `axes`.

    A mesh axis that does not divide the dimension is dropped (that dimension
    is replicated over it), and no mesh axis is used twice.
    """
    table = dict(self.rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
      target = table.get(name) if name is not None else None
      if target is None:
        out.append(None)
        continue
      target = (target,) if isinstance(target, str) else tuple(target)
      kept = []
      size = 1
      for axis in target:
        n = self.mesh.shape[axis]
        if axis in used or n == 1:
          continue
        if shape is not None and shape[i] % (size * n) != 0:
          continue
        kept.append(axis)
        size *= n
      used.update(kept)
      out.append(tuple(kept) if len(kept) > 1 else
                 (kept[0] if kept else None))
    return PartitionSpec(*out)

  def sharding(self, axes: Sequence[str | None],
               shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(axes, shape))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())


_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_rules(mesh_rules: MeshRules | None) -> Iterator[None]:
  """Makes `constrain` annotate activations with `mesh_rules` while tracing."""
  previous = getattr(_ACTIVE, "value", None)
  _ACTIVE.value = mesh_rules
  try:
    yield
  finally:
    _ACTIVE.value = previous


def active_mesh_rules() -> MeshRules | None:
  """The rules of the enclosing `activation_rules`, or None."""
  return getattr(_ACTIVE, "value", None)


def active_platform() -> str:
  """"cpu", "gpu" or "tpu": the active mesh's devices (an ahead-of-time
  topology mesh names the target, not this host), else JAX's default."""
  rules = active_mesh_rules()
  if rules is not None:
    platform = rules.mesh.devices.flat[0].platform
  else:
    platform = jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical axes; a no-op outside `activation_rules`."""
  mesh_rules = getattr(_ACTIVE, "value", None)
  if mesh_rules is None:
    return x
  return jax.lax.with_sharding_constraint(
      x, mesh_rules.sharding(axes, x.shape))


def constrain_merged(x: jax.Array, lead_axes: Sequence[str | None],
                     lead_shape: Sequence[int],
                     rest_axes: Sequence[str | None]) -> jax.Array:
  """Constrains `x` whose first dimension is `lead_shape` flattened.

  The flat dimension takes the mesh axes its parts would take, major part
  first, as long as that splits it into the same contiguous blocks: a part
  may add its axes only if every part before it holds one index per device
  (e.g. P prompts over the data axes; or P = 1 and its G rollouts over
  them). Axes of later parts are dropped (those parts stay whole on each
  device). A no-op outside `activation_rules`.
  """
  sharding = merged_sharding(x.shape, lead_axes, lead_shape, rest_axes)
  if sharding is None:
    return x
  return jax.lax.with_sharding_constraint(x, sharding)


def merged_sharding(shape: Sequence[int], lead_axes: Sequence[str | None],
                    lead_shape: Sequence[int],
                    rest_axes: Sequence[str | None]) -> NamedSharding | None:
  """The sharding `constrain_merged` gives an array of `shape` (None outside
  `activation_rules`); kernels run under `shard_map` with its spec."""
  mesh_rules = getattr(_ACTIVE, "value", None)
  if mesh_rules is None:
    return None
  lead = mesh_rules.spec(lead_axes, lead_shape)
  merged: list[str] = []
  for part, size in zip(lead, lead_shape):
    part = () if part is None else ((part,) if isinstance(part, str)
                                     else tuple(part))
    merged.extend(part)
    if size // int(np.prod([mesh_rules.mesh.shape[a] for a in part])) != 1:
      break      # more than one index per device: later parts interleave
  rest = mesh_rules.spec(rest_axes, shape[1:])
  flat = (tuple(merged) if len(merged) > 1 else
          (merged[0] if merged else None))
  return NamedSharding(mesh_rules.mesh, PartitionSpec(flat, *rest))


def param_shardings(abstract_params: Any, axes_tree: Any,
                    mesh_rules: MeshRules) -> Any:
  """NamedShardings for a parameter tree, from its logical axes tree."""
  return jax.tree.map(
      lambda a, axes: mesh_rules.sharding(axes, a.shape), abstract_params,
      axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def reshard(tree: Any, shardings: Any, dtype: Any = None) -> Any:
  """Moves arrays to other shardings on device (a jitted identity).

  Used to go from the training layout (FSDP) to the sampling layout without a
  round trip through the host. The input is not donated: the trainer keeps
  its copy.

  Args:
    tree: arrays to move.
    shardings: their target shardings (a matching tree).
    dtype: if given, floating-point leaves are cast to it in the same
      program (the sampler's bf16 copy of f32 master weights: cast once,
      moved at half the bytes).
  """
  def move(t):
    if dtype is None:
      return t
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(
        x.dtype, jnp.floating) else x, t)
  return jax.jit(move, out_shardings=shardings)(tree)
