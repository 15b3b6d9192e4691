"""All orbax calls live here (orbax v0 `CheckpointManager` vs v1 still moves).

Two on-disk forms:
  * a *model directory* (`hf import`, a fresh init): `params/` (orbax
    StandardCheckpointer), `model_config.json`, `tokenizer/`;
  * a *training workdir*: `checkpoints/<step>/` (the CheckpointManager's
    items: train state, data iterator, rng, metadata), `model_config.json`,
    `tokenizer/`.
Restores always go into an abstract target that carries the wanted sharding,
so a checkpoint restores onto a different mesh.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def save_params(path: str | pathlib.Path, params: Any) -> None:
  """Saves a parameter tree (blocking; all processes call it)."""
  path = pathlib.Path(path).absolute()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()


def restore_params(path: str | pathlib.Path, target: Any) -> Any:
  """Restores a parameter tree into `target` (ShapeDtypeStructs with
  shardings, or arrays whose shardings are reused)."""
  path = pathlib.Path(path).absolute()
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None)),
      target)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract)


def abstract_with_shardings(abstract: Any, shardings: Any | None) -> Any:
  """Attaches shardings to a tree of ShapeDtypeStructs (None: default)."""
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=device), abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=s), abstract, shardings)


def load_policy_params(workdir: str | pathlib.Path, step: int | None = None,
                       shardings: Any | None = None):
  """Loads the policy parameters of a model directory or training workdir.

  Args:
    workdir: a model directory (`params/`) or a training workdir
      (`checkpoints/`).
    step: checkpoint step of a training workdir (default: latest).
    shardings: target shardings (default: one device).

  Returns:
    (ModelConfig, params, tokenizer directory or None).
  """
  from brorl_jax.hf import load_model_config
  from brorl_jax.model.transformer import Policy
  workdir = pathlib.Path(workdir)
  cfg = load_model_config(workdir)
  target = abstract_with_shardings(Policy.create(cfg).abstract_params(),
                                   shardings)
  tokenizer_dir = workdir / "tokenizer"
  tokenizer_dir = tokenizer_dir if tokenizer_dir.exists() else None
  if (workdir / "checkpoints").exists():
    params = restore_train_params(workdir / "checkpoints", target, step)
  elif (workdir / "params").exists():
    if step is not None:
      raise ValueError(f"{workdir} is a model directory without steps; "
                       "drop --step")
    params = restore_params(workdir / "params", target)
  else:
    raise FileNotFoundError(
        f"{workdir} has neither checkpoints/ nor params/: nothing to load")
  return cfg, params, tokenizer_dir


def restore_train_params(checkpoint_dir: pathlib.Path, target: Any,
                         step: int | None) -> Any:
  """The policy parameters of a training checkpoint (see `TrainCheckpointer`).
  """
  raise NotImplementedError("training checkpoints arrive with the RL loop")
