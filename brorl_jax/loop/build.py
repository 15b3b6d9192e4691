"""One builder of the run: the parts the train loop, the dry run, `evaluate`
and `sample` share, built in one place so they cannot drift apart.

From a validated `RunConfig` and the policy's `ModelConfig` alone (no
workdir, no tokenizer, no parameter materialized):

  mesh rules   the mesh with its training (FSDP) and sampling rule tables
  policy       the model definition and its parameter layouts
  optimizer    AdamW on the step's sample count (`samples_per_step`)
  state        the TrainState's shardings, its abstract (sharded) tree and
               the jitted `create` into that layout
  sampler      the in-mesh sampler on the sampling layout

and where a policy comes from (`PolicySource`: a brorl_jax model directory
or training workdir, or a Hugging Face directory), resolved once from
`init.path` (or `--workdir` / `--hf_dir`) for its config, parameters and
tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from brorl_jax import checkpointing, hf
from brorl_jax.config import ConfigError
from brorl_jax.model.config import ModelConfig
from brorl_jax.model.sharding import (SAMPLE_RULES, TRAIN_RULES, MeshRules,
                                      make_mesh)
from brorl_jax.model.transformer import Policy
from brorl_jax.rl import train_state as ts_lib
from brorl_jax.rollout import Sampler, SamplerConfig
from brorl_jax.run_config import RunConfig

HF_CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


# ---- where a policy comes from ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicySource:
  """A directory holding a policy.

  Attributes:
    path: the directory.
    kind: "brorl_jax" (`model_config.json` with `params/`, an `hf import`
      output, or a training workdir's `checkpoints/`) or "hf" (a Hugging
      Face `config.json` with safetensors).
  """

  path: pathlib.Path
  kind: str

  @classmethod
  def find(cls, path: str | os.PathLike) -> "PolicySource | None":
    """The source at `path`, or None when it holds neither kind."""
    path = pathlib.Path(path)
    if (path / checkpointing.MODEL_CONFIG_FILE).exists():
      return cls(path, "brorl_jax")
    if (path / HF_CONFIG_FILE).exists():
      return cls(path, "hf")
    return None

  @classmethod
  def at(cls, path: str | os.PathLike, key: str = "init.path"
         ) -> "PolicySource":
    """The source at `path`; a ConfigError naming `key` when neither kind."""
    source = cls.find(path)
    if source is None:
      raise ConfigError(
          f"config key '{key}': {path} is neither a brorl_jax model "
          f"directory ({checkpointing.MODEL_CONFIG_FILE}) nor a Hugging Face "
          f"directory ({HF_CONFIG_FILE})")
    return source

  def model_config(self, **overrides: Any) -> ModelConfig:
    """The stored model config with `overrides` (dtypes, remat, backend)."""
    if self.kind == "brorl_jax":
      base = checkpointing.load_model_config(self.path)
    else:
      base = hf.config_from_hf(json.loads(
          (self.path / HF_CONFIG_FILE).read_text()))
    return base.replace(**overrides)

  def load_params(self, model_cfg: ModelConfig, shardings: Any, *,
                  step: int | None = None, progress: str | None = None
                  ) -> tuple[Any, int | None]:
    """(parameters in `shardings`, the checkpoint step or None).

    A training workdir gives its latest checkpoint (or `step`); a model
    directory its `params/`; a Hugging Face directory its safetensors in
    `model_cfg.param_dtype`.
    """
    if self.kind == "hf":
      return hf.load_hf_params(self.path, model_cfg, shardings,
                               progress=progress), None
    if (self.path / "checkpoints").exists() and step is None:
      ckpt = checkpointing.TrainCheckpointer(self.path / "checkpoints",
                                             keep=1, async_save=False)
      step = ckpt.latest_step()
      ckpt.close()
    _, params, _ = checkpointing.load_policy_params(self.path, step,
                                                    shardings)
    return params, step

  @property
  def tokenizer_dir(self) -> pathlib.Path:
    """Where its tokenizer files are (`tokenizer/`, else the directory)."""
    sub = self.path / TOKENIZER_DIR
    return sub if sub.exists() else self.path


def numerics(cfg: RunConfig) -> dict[str, Any]:
  """The run's choices a stored model config takes over (dtypes, remat,
  the platform's attention backend)."""
  m = cfg.model
  return dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
              attention_backend=m.attention_backend)


def mesh_rules(mesh: Any) -> tuple[MeshRules, MeshRules]:
  """(training rules, sampling rules) on `mesh`."""
  return MeshRules(mesh, TRAIN_RULES), MeshRules(mesh, SAMPLE_RULES)


# ---- the run's device-side parts ---------------------------------------------


def samples_per_step(cfg: RunConfig) -> int:
  """The rollouts one step trains on: the adaptive allocation's budget, or
  prompts_per_step x n. The optimizer's lr rule (`OptimConfig.peak_lr`)
  scales with it, so the loop and the dry run read it here."""
  allocation = cfg.allocation()
  if allocation is not None:
    return allocation.budget
  return cfg.loop.prompts_per_step * cfg.rollout.n


@dataclasses.dataclass
class RunBuild:
  """The run's mesh, policy, optimizer, state layout and sampler.

  Attributes:
    cfg: the run config.
    policy: the model definition.
    mesh_train / mesh_sample: the mesh with the training (FSDP) and
      sampling (no FSDP) rule tables.
  """

  cfg: RunConfig
  policy: Policy
  mesh_train: MeshRules
  mesh_sample: MeshRules

  @classmethod
  def create(cls, cfg: RunConfig, model_cfg: ModelConfig, *,
             mesh: Any = None, devices: Sequence[Any] | None = None
             ) -> "RunBuild":
    """The parts of `cfg` with `model_cfg`, on `mesh` (default: a mesh of
    `cfg.mesh.shape` over `devices`, default all)."""
    if mesh is None:
      mesh = make_mesh(cfg.mesh.shape, devices)
    train, sample = mesh_rules(mesh)
    return cls(cfg=cfg, policy=Policy.create(model_cfg), mesh_train=train,
               mesh_sample=sample)

  @property
  def model_cfg(self) -> ModelConfig:
    return self.policy.cfg

  def param_shardings(self, sampling: bool = False) -> Any:
    return self.policy.shardings(self.mesh_sample if sampling
                                 else self.mesh_train)

  def prompts_to_sample(self) -> int:
    """Prompts sampled per step (P, times the oversampling factor)."""
    return self.cfg.advantage.prompts_to_sample(
        self.cfg.loop.prompts_per_step)

  # ---- optimizer and state -------------------------------------------------

  @property
  def samples_per_step(self) -> int:
    return samples_per_step(self.cfg)

  @functools.cached_property
  def optimizer(self) -> optax.GradientTransformation:
    return ts_lib.make_optimizer(self.cfg.optim, self.samples_per_step)

  @functools.cached_property
  def lr_schedule(self) -> optax.Schedule:
    return self.cfg.optim.schedule_fn(self.samples_per_step)

  @property
  def with_reference(self) -> bool:
    """A reference policy is held (the KL term is on)."""
    return self.cfg.loss.kl_coef > 0

  @functools.cached_property
  def state_shardings(self) -> ts_lib.TrainState:
    return ts_lib.state_shardings(
        self.policy.abstract_params(), self.param_shardings(), self.optimizer,
        with_reference=self.with_reference,
        replicated=self.mesh_train.replicated())

  @functools.cached_property
  def abstract_state(self) -> ts_lib.TrainState:
    """The TrainState as ShapeDtypeStructs carrying its shardings (restore
    targets, AOT compiles)."""
    return checkpointing.abstract_with_shardings(
        jax.eval_shape(self._create, self.policy.abstract_params()),
        self.state_shardings)

  @functools.cached_property
  def make_state(self):
    """Jitted `params -> TrainState` in `state_shardings`."""
    return jax.jit(self._create, out_shardings=self.state_shardings)

  def _create(self, params: Any) -> ts_lib.TrainState:
    return ts_lib.TrainState.create(params, self.optimizer,
                                    with_reference=self.with_reference)

  # ---- sampling ------------------------------------------------------------

  @property
  def sample_dtype(self) -> str:
    """The sampling copy's dtype (`rollout.param_dtype`, default the
    compute dtype)."""
    return self.cfg.loop.sample_dtype(self.model_cfg)

  @functools.cached_property
  def abstract_sample_params(self) -> Any:
    """The sampling copy, abstract: the sampling layout, floats in
    `sample_dtype` (the loop's reshard casts them)."""
    dtype = jnp.dtype(self.sample_dtype)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype),
                            self.policy.abstract_params())
    return checkpointing.abstract_with_shardings(
        abstract, self.param_shardings(sampling=True))

  def make_sampler(self, sampler_cfg: SamplerConfig | None = None, *,
                   stop_ids: Sequence[int], pad_id: int) -> Sampler:
    """The sampler (default settings: `rollout`) on the sampling layout."""
    return Sampler(self.policy, sampler_cfg or self.cfg.rollout,
                   stop_ids=stop_ids, pad_id=pad_id,
                   mesh_rules=self.mesh_sample)


def model_config(cfg: RunConfig, source: PolicySource | None) -> ModelConfig:
  """The policy's config: `source`'s with the run's numerics, or the
  config's `model` section when there is no source."""
  if source is None:
    return cfg.model
  return source.model_config(**numerics(cfg))
