"""configs/base.py holds every key of every section's config dataclass."""

import dataclasses
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from brorl_jax import config as config_lib
from brorl_jax import run_config
from brorl_jax.data.prompts import DataConfig
from brorl_jax.model.config import ModelConfig
from brorl_jax.rewards.config import RewardsConfig
from brorl_jax.rl.advantages import AdvantageConfig
from brorl_jax.rl.losses import LossConfig
from brorl_jax.rl.shaping import ShapingConfig
from brorl_jax.rl.train_state import OptimConfig
from brorl_jax.rl.update import UpdateConfig
from brorl_jax.rollout.config import SamplerConfig
from brorl_jax.warmstart import WarmstartConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import base, demo_cpu  # noqa: E402

# Where each stage's dataclass sits in the config (as `run_config.load` reads
# it). The tests below check this table against `load` itself, so a new
# section or a new stage class cannot be left out of it.
SECTIONS = {
    "model": (ModelConfig,), "mesh": (run_config.MeshConfig,),
    "data": (DataConfig,),
    "rollout": (SamplerConfig, run_config.RolloutSection),
    "rewards": (RewardsConfig,), "algo": (UpdateConfig,),
    "algo.advantage": (AdvantageConfig,), "algo.loss": (LossConfig,),
    "algo.shaping": (ShapingConfig,),
    "algo.reference": (run_config.ReferenceConfig,),
    "optim": (OptimConfig,), "checkpoint": (run_config.CheckpointConfig,),
    "eval": (run_config.EvalConfig,),
    "diagnostics": (run_config.DiagnosticsConfig,),
    "warmstart": (WarmstartConfig,), "init": (run_config.InitConfig,),
    "logging": (run_config.LoggingConfig,),
}
# Top-level scalars, and the model's preset name (its fields override it).
SCALARS = {"seed", "total_steps", "max_generated_tokens", "model.preset"}


def _dataclass_keys(cls, prefix):
  """Dotted keys of `cls`; a field holding a dataclass is a subsection."""
  keys = set()
  for field in config_lib.config_fields(cls):
    if dataclasses.is_dataclass(field.default):
      keys |= _dataclass_keys(type(field.default), f"{prefix}.{field.name}")
    else:
      keys.add(f"{prefix}.{field.name}")
  return keys


def _config_keys(tree, prefix=""):
  keys = set()
  for name, value in tree.items():
    if isinstance(value, dict) and name != "synthetic":  # a dict-valued key
      keys |= _config_keys(value, f"{prefix}{name}.")
    else:
      keys.add(f"{prefix}{name}")
  return keys


def test_base_holds_every_dataclass_key():
  expected = set(SCALARS)
  for section, classes in SECTIONS.items():
    for cls in classes:
      expected |= _dataclass_keys(cls, section)
  actual = _config_keys(base.get_config().to_dict())
  assert sorted(actual - expected) == [], "keys no dataclass reads"
  assert sorted(expected - actual) == [], "keys missing from configs/base.py"


def test_sections_table_matches_load():
  assert {s.split(".")[0] for s in SECTIONS} | {
      k for k in SCALARS if "." not in k} == set(run_config.TOP_LEVEL)
  loaded = run_config.load(base.get_config())
  used = {type(getattr(loaded, f.name)) for f in dataclasses.fields(loaded)
          if dataclasses.is_dataclass(getattr(loaded, f.name))}
  assert used == {cls for classes in SECTIONS.values() for cls in classes}


def _parse(*overrides):
  fv = flags.FlagValues()
  argv = ["prog", f"--config={ROOT / 'configs/base.py'}", *overrides]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return run_config.load(fv.config)


def test_keys_the_base_once_lacked_override_on_the_command_line():
  cfg = _parse("--config.rewards.code.allow_unsandboxed=True",
               "--config.optim.schedule=cosine",
               "--config.optim.decay_steps=100",
               "--config.algo.shaping.truncation_reward=-1",
               "--config.algo.reference.reset_kl_above=0.1",
               "--config.warmstart.batch_size=4",
               "--config.logging.archive_every=5",
               "--config.model.num_layers=2",
               "--config.rewards.timeout_s=3")
  assert cfg.rewards.code.allow_unsandboxed
  assert (cfg.optim.schedule, cfg.optim.decay_steps) == ("cosine", 100)
  assert cfg.shaping.truncation_reward == -1.0
  assert cfg.reference.reset_kl_above == 0.1
  assert cfg.warmstart.batch_size == 4 and cfg.logging.archive_every == 5
  # A typed None overrides one field of the preset and keeps the others.
  assert cfg.model.num_layers == 2 and cfg.model.embed_dim == 1536
  assert cfg.rewards.code.time_budget_s == 2.0  # derived from the timeout


def test_resolved_is_the_inverse_of_load():
  for c in (base.get_config(), demo_cpu.get_config()):
    cfg = run_config.load(c)
    tree = run_config.resolved(cfg)
    assert run_config.load(tree) == cfg
    # Every key of the base, nothing else: `--print_config` shows them all.
    assert _config_keys(tree) == _config_keys(base.get_config().to_dict())
