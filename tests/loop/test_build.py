"""The run's one builder: the policy source, the one sample count, and the
state layout the loop creates, restores and the dry run compiles."""

import math
import pathlib
import sys

import jax
import numpy as np
import pytest

from brorl_jax import checkpointing, hf, run_config
from brorl_jax.config import ConfigError
from brorl_jax.loop import build as build_lib
from brorl_jax.loop import programs
from brorl_jax.loop.build import PolicySource, RunBuild
from brorl_jax.model.sharding import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.configs import tiny_rl  # noqa: E402


def _cfg(**overrides):
  c = tiny_rl.get_config()
  c.mesh.shape = (8, 1, 1)
  c.algo.loss.kl_coef = 1e-3            # a reference copy in the state
  c.optim.reference_samples_per_step = 8   # the lr follows the sample count
  for key, value in overrides.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return run_config.load(c)


ADAPTIVE = {"rollout.allocation": "adaptive", "rollout.budget": 20,
            "rollout.probe_n": 2, "rollout.allocation_block": 2}


def test_policy_source_reads_either_kind_and_names_the_bad_key(
    tmp_path, tiny_cfg, tiny_params):
  hf.save_hf(tiny_params, tiny_cfg, tmp_path / "hf")
  checkpointing.save_model_config(tiny_cfg, tmp_path / "model")
  checkpointing.save_params(tmp_path / "model" / "params", tiny_params)
  (tmp_path / "empty").mkdir()
  hf_src = PolicySource.at(tmp_path / "hf")
  ours = PolicySource.at(tmp_path / "model")
  assert (hf_src.kind, ours.kind) == ("hf", "brorl_jax")
  assert PolicySource.find(tmp_path / "empty") is None
  with pytest.raises(ConfigError, match="'--hf_dir'.*neither"):
    PolicySource.at(tmp_path / "empty", "--hf_dir")
  # Both give the same policy, with the caller's numerics on top.
  for source in (hf_src, ours):
    cfg = source.model_config(dtype="bfloat16", remat=True)
    assert (cfg.num_layers, cfg.vocab_size) == (tiny_cfg.num_layers,
                                               tiny_cfg.vocab_size)
    assert (cfg.dtype, cfg.remat) == ("bfloat16", True)
    params, step = source.load_params(tiny_cfg, None)
    assert step is None
    jax.tree.map(np.testing.assert_array_equal, params, tiny_params)


def test_one_sample_count_for_the_loop_and_the_dry_run():
  fixed, adaptive = _cfg(), _cfg(**ADAPTIVE)
  assert build_lib.samples_per_step(fixed) == 4 * 8       # P x n
  assert build_lib.samples_per_step(adaptive) == 20       # the budget
  mesh = make_mesh(fixed.mesh.shape)
  for cfg in (fixed, adaptive):
    loop = RunBuild.create(cfg, cfg.model, mesh=mesh)
    dry = programs.StepPrograms(cfg, cfg.model, mesh, cfg.model.num_layers)
    samples = build_lib.samples_per_step(cfg)
    want = cfg.optim.learning_rate * math.sqrt(samples / 8)
    for parts in (loop, dry.build):
      assert parts.samples_per_step == samples
      assert float(parts.lr_schedule(0)) == pytest.approx(want)


def test_the_abstract_state_is_what_the_loop_creates(tiny_params):
  cfg = _cfg()
  parts = RunBuild.create(cfg, cfg.model)
  params = jax.device_put(tiny_params, parts.param_shardings())
  state = parts.make_state(params)
  abstract = parts.abstract_state
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert (x.shape, x.dtype) == (a.shape, a.dtype)
    assert x.sharding.is_equivalent_to(a.sharding, x.ndim)
  # The reference copy and Adam's moments are laid out like the parameters.
  p_sh = jax.tree.leaves(parts.param_shardings())
  assert [x.sharding for x in jax.tree.leaves(abstract.ref_params)] == p_sh
  # The dry run compiles against the very same tree.
  dry = programs.StepPrograms(cfg, cfg.model, parts.mesh_train.mesh,
                              cfg.model.num_layers)
  assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding),
                      dry.state) == jax.tree.map(
                          lambda a: (a.shape, a.dtype, a.sharding), abstract)


def test_the_sampling_copy_is_cast_to_the_rollout_dtype():
  cfg = _cfg(**{"rollout.param_dtype": "bfloat16"})
  parts = RunBuild.create(cfg, cfg.model)
  dtypes = {str(a.dtype) for a in jax.tree.leaves(
      parts.abstract_sample_params)}
  assert dtypes == {"bfloat16"}
  assert [a.sharding for a in jax.tree.leaves(
      parts.abstract_sample_params)] == jax.tree.leaves(
          parts.param_shardings(sampling=True))
