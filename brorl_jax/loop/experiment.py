"""Assembles the parts of a run from a validated `RunConfig`.

The entry points (`train`, `evaluate`, `sample`) read the ConfigDict once,
turn it into a `RunConfig` (run_config.load), and build what they need here: the
mesh and its two rule tables, the tokenizer (copied into, or trained for, the
workdir), the policy, its initial parameters, the prompt pipeline, the reward
pool and samplers. Library code below this module only sees typed configs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from brorl_jax import checkpointing, distributed, hf, rewards
from brorl_jax.config import ConfigError, check
from brorl_jax.data import records as records_lib
from brorl_jax.data import tasks
from brorl_jax.data import tokenizer as tokenizer_lib
from brorl_jax.data import tokenizer_loader
from brorl_jax.data.prompts import PromptPipeline
from brorl_jax.model.config import ModelConfig
from brorl_jax.model.sharding import (SAMPLE_RULES, TRAIN_RULES, MeshRules,
                                      make_mesh)
from brorl_jax.model.transformer import Policy
from brorl_jax.rollout import Sampler, SamplerConfig
from brorl_jax.run_config import RunConfig

log = logging.getLogger(__name__)
TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"


def setup_jax(cfg: RunConfig) -> None:
  """Process-wide JAX settings, and jax.distributed when configured.

  Random draws must not depend on how arrays are sharded (the sampler's
  determinism across meshes relies on it).
  """
  jax.config.update("jax_threefry_partitionable", True)
  distributed.initialize(cfg.mesh)


@dataclasses.dataclass
class Experiment:
  """The built parts shared by the entry points.

  Attributes:
    cfg: the run config.
    workdir: the run's directory.
    mesh_train / mesh_sample: the mesh with the training (FSDP) and
      sampling (no FSDP) rule tables.
    tokenizer: the run's tokenizer (saved under `workdir/tokenizer`).
    model_cfg: the policy's model config (from the checkpoint when one is
      imported; written to `workdir/model_config.json`).
    policy: the model definition.
  """

  cfg: RunConfig
  workdir: pathlib.Path
  mesh_train: MeshRules
  mesh_sample: MeshRules
  tokenizer: tokenizer_lib.Tokenizer
  model_cfg: ModelConfig
  policy: Policy

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  # ---- parameters ----------------------------------------------------------

  def param_shardings(self, sampling: bool = False) -> Any:
    return self.policy.shardings(self.mesh_sample if sampling
                                 else self.mesh_train)

  def initial_params(self) -> Any:
    """Fresh, imported (model dir) or HF parameters, in the train layout."""
    shardings = self.param_shardings()
    path = self.cfg.init.path
    if path is None:
      # A fresh model the warm start trains takes the warm start's seed.
      seed = self.cfg.seed
      if self.cfg.warmstart.steps:
        seed = self.cfg.warmstart.resolved_seed(seed)
      rng = jax.random.fold_in(jax.random.key(seed), 0)
      return self.policy.init(rng, self.mesh_train)
    path = pathlib.Path(path)
    if (path / checkpointing.MODEL_CONFIG_FILE).exists():
      _, params, _ = checkpointing.load_policy_params(path,
                                                      shardings=shardings)
      return params
    return hf.load_hf_params(path, self.model_cfg, shardings,
                             progress=self.cfg.logging.progress)

  # ---- parts ---------------------------------------------------------------

  def pipeline(self) -> PromptPipeline:
    data_cfg = self.cfg.data
    spec = data_cfg.synthetic
    if spec is not None:
      directory = str(self.workdir / DATA_DIR)
      if self.is_main:
        tasks.materialize(directory, task=spec["task"],
                          train=int(spec["train"]),
                          eval=int(spec.get("eval", 0)),
                          seed=int(spec.get("seed", 0)),
                          difficulty=tuple(spec.get("difficulty", (1,))))
      _barrier("synthetic data")
      train, held_out = tasks.materialize(
          directory, task=spec["task"], train=int(spec["train"]),
          eval=int(spec.get("eval", 0)), seed=int(spec.get("seed", 0)),
          difficulty=tuple(spec.get("difficulty", (1,))))
      data_cfg = dataclasses.replace(
          data_cfg, synthetic=None,
          train_files=(train,) + tuple(data_cfg.train_files),
          eval_files=((held_out,) if held_out else ()) +
          tuple(data_cfg.eval_files))
    # Every host reads the whole (small) prompt batch: whichever host a
    # rollout is decoded on then holds its record and can score it, for any
    # mesh layout. Device arrays take only the host's own rows
    # (`global_prompt_arrays`).
    return PromptPipeline(
        data_cfg, self.tokenizer, max_prompt_len=self.cfg.rollout
        .max_prompt_len, prompts_per_step=self.prompts_to_sample(),
        process_index=0, process_count=1,
        known_verifiers=set(rewards.VERIFIERS))

  def prompts_to_sample(self) -> int:
    """Prompts sampled per step (P, times the oversampling factor)."""
    return self.cfg.advantage.prompts_to_sample(
        self.cfg.loop.prompts_per_step)

  def reward_pool(self):
    return rewards.RewardPool(self.cfg.rewards)

  def sampler(self, sampler_cfg: SamplerConfig | None = None) -> Sampler:
    return Sampler(self.policy, sampler_cfg or self.cfg.rollout,
                   stop_ids=self.tokenizer.stop_ids,
                   pad_id=self.tokenizer.pad_id, mesh_rules=self.mesh_sample)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _training_lines(cfg: RunConfig, workdir: pathlib.Path) -> list[str]:
  """Text a fresh SentencePiece tokenizer is trained on: the training
  prompts (rendered) and their worked solutions."""
  specs = list(cfg.data.train_files) + list(cfg.data.eval_files)
  if cfg.data.synthetic is not None:
    s = cfg.data.synthetic
    specs = [p for p in tasks.materialize(
        str(workdir / DATA_DIR), task=s["task"], train=int(s["train"]),
        eval=int(s.get("eval", 0)), seed=int(s.get("seed", 0)),
        difficulty=tuple(s.get("difficulty", (1,)))) if p] + specs
  lines = []
  for spec in specs:
    result = records_lib.read_records(records_lib.FileSpec.parse(spec),
                                      skip_bad_rows=True)
    for r in result.records:
      lines.append(r.prompt or " ".join(m["content"] for m in r.messages))
      lines.append(str(r.meta.get("solution", r.answer)))
  lines.append(cfg.data.instruction)
  if cfg.data.system_prompt:
    lines.append(cfg.data.system_prompt)
  return [x for x in lines if x]


def prepare_tokenizer(cfg: RunConfig, workdir: pathlib.Path
                      ) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, copied into (or trained for) `workdir/tokenizer`.

  Order: an existing `workdir/tokenizer` (resume); `init.tokenizer`; the
  tokenizer of `init.path`; else a SentencePiece model trained on the
  training prompts and solutions (the CPU demo). Process 0 writes it; the
  others wait and load the same files.
  """
  target = workdir / TOKENIZER_DIR
  if jax.process_index() == 0 and not target.exists():
    source = cfg.init.tokenizer
    if source is None and cfg.init.path is not None:
      path = pathlib.Path(cfg.init.path)
      source = path / TOKENIZER_DIR if (path / TOKENIZER_DIR).exists() \
          else path
    tmp = workdir / (TOKENIZER_DIR + ".tmp")
    if source is not None:
      tokenizer_loader.load_tokenizer(source).save(tmp)
    else:
      tokenizer_lib.train_sentencepiece(
          _training_lines(cfg, workdir), cfg.init.tokenizer_vocab_size, tmp)
    os.replace(tmp, target)
  _barrier("tokenizer")
  return tokenizer_loader.load_tokenizer(target)


def model_config_for(cfg: RunConfig, workdir: pathlib.Path,
                     tokenizer: tokenizer_lib.Tokenizer) -> ModelConfig:
  """The policy's config: the workdir's (resume), the imported checkpoint's
  (with the run's dtype/remat choices), or the config's `model` section;
  the attention backend is always the run's (it depends on the platform)."""
  backend = dict(attention_backend=cfg.model.attention_backend)
  if (workdir / checkpointing.MODEL_CONFIG_FILE).exists():
    return checkpointing.load_model_config(workdir).replace(**backend)
  numerics = dict(param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype,
                  remat=cfg.model.remat, **backend)
  path = cfg.init.path
  if path is not None:
    path = pathlib.Path(path)
    if (path / checkpointing.MODEL_CONFIG_FILE).exists():
      model_cfg = checkpointing.load_model_config(path).replace(**numerics)
    elif (path / "config.json").exists():
      model_cfg = hf.config_from_hf(json.loads(
          (path / "config.json").read_text()), **{
              k: numerics[k] for k in ("param_dtype", "dtype")}).replace(
                  remat=cfg.model.remat, **backend)
    else:
      raise ConfigError(
          f"config key 'init.path': {path} is neither a brorl_jax model "
          "directory (model_config.json) nor a Hugging Face directory "
          "(config.json)")
  else:
    model_cfg = cfg.model
  check(tokenizer.vocab_size <= model_cfg.vocab_size, "model.vocab_size",
        f"{model_cfg.vocab_size} is smaller than the tokenizer's "
        f"{tokenizer.vocab_size} ids")
  return model_cfg


def build(cfg: RunConfig, workdir: str | os.PathLike) -> Experiment:
  """Mesh, tokenizer and policy for `cfg` in `workdir` (created)."""
  path = cfg.init.path
  check(path is None or pathlib.Path(path).exists(), "init.path",
        f"{path} does not exist: point it at the starting checkpoint, a "
        "Hugging Face directory (config.json + *.safetensors) or an "
        "`hf import` output, e.g. --config.init.path=/models/"
        "Nemotron-Research-Reasoning-Qwen-1.5B")
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = make_mesh(cfg.mesh.shape)
  tokenizer = prepare_tokenizer(cfg, workdir)
  model_cfg = model_config_for(cfg, workdir, tokenizer)
  # Every process has read (or not found) the workdir's model config before
  # process 0 writes it: nobody reads a half-written file.
  _barrier("model config")
  if jax.process_index() == 0:
    checkpointing.save_model_config(model_cfg, workdir)
  log.info("model: %s parameters, mesh %s", f"{model_cfg.num_params():,}",
           dict(mesh.shape))
  return Experiment(cfg=cfg, workdir=workdir,
                    mesh_train=MeshRules(mesh, TRAIN_RULES),
                    mesh_sample=MeshRules(mesh, SAMPLE_RULES),
                    tokenizer=tokenizer, model_cfg=model_cfg,
                    policy=Policy.create(model_cfg))


def global_prompt_arrays(exp: Experiment, tokens: np.ndarray,
                         lengths: np.ndarray):
  """The whole batch's prompts (every host has them) -> device arrays
  sharded over prompts; each host supplies only its addressable shards."""
  tokens = np.asarray(tokens, np.int32)
  lengths = np.asarray(lengths, np.int32)
  t_sh = exp.mesh_sample.sharding(("batch", None), tokens.shape)
  l_sh = exp.mesh_sample.sharding(("batch",), lengths.shape)
  return (jax.make_array_from_callback(tokens.shape, t_sh,
                                       lambda i: tokens[i]),
          jax.make_array_from_callback(lengths.shape, l_sh,
                                       lambda i: lengths[i]))
