"""What the command-line entry points share: config paths, flags, errors.

* `add_config_root`: a config file given by path imports its siblings
  (`from configs import base`) from any working directory.
* `dashed_aliases`: every flag is spelled absl-style with underscores
  (`--hf_dir`); the dashed spelling (`--hf-dir`) stays an alias.
* `parse_flags`: an unknown `--config.a.b` override gets the error an
  unknown key in a config file gets (naming the closest known keys).
* `input_errors`: a bad config value or data row ends the program with one
  line, `error: ...`, on stderr and exit status 2 (no traceback).

Nothing here imports JAX: the reward CLI and its workers use it too.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from typing import Any, Iterator, Mapping, Sequence

from absl import flags

from brorl_jax.config import ConfigError, unknown_key_error
from brorl_jax.data.records import DataError

# Exit status of a run stopped by bad input (argparse and absl use 2 for
# usage errors too).
INPUT_ERROR = 2


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
  """The value of `--flag=V` / `--flag V` in `argv` (the last one wins)."""
  value = None
  for i, arg in enumerate(argv):
    if arg == f"--{flag}" and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(f"--{flag}="):
      value = arg.split("=", 1)[1]
  return value


def config_roots(path: str | pathlib.Path) -> list[pathlib.Path]:
  """Directories a config file's imports resolve against, first first.

  A shipped config imports its siblings as `from configs import base`: the
  directory holding the `configs` package must be on `sys.path`. That is
  the project root (the nearest directory above the file with a
  `pyproject.toml`), and the directory above the file's outermost package
  (a `configs/` package copied elsewhere, without a pyproject.toml).

  Args:
    path: the config file.

  Returns:
    The directories, project root first; none for a missing file.
  """
  path = pathlib.Path(path).resolve()
  if not path.is_file():
    return []
  roots = []
  project = next((d for d in path.parents
                  if (d / "pyproject.toml").is_file()), None)
  if project is not None:
    roots.append(project)
  package = path.parent
  while (package / "__init__.py").is_file():
    package = package.parent
  if package != path.parent and package not in roots:
    roots.append(package)
  return roots


def add_config_root(argv: Sequence[str], flag: str = "config") -> None:
  """Puts the roots of the config named by `--flag` in `argv` on sys.path.

  Called before the flags are parsed (config_flags imports the file while
  parsing), so `brorl-train --config /abs/path/configs/demo_cpu.py` works
  from any directory. The roots go first: the config's own checkout wins
  over a `configs` package of the working directory.

  Args:
    argv: the command line (program name included or not).
    flag: the flag naming the config file.
  """
  value = _flag_value(list(argv), flag)
  if value is None:
    return
  path = value.split(":", 1)[0]  # config_flags' `path:arg` form
  for root in reversed(config_roots(path)):
    if str(root) in sys.path:
      sys.path.remove(str(root))
    sys.path.insert(0, str(root))


def dashed_aliases(names: Sequence[str]) -> dict[str, str]:
  """{"hf-dir": "hf_dir", ...} for the flag names that have underscores."""
  return {n.replace("_", "-"): n for n in names if "_" in n}


def set_keys(config: Any, overrides: Mapping[str, Any]) -> Any:
  """Sets dotted keys (`{"rollout.n": 8}`) in a ConfigDict; returns it."""
  for key, value in overrides.items():
    *parents, last = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[last] = value
  return config


def bad_override(config: Any, key: str) -> ConfigError | None:
  """The error for override `key` (dotted) if `config` has no such key."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    here = ".".join(parts[:i + 1])
    if not (isinstance(node, Mapping) or hasattr(node, "keys")):
      return ConfigError(f"config key '{here}': '{'.'.join(parts[:i])}' is "
                         "a value, not a section")
    if part not in node:
      return unknown_key_error(here, list(node.keys()))
    node = node[part]
  return None


def parse_flags(fv: flags.FlagValues, argv: Sequence[str],
                config_flag: str = "config") -> list[str]:
  """Parses `argv` into `fv`; bad flags and unknown config keys fail cleanly.

  config_flags reports an override of a key the config lacks
  (`--config.rollout.nn=3`) with a bare KeyError/AttributeError; this names
  the key and the closest known keys, as `config.load` does for a key in a
  file, and exits with status 2.

  Args:
    fv: the flag values (config_flags' override flags defined).
    argv: the command line, program name first.
    config_flag: the name of the config-file flag.

  Returns:
    The arguments left over (program name first), as `fv(argv)` does.
  """
  argv = list(argv)
  try:
    return fv(argv)
  except (KeyError, AttributeError, OSError):
    # config_flags failed inside the config flag's parse, before it kept
    # the config (an override of a missing key; or, with overrides, a
    # config file that did not load): load the file again with the flag's
    # parser, then find the bad key.
    value = _flag_value(argv, config_flag)
    if value is None or config_flag not in fv:
      raise
    prefix = f"--{config_flag}."
    try:
      # A file that did not load gives a stand-in raising OSError on use.
      config = fv[config_flag].parser.parse(value)
      for arg in argv:
        if arg.startswith(prefix):
          error = bad_override(config, arg[len(prefix):].split("=", 1)[0])
          if error is not None:
            fail(error)
    except (flags.Error, OSError) as e:
      _fail_in_one_line(e)
    raise
  except flags.Error as e:
    _fail_in_one_line(e)


def _fail_in_one_line(error: BaseException) -> None:
  # A config file that fails to import comes with its traceback: keep the
  # first line (the flag) and the last (the exception).
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
  fail(f"{message} (--helpfull lists the flags)")


def fail(error: BaseException | str, status: int = INPUT_ERROR) -> None:
  """Prints `error: <message>` on stderr and exits with `status` (default 2:
  bad input)."""
  print(f"error: {error}", file=sys.stderr)
  sys.exit(status)


@contextlib.contextmanager
def input_errors(*extra: type[BaseException]) -> Iterator[None]:
  """Turns ConfigError, DataError (and `extra`) into `error: ...`, exit 2.

  Args:
    *extra: more exception types that mean bad input (e.g. a checkpoint
      format error, a missing file).
  """
  try:
    yield
  except (ConfigError, DataError, *extra) as e:
    fail(e)
