"""The run directory's life cycle (host): checked, recorded, cut back.

Every start of `train` on a workdir, in this order:

  1. `preflight`: every check that needs no data or model, before anything
     expensive runs or any file is written: the mesh fits the devices, the
     micro-batches divide the rows, the workdir is a writable directory with
     room for a write. Failures raise `ConfigError` (or `WorkdirError`, one)
     with one line naming the input and the fix.
  2. the recorded config (`run_config.json`) is compared with this start's:
     a change to a key the workdir's model or tokenizer was made from
     (`model.*`, `init.*`) is refused, naming the keys, since the workdir's
     `model_config.json`, `tokenizer/` and checkpoints would silently win;
     any other change is logged and applied. Then this start's config is
     recorded.
  3. `cut_back` (after the checkpoint restore): everything logged after the
     restored checkpoint (metrics.jsonl, TensorBoard, the rollout archive,
     text samples) is dropped, down to nothing when there is no checkpoint,
     so a restart after a crash at any moment writes each step once.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
from typing import Any, Mapping

import jax

from brorl_jax import distributed
from brorl_jax.config import ConfigError
from brorl_jax.model.sharding import make_mesh
from brorl_jax.run_config import RunConfig

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"
# Top-level sections the workdir's model and tokenizer were built from: a
# changed value cannot take effect on a workdir that has them.
FIXED_SECTIONS = ("model", "init")
# Bytes written (and removed) to prove the workdir takes a write.
_PROBE_BYTES = 1 << 16
_MISSING = "(unset)"


class WorkdirError(ConfigError):
  """The workdir cannot hold this run (the message names it and the fix)."""


def os_error_text(error: OSError) -> str:
  """'[Errno 28] No space left on device' (no path: callers name it)."""
  if error.errno:
    return f"[Errno {error.errno}] {error.strerror or os.strerror(error.errno)}"
  return str(error)


def check_writable(workdir: pathlib.Path) -> None:
  """Creates `workdir` when missing and proves it takes a (synced) write.

  Raises:
    WorkdirError: a file is in the way, or the directory cannot be created
      or written (read-only mount, `/proc`, no permission, full disk).
  """
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory; "
                       "give a directory path (it is created when missing)")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write-probe-")
    try:
      os.write(fd, b"\0" * _PROBE_BYTES)
      os.fsync(fd)
    finally:
      os.close(fd)
      os.unlink(probe)
  except OSError as e:
    raise WorkdirError(
        f"--workdir {workdir} cannot be written ({os_error_text(e)}); give "
        "a directory on a writable filesystem with free space") from None


def preflight(cfg: RunConfig, workdir: str | os.PathLike) -> pathlib.Path:
  """The checks of a start that need neither data nor model (see above).

  Args:
    cfg: the validated run config.
    workdir: the `--workdir` argument.

  Returns:
    The absolute workdir (created; nothing else is written in it).

  Raises:
    ConfigError: naming the key, or `WorkdirError` naming the workdir.
  """
  make_mesh(cfg.mesh.shape)        # the mesh fits the devices (ConfigError)
  cfg.update.check_rows(cfg.loop.prompts_per_step * cfg.rollout.n)
  path = pathlib.Path(workdir).absolute()
  check_writable(path)
  return path


def _plain(value: Any) -> Any:
  """A config value as JSON reads it back (tuples become lists)."""
  return json.loads(json.dumps(value, default=str))


def flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested config dicts -> {"section.key": value}."""
  out = {}
  for key, value in raw.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]
                   ) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old value, new value)} of the keys that differ."""
  a, b = flatten(_plain(old)), flatten(_plain(new))
  return {k: (a.get(k, _MISSING), b.get(k, _MISSING))
          for k in sorted(set(a) | set(b))
          if a.get(k, _MISSING) != b.get(k, _MISSING)}


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


def record_config(workdir: pathlib.Path, raw: Mapping[str, Any]) -> None:
  """Compares this start's config with the recorded one, then records it.

  Raises:
    WorkdirError: a key of `FIXED_SECTIONS` changed (names the keys).
  """
  path = workdir / RUN_CONFIG_FILE
  if path.exists():
    changes = config_changes(json.loads(path.read_text()), raw)
    fixed = {k: v for k, v in changes.items()
             if k.split(".")[0] in FIXED_SECTIONS}
    if fixed:
      raise WorkdirError(
          f"--workdir {workdir} holds a run of another model or tokenizer "
          f"({_describe(fixed)}); its model_config.json, tokenizer/ and "
          "checkpoints would win: drop those overrides to resume it, or "
          "give a new --workdir")
    if changes:
      log.warning("config changed since the last start of %s (applied): %s",
                  workdir, _describe(changes))
  # Every process has read the record before process 0 replaces it.
  distributed.barrier("run config")
  if jax.process_index() == 0:
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=RUN_CONFIG_FILE + ".")
    with os.fdopen(fd, "w") as f:
      json.dump(_plain(raw), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def cut_back(step: int | None, writer: Any, archive: Any) -> None:
  """Drops what was logged after checkpoint `step` (None: everything).

  Args:
    step: the checkpoint the run resumes from; None when it starts afresh
      (a crash before the first checkpoint left lines that the new start
      writes again).
    writer: the run's `metrics.MetricsWriter` (metrics.jsonl; TensorBoard
      purges later events when it next writes).
    archive: the run's `rollout_archive.RolloutArchive` (and its
      samples.jsonl).
  """
  last = -1 if step is None else step
  lines = writer.truncate_after(last)
  steps = archive.truncate_after(last)
  if lines or steps:
    log.warning("dropped what was logged after %s: %d metrics lines, "
                "archived steps %s", "the last checkpoint (step %d)" % step
                if step is not None else "the start (no checkpoint yet)",
                lines, steps)
