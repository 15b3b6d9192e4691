"""Config loading: every shipped config validates; bad keys are named."""

import pathlib
import sys

import ml_collections
import pytest

from brorl_jax import config as config_lib
from brorl_jax import run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import base, brorl_qwen2_1p5b, demo_cpu, prorl_qwen2_1p5b  # noqa: E402,E501


def test_shipped_configs_validate():
  cfg = run_config.load(demo_cpu.get_config())
  assert cfg.rollout.n == demo_cpu.get_config().rollout.n
  assert cfg.model.embed_dim == 128
  assert cfg.eval_sampler().section == "eval"
  assert cfg.eval_sampler().temperature == cfg.eval.temperature
  full = run_config.load(base.get_config())
  assert full.model.num_layers == 28 and full.loss.kl_coef == 1e-4
  # The sampling copy defaults to the compute dtype (bf16 over f32 masters).
  assert full.loop.sample_dtype(full.model) == "bfloat16"
  assert cfg.loop.sample_dtype(cfg.model) == cfg.model.dtype


def test_pod_recipes_take_the_pod_after_the_colon():
  # `configs/brorl_qwen2_1p5b.py:v5p64` (config_flags hands `v5p64` to
  # get_config): the v5p-64's mesh and decode slots; no argument: 64 H100s.
  h100 = run_config.load(brorl_qwen2_1p5b.get_config())
  v5p = run_config.load(brorl_qwen2_1p5b.get_config("v5p64"))
  assert tuple(h100.mesh.shape) == (8, 8, 1)
  assert tuple(v5p.mesh.shape) == (4, 8, 1)
  assert (h100.rollout.max_decode_rows, v5p.rollout.max_decode_rows) == (
      8192, 4096)
  assert v5p.rollout.n == 512 and v5p.rollout.refill
  assert prorl_qwen2_1p5b.get_config("h100x64").rollout.max_decode_rows == 8192
  with pytest.raises(ValueError, match="unknown pod 'v4'.*v5p64"):
    prorl_qwen2_1p5b.get_config("v4")


@pytest.mark.parametrize("key,value,named", [
    ("rollout.n", 0, "rollout.n"),
    ("rollout.temperature", -1.0, "rollout.temperature"),
    ("algo.loss.aggregation", "mean", "algo.loss.aggregation"),
    ("algo.advantage.estimator", "ppo", "algo.advantage.estimator"),
    ("eval.k", (1, 64), "eval.k"),
    ("optim.schedule", "cosine", "optim.decay_steps"),
    ("mesh.shape", (2, 2), "mesh.shape"),
    ("checkpoint.keep", 0, "checkpoint.keep"),
    ("logging.archive_every", 0, "logging.archive_every"),
    ("logging.progress", "bars", "logging.progress"),
    ("rollout.param_dtype", "bf16", "rollout.param_dtype"),
    ("eval.plateau_window", 2, "eval.plateau_window"),
    ("eval.plateau_confidence", 1.0, "eval.plateau_confidence"),
])
def test_bad_values_name_the_key(key, value, named):
  c = demo_cpu.get_config()
  node = c
  *parents, last = key.split(".")
  for p in parents:
    node = node[p]
  with c.unlocked():
    node[last] = value
  with pytest.raises(config_lib.ConfigError, match=named.replace(".", r"\.")):
    run_config.load(c)


def test_the_plateau_stop_needs_periodic_evaluations():
  c = demo_cpu.get_config()
  c.eval.plateau_window = 3
  assert run_config.load(c).eval.plateau_window == 3
  c.eval.every = 0
  with pytest.raises(config_lib.ConfigError, match="needs eval.every > 0"):
    run_config.load(c)


def test_unknown_keys_are_named():
  c = ml_collections.ConfigDict(demo_cpu.get_config().to_dict())
  c.rollout.temprature = 0.5
  with pytest.raises(config_lib.ConfigError, match=r"rollout\.temprature"):
    run_config.load(c)
  c = ml_collections.ConfigDict(demo_cpu.get_config().to_dict())
  c.algo.loss.kl = 0.1
  with pytest.raises(config_lib.ConfigError, match=r"algo\.loss\.kl"):
    run_config.load(c)
  c = ml_collections.ConfigDict(demo_cpu.get_config().to_dict())
  c.optimizer = ml_collections.ConfigDict({"lr": 1.0})
  with pytest.raises(config_lib.ConfigError, match="optimizer"):
    run_config.load(c)


def test_progress_bar_is_an_alias_of_progress():
  c = demo_cpu.get_config()
  assert run_config.load(c).logging.progress is None      # auto
  c.logging.progress_bar = True
  assert run_config.load(c).logging.progress == "bar"
  c.logging.progress_bar = False
  assert run_config.load(c).logging.progress_mode() == "lines"
  c.logging.progress = "off"
  with pytest.raises(config_lib.ConfigError, match=r"logging\.progress_bar"):
    run_config.load(c)
