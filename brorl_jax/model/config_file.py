"""A model directory's or workdir's `model_config.json` (host I/O).

Written atomically and only when it changes (`integrity/atomic.py`); a
damaged one is one `ModelConfigError` line naming the file and the fix (the
train loop rebuilds it from the run's config: `loop/experiment.py`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from brorl_jax.config import ConfigError
from brorl_jax.integrity import atomic
from brorl_jax.model.config import ModelConfig

MODEL_CONFIG_FILE = "model_config.json"


class ModelConfigError(ConfigError):
  """A `model_config.json` that cannot be read (names it and the fix)."""


def save_model_config(cfg: ModelConfig, directory: pathlib.Path) -> None:
  """Writes the model directory's or workdir's `model_config.json`
  (atomically, and only when it changes)."""
  directory.mkdir(parents=True, exist_ok=True)
  atomic.write_text(directory / MODEL_CONFIG_FILE,
                    json.dumps(dataclasses.asdict(cfg), indent=2))


def load_model_config(directory: pathlib.Path) -> ModelConfig:
  """Reads the `model_config.json` that `save_model_config` wrote.

  Raises:
    FileNotFoundError: there is none.
    ModelConfigError: it is damaged (truncated, not JSON, not a config).
  """
  path = directory / MODEL_CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: {directory} is not a brorl_jax model directory "
        "(create one with `python -m brorl_jax.hf import` or by training)")
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
      raise ValueError(f"a JSON {type(raw).__name__}, not an object")
    return ModelConfig(**raw)
  except (ValueError, TypeError) as e:   # JSONDecodeError, unknown keys
    raise ModelConfigError(
        f"{path} is damaged ({type(e).__name__}: {str(e)[:200]}); it records "
        "the model's architecture, the checkpoints beside it are not "
        "affected: in a training workdir rerun `train` with the run's "
        "command (it rebuilds the file from the config), else restore the "
        "file from a copy (or `hf import` the model again)") from None
