"""Validation helpers shared by every stage's config (the ground floor).

Only the train loop reads the `ml_collections.ConfigDict`; library code takes
the frozen dataclasses that each stage defines next to its code (e.g.
`rollout.SamplerConfig`, `rl.losses.LossConfig`). This module holds what they
share: the error type that names the offending key, and small checks. It
imports nothing from the project; `run_config.py` assembles the whole run's
`RunConfig` from the stage configs.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Iterable, Mapping, TypeVar


class ConfigError(ValueError):
  """A bad configuration value. The message names the key and the fix."""


def check(ok: bool, key: str, message: str) -> None:
  """Raises `ConfigError` naming `key` unless `ok`.

  Args:
    ok: the condition that must hold.
    key: the dotted config key, e.g. "rollout.top_p".
    message: what is allowed, e.g. "must be in (0, 1], got 1.5".
  """
  if not ok:
    raise ConfigError(f"config key '{key}': {message}")


def check_choice(value: Any, key: str, allowed: Iterable[Any]) -> None:
  """Raises `ConfigError` unless `value` is one of `allowed`."""
  allowed = tuple(allowed)
  check(value in allowed, key,
        f"got {value!r}; allowed values: {', '.join(map(repr, allowed))}")


def unknown_key_error(key: str, known: Iterable[str]) -> ConfigError:
  """The one error for an unknown key, in a config file or on the command line.

  Args:
    key: the dotted key, e.g. "rollout.nn".
    known: the names known at that level (without the section prefix).

  Returns:
    A `ConfigError` naming the key and the closest known keys (all of them
    when none is close).
  """
  prefix, _, name = key.rpartition(".")
  known = sorted(known)
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
  dotted = [f"{prefix}.{k}" if prefix else k for k in close or known]
  where = f"'{prefix}'" if prefix else "the top level"
  hint = ("closest known keys" if close else f"known keys of {where}")
  return ConfigError(f"config key '{key}': unknown key; {hint}: "
                     f"{', '.join(dotted)}")


def config_fields(cls: type) -> list[dataclasses.Field]:
  """The fields of dataclass `cls` that are config keys.

  A field marked `metadata={"config_key": False}` (e.g. the section name
  `SamplerConfig` carries for its error messages) is set by code, not by a
  config.
  """
  return [f for f in dataclasses.fields(cls)
          if f.metadata.get("config_key", True)]


T = TypeVar("T")


def from_mapping(cls: type[T], section: Mapping[str, Any] | None,
                 prefix: str) -> T:
  """Builds dataclass `cls` from a config section, naming unknown keys.

  Args:
    cls: a dataclass type.
    section: a mapping (a ConfigDict section, or a dict); None gives defaults.
    prefix: the section's dotted name, used in error messages.

  Returns:
    An instance of `cls`; its `__post_init__` validates the values.
  """
  section = dict(section or {})
  names = {f.name for f in config_fields(cls)}
  unknown = sorted(set(section) - names)
  if unknown:
    raise unknown_key_error(f"{prefix}.{unknown[0]}", names)
  return cls(**section)


def to_dict(config: Any) -> dict[str, Any]:
  """A ConfigDict (or nested mapping) as plain nested dicts/lists."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  if isinstance(config, Mapping):
    return {str(k): to_dict(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [to_dict(v) for v in config]
  return config
