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
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(section) - names)
  check(not unknown, f"{prefix}.{unknown[0]}" if unknown else prefix,
        f"unknown key; known keys of '{prefix}': {', '.join(sorted(names))}")
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
