"""Assembles the parts of a run in its workdir from a validated `RunConfig`.

The entry points (`train`, `evaluate`, `sample`) read the ConfigDict once,
turn it into a `RunConfig` (run_config.load), and build what they need here:
the builder's parts (`build.RunBuild`: mesh rules, policy, optimizer, state
layout, sampler) plus what needs the workdir: the tokenizer (copied into, or
trained for, it), the initial parameters, the prompt pipeline and the reward
pool. Library code below this package only sees typed configs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np

from brorl_jax import checkpointing, distributed, rewards
from brorl_jax.config import check
from brorl_jax.data import records as records_lib
from brorl_jax.data import tasks
from brorl_jax.data import tokenizer as tokenizer_lib
from brorl_jax.data import tokenizer_loader
from brorl_jax.data.prompts import PromptPipeline
from brorl_jax.loop import build as build_lib
from brorl_jax.loop.build import TOKENIZER_DIR, PolicySource, RunBuild
from brorl_jax.model.config import ModelConfig
from brorl_jax.model.sharding import make_mesh
from brorl_jax.rollout import Sampler, SamplerConfig
from brorl_jax.run_config import RunConfig

log = logging.getLogger(__name__)
DATA_DIR = "data"


def setup_jax(cfg: RunConfig) -> None:
  """Process-wide JAX settings, and jax.distributed when configured.

  Random draws must not depend on how arrays are sharded (the sampler's
  determinism across meshes relies on it).
  """
  jax.config.update("jax_threefry_partitionable", True)
  distributed.initialize(cfg.mesh)


@dataclasses.dataclass
class Experiment(RunBuild):
  """The builder's parts (`RunBuild`) and the workdir's, shared by the
  entry points.

  Attributes:
    workdir: the run's directory.
    tokenizer: the run's tokenizer (saved under `workdir/tokenizer`).
    source: where the initial policy comes from (`init.path`); None: a
      fresh model. The policy's config (`model_cfg`) is the workdir's on
      resume, else the source's (with the run's dtype/remat choices), else
      the config's `model` section; written to `workdir/model_config.json`.
  """

  workdir: pathlib.Path
  tokenizer: tokenizer_lib.Tokenizer
  source: PolicySource | None = None

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  # ---- parameters ----------------------------------------------------------

  def initial_params(self) -> Any:
    """Fresh, imported (model dir) or HF parameters, in the train layout."""
    if self.source is None:
      # A fresh model the warm start trains takes the warm start's seed.
      seed = self.cfg.seed
      if self.cfg.warmstart.steps:
        seed = self.cfg.warmstart.resolved_seed(seed)
      rng = jax.random.fold_in(jax.random.key(seed), 0)
      return self.policy.init(rng, self.mesh_train)
    params, _ = self.source.load_params(self.model_cfg,
                                        self.param_shardings(),
                                        progress=self.cfg.logging.progress)
    return params

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
      distributed.barrier("synthetic data")
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

  def reward_pool(self):
    return rewards.RewardPool(self.cfg.rewards)

  def sampler(self, sampler_cfg: SamplerConfig | None = None) -> Sampler:
    """The sampler (default settings: `rollout`) with the run's stop ids."""
    return self.make_sampler(sampler_cfg, stop_ids=self.tokenizer.stop_ids,
                             pad_id=self.tokenizer.pad_id)


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


def prepare_tokenizer(cfg: RunConfig, workdir: pathlib.Path,
                      source: PolicySource | None = None
                      ) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, copied into (or trained for) `workdir/tokenizer`.

  Order: an existing `workdir/tokenizer` (resume); `init.tokenizer`; the
  tokenizer of `source` (`init.path`); else a SentencePiece model trained on the
  training prompts and solutions (the CPU demo). Process 0 writes it; the
  others wait and load the same files.
  """
  target = workdir / TOKENIZER_DIR
  if jax.process_index() == 0 and not target.exists():
    files = cfg.init.tokenizer
    if files is None and source is not None:
      files = source.tokenizer_dir
    tmp = workdir / (TOKENIZER_DIR + ".tmp")
    if files is not None:
      tokenizer_loader.load_tokenizer(files).save(tmp)
    else:
      tokenizer_lib.train_sentencepiece(
          _training_lines(cfg, workdir), cfg.init.tokenizer_vocab_size, tmp)
    os.replace(tmp, target)
  distributed.barrier("tokenizer")
  return tokenizer_loader.load_tokenizer(target)


def model_config_for(cfg: RunConfig, workdir: pathlib.Path,
                     tokenizer: tokenizer_lib.Tokenizer,
                     source: PolicySource | None = None) -> ModelConfig:
  """The policy's config: the workdir's (resume), else `source`'s (default:
  `init.path`'s) with the run's dtype/remat choices, else the config's
  `model` section; the attention backend is always the run's (it depends on
  the platform)."""
  if (workdir / checkpointing.MODEL_CONFIG_FILE).exists():
    return PolicySource(workdir, "brorl_jax").model_config(
        attention_backend=cfg.model.attention_backend)
  if source is None and cfg.init.path is not None:
    source = PolicySource.at(cfg.init.path)
  model_cfg = build_lib.model_config(cfg, source)
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
  # `init.path` resolved once: its tokenizer, model config and parameters.
  source = None if path is None else PolicySource.at(path)
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = make_mesh(cfg.mesh.shape)
  tokenizer = prepare_tokenizer(cfg, workdir, source)
  model_cfg = model_config_for(cfg, workdir, tokenizer, source)
  # Every process has read (or not found) the workdir's model config before
  # process 0 writes it: nobody reads a half-written file.
  distributed.barrier("model config")
  if jax.process_index() == 0:
    checkpointing.save_model_config(model_cfg, workdir)
  log.info("model: %s parameters, mesh %s", f"{model_cfg.num_params():,}",
           dict(mesh.shape))
  parts = RunBuild.create(cfg, model_cfg, mesh=mesh)
  return Experiment(cfg=cfg, policy=parts.policy,
                    mesh_train=parts.mesh_train, mesh_sample=parts.mesh_sample,
                    workdir=workdir, tokenizer=tokenizer, source=source)


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
