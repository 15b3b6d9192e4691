"""Reward plugins: user modules that register verifiers (`rewards.plugins`).

A plugin is a Python module that calls `rewards.registry.register(name, fn)`
when it is imported, e.g. `my_rewards.py`:

    from brorl_jax.rewards import registry

    def verify_yes(completion, answer, **unused):
      return float(completion.strip().lower().startswith("yes"))

    registry.register("yes", verify_yes)

Named by `rewards.plugins = ("my_rewards",)` (or `--plugins my_rewards` on
`python -m brorl_jax.rewards`), it is imported in the trainer (and every
other entry point) when the config is loaded, before any verifier name is
checked, and in every verifier worker before the worker receives its
verifier table, so its verifiers run in the pool under the same per-item
timeout, memory limit and default score as the built-in ones.

An entry is a module name (importable from `sys.path`: the working
directory under `python -m`, or `PYTHONPATH`) or the path of a `.py` file
(`plugins/my_rewards.py`, imported as module `my_rewards`). Nothing here
imports JAX: workers load plugins too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys
from typing import Iterable

from brorl_jax.config import ConfigError

_FIX = ("check the name (a module on sys.path or PYTHONPATH, or the path "
        "of a .py file)")


def is_path(entry: str) -> bool:
  """True when `entry` names a file (`x.py` or a path) rather than a module."""
  return entry.endswith(".py") or os.sep in entry or "/" in entry


def _import_file(entry: str):
  path = pathlib.Path(entry).expanduser().resolve()
  if not path.is_file():
    raise FileNotFoundError(f"no such file {path}")
  name = path.stem
  loaded = sys.modules.get(name)
  if loaded is not None:
    if pathlib.Path(getattr(loaded, "__file__", "") or "").resolve() == path:
      return loaded
    raise ImportError(f"a different module named {name!r} is already "
                      f"imported (from {getattr(loaded, '__file__', '?')}); "
                      "rename the plugin file")
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise ImportError(f"cannot load {path} as a Python module")
  module = importlib.util.module_from_spec(spec)
  # In sys.modules before it runs (as `import` does), so that pickle finds
  # its verifiers by module name, here and in the workers.
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def load(entries: Iterable[str], key: str = "rewards.plugins") -> None:
  """Imports each plugin once (later calls are no-ops).

  Args:
    entries: module names or `.py` paths, in order.
    key: the config key or flag that named them, for the error message.

  Raises:
    ConfigError: one line naming the plugin that failed and why.
  """
  where = key if key.startswith("-") else f"config key '{key}'"
  for entry in entries:
    try:
      if is_path(entry):
        _import_file(entry)
      else:
        importlib.import_module(entry)
    except ModuleNotFoundError as e:
      raise ConfigError(f"{where}: plugin {entry!r} failed to import: {e}; "
                        f"{_FIX}") from None
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"{where}: plugin {entry!r} failed to import: "
                        f"{type(e).__name__}: {e}") from None
