"""All orbax calls live here (orbax v0 `CheckpointManager` vs v1 still moves).

Two on-disk forms:
  * a *model directory* (`hf import`, a fresh init): `params/` (orbax
    StandardCheckpointer), `model_config.json`, `tokenizer/`;
  * a *training workdir*: `checkpoints/<step>/` (the CheckpointManager's
    items: train state, data iterator, rng, metadata), `model_config.json`,
    `tokenizer/`.
Restores always go into an abstract target that carries the wanted sharding,
so a checkpoint restores onto a different mesh.

A training workdir survives a bad disk: a failed save (async included) is
raised as one `CheckpointError` line naming the path and the OS error at the
next step boundary at the latest (`TrainCheckpointer.check`), and a resume
falls back from a checkpoint that cannot be read to the newest intact one
(`TrainCheckpointer.restore_latest`), setting the damaged ones aside.

Integrity: each step also holds `integrity` (JSON), two 32-bit sums per
saved array computed on device at save (`integrity/checksums.py`) and a
SHA-256 of each JSON item; a restore recomputes them and treats a mismatch
as damage. A read that fails is retried (`READ_TRIES`) before its step is
called damaged; an error that does not prove damage (I/O, permissions,
timeouts) stops the start with nothing moved. With several processes,
every outcome is gathered and process 0 decides which step to restore, for
all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from brorl_jax.integrity import checks as integrity
from brorl_jax.integrity.checks import (ChecksumMismatch, array_checksums,
                                        check_arrays, error_text, json_digest)
from brorl_jax.model.config import ModelConfig
from brorl_jax.model.transformer import Policy

log = logging.getLogger(__name__)
MODEL_CONFIG_FILE = "model_config.json"
# Damaged steps are moved here (beside `checkpoints/`), not deleted.
DAMAGED_DIR = "checkpoints.damaged"
# A step's read is tried this many times, with these pauses between tries,
# before its error counts.
READ_TRIES = 3
RETRY_DELAYS_S = (1.0, 4.0)


# ---- model config (model directories and workdirs) ------------------------

def save_model_config(cfg: ModelConfig, directory: pathlib.Path) -> None:
  """Writes the model directory's or workdir's `model_config.json`."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / MODEL_CONFIG_FILE).write_text(
      json.dumps(dataclasses.asdict(cfg), indent=2))


def load_model_config(directory: pathlib.Path) -> ModelConfig:
  """Reads the `model_config.json` that `save_model_config` wrote."""
  path = directory / MODEL_CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: {directory} is not a brorl_jax model directory "
        "(create one with `python -m brorl_jax.hf import` or by training)")
  return ModelConfig(**json.loads(path.read_text()))


# ---- errors ----------------------------------------------------------------

class CheckpointError(RuntimeError):
  """A checkpoint could not be written or read (one line: path and cause)."""


class _DropTraceback(logging.Filter):
  """orbax logs a failed async save with tracebacks of hundreds of lines
  (from its commit, metadata and finalize threads); `CheckpointError`
  reports the cause in one line. orbax's error messages are kept, without
  their tracebacks."""

  def filter(self, record: logging.LogRecord) -> bool:
    if (record.levelno >= logging.ERROR and record.exc_info
        and f"{os.sep}orbax{os.sep}" in record.pathname):
      record.exc_info, record.exc_text = None, None
    return True


_DROP_TRACEBACK = _DropTraceback()


# ---- parameters ------------------------------------------------------------

def _params_record(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + ".integrity.json")


def save_params(path: str | pathlib.Path, params: Any) -> None:
  """Saves a parameter tree (blocking; all processes call it), with its
  checksums beside it (`<path>.integrity.json`)."""
  path = pathlib.Path(path).absolute()
  record = array_checksums(params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    _params_record(path).write_text(json.dumps(record))


def restore_params(path: str | pathlib.Path, target: Any) -> Any:
  """Restores a parameter tree into `target` (ShapeDtypeStructs with
  shardings, or arrays whose shardings are reused)."""
  path = pathlib.Path(path).absolute()
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None)),
      target)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path, abstract)
  record = _params_record(path)
  try:
    check_arrays("", json.loads(record.read_text()) if record.exists()
                 else {}, params)
  except ChecksumMismatch as e:
    raise CheckpointError(f"{path} cannot be used: {e}") from None
  return params


def abstract_with_shardings(abstract: Any, shardings: Any | None) -> Any:
  """Attaches shardings to a tree of ShapeDtypeStructs (None: default)."""
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=device), abstract)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=s), abstract, shardings)


def load_policy_params(workdir: str | pathlib.Path, step: int | None = None,
                       shardings: Any | None = None):
  """Loads the policy parameters of a model directory or training workdir.

  Args:
    workdir: a model directory (`params/`) or a training workdir
      (`checkpoints/`).
    step: checkpoint step of a training workdir (default: latest).
    shardings: target shardings (default: one device).

  Returns:
    (ModelConfig, params, tokenizer directory or None).
  """
  workdir = pathlib.Path(workdir)
  cfg = load_model_config(workdir)
  target = abstract_with_shardings(Policy.create(cfg).abstract_params(),
                                   shardings)
  tokenizer_dir = workdir / "tokenizer"
  tokenizer_dir = tokenizer_dir if tokenizer_dir.exists() else None
  if (workdir / "checkpoints").exists():
    params = restore_train_params(workdir / "checkpoints", target, step)
  elif (workdir / "params").exists():
    if step is not None:
      raise ValueError(f"{workdir} is a model directory without steps; "
                       "drop --step")
    params = restore_params(workdir / "params", target)
  else:
    raise FileNotFoundError(
        f"{workdir} has neither checkpoints/ nor params/: nothing to load")
  return cfg, params, tokenizer_dir


PARAMS, OPT, DATA, META = "params", "opt", "data", "meta"
INTEGRITY = "integrity"


def restore_train_params(checkpoint_dir: pathlib.Path, target: Any,
                         step: int | None) -> Any:
  """Only the policy parameters of a training checkpoint (export, eval)."""
  with ocp.CheckpointManager(pathlib.Path(checkpoint_dir).absolute()) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {checkpoint_dir}; available: "
          f"{mngr.all_steps()}")
    items = {PARAMS: ocp.args.StandardRestore(target)}
    if (mngr.directory / str(step) / INTEGRITY).exists():
      items[INTEGRITY] = ocp.args.JsonRestore()
    out = mngr.restore(step, args=ocp.args.Composite(**items))
  recorded = out[INTEGRITY]["arrays"] if INTEGRITY in items else {}
  try:
    check_arrays(PARAMS, recorded.get(PARAMS, {}), out[PARAMS])
  except ChecksumMismatch as e:
    raise CheckpointError(f"checkpoint step {step} in {checkpoint_dir} "
                          f"cannot be used: {e}") from None
  return out[PARAMS]


class TrainCheckpointer:
  """One orbax CheckpointManager for a training workdir.

  Items per step: `params` (the policy), `opt` (optimizer state, reference
  parameters, counters), `data` (the grain iterator's state, JSON), `meta`
  (JSON: loop counters, config, versions). Params are their own item so
  export and evaluation restore them without knowing the optimizer. Saves
  are async; restores go into abstract targets carrying the wanted
  shardings, so a run resumes onto another mesh.

  Multi-host: every process calls `save` and `restore` (orbax writes each
  array shard from the process that holds it). Every process iterates the
  same global prompt stream (loop/experiment.py), so the iterator state is one
  JSON item written by the primary host, not grain's per-process files
  (`process_<i>-of-<n>.json`), and a run resumes on another process count.
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    logging.getLogger("absl").addFilter(_DROP_TRACEBACK)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            # A save cut short (full disk, kill -9) leaves a temporary
            # folder; it is removed on the next start.
            create=True, cleanup_tmp_directories=True))
    self._pending: int | None = None     # the step of a save in flight
    self._failed = False

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any,
           meta: dict[str, Any]) -> None:
    """Starts an (async) save of `state` (a TrainState) at `step`."""
    rest = {"step": state.step, "updates": state.updates,
            "skipped": state.skipped, "opt_state": state.opt_state,
            "ref_params": state.ref_params}
    items = {PARAMS: ocp.args.StandardSave(state.params),
             OPT: ocp.args.StandardSave(rest),
             META: ocp.args.JsonSave(meta)}
    record = {"arrays": {PARAMS: array_checksums(state.params),
                         OPT: array_checksums(rest)},
              "json": {META: json_digest(meta)}}
    if data_iterator is not None:
      data_state = data_iterator.get_state()
      items[DATA] = ocp.args.JsonSave(data_state)
      record["json"][DATA] = json_digest(data_state)
    items[INTEGRITY] = ocp.args.JsonSave(record)
    self.wait()                        # a failed earlier save stops here
    try:
      self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # orbax and tensorstore raise many types
      raise self._save_error(step, e) from None
    self._pending = step
    if not self._mngr.is_saving_in_progress():
      self.wait()                      # synchronous saves: errors now

  def check(self) -> None:
    """Raises `CheckpointError` if a background save has failed (does not
    wait for one still running; the loop calls it at every step start)."""
    if self._pending is not None and not self._mngr.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; raises `CheckpointError` if it failed."""
    step, self._pending = self._pending, None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # orbax and tensorstore raise many types
      raise self._save_error(step, e) from None

  def _save_error(self, step: int | None, error: BaseException
                  ) -> CheckpointError:
    self._failed = True
    good = [s for s in self._mngr.all_steps() if s != step]
    return CheckpointError(
        f"checkpoint step {step} could not be saved to {self.directory}/"
        f"{step}: {error_text(error)}; the run stopped. Fix that, then rerun "
        "the same command: it resumes from "
        + (f"step {max(good)}, the last saved checkpoint" if good
           else "the start (no checkpoint was saved)"))

  def restore_latest(self, abstract_state: Any, data_iterator: Any
                     ) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that reads back intact.

    Each step is read up to `READ_TRIES` times. A step whose reads fail
    with an error that proves damage (a missing or truncated file, a
    checksum mismatch) is reported in one warning line and, once an older
    step restored, moved to `checkpoints.damaged/` (so that the step number
    can be saved again); the next older step is tried. Any other error (I/O,
    permissions, timeouts) stops here with nothing moved. With several
    processes each outcome is gathered and process 0 decides, for all.

    Returns:
      (step, state, meta), or None when there is no checkpoint.

    Raises:
      CheckpointError: there are checkpoints but none reads back, or a read
        failed with an error that does not prove damage.
    """
    steps = integrity.shared_steps(self.all_steps())
    damaged, reason = [], ""
    for i, step in enumerate(steps):
      outcome, out, why = self._read_agreed(step, abstract_state,
                                            data_iterator)
      if outcome == integrity.OK:
        state, meta = self._assemble(out, abstract_state, data_iterator,
                                     step)
        self._set_aside(damaged)
        return step, state, meta
      if outcome == integrity.UNREACHABLE:
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} could not be read "
            f"in {READ_TRIES} tries ({why}), an error that does not show "
            "damage; nothing was moved or cut back. Rerun once the storage "
            f"reads again (or, if step {step} is lost for good, move "
            f"{self.directory}/{step} aside to resume from an older step)")
      reason = why
      damaged.append(step)
      log.warning("checkpoint step %d in %s cannot be read (%s); %s", step,
                  self.directory, reason,
                  f"falling back to step {steps[i + 1]}"
                  if i + 1 < len(steps) else "no older checkpoint")
    if damaged:
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be read (steps "
          f"{sorted(damaged)}; step {damaged[-1]}: {reason}); restore them, "
          "or move that directory aside to start the run afresh")
    return None

  def _read_agreed(self, step: int, abstract_state: Any, data_iterator: Any
                   ) -> tuple[int, Any, str]:
    """Reads and verifies `step` (retried); every process gets the same
    outcome (`integrity.OK`, `DAMAGED` or `UNREACHABLE`), the restored
    items, and this process's reason."""
    code, error = integrity.OK, None
    for attempt in range(READ_TRIES):
      if attempt:
        self._mngr.reload()
      try:
        out, error = self._read(step, abstract_state, data_iterator), None
      except Exception as e:  # orbax and tensorstore raise many types
        out, error = None, e
      code = integrity.agree(
          integrity.OK if error is None else integrity.DAMAGED
          if integrity.proves_damage(error) else integrity.UNREACHABLE)
      if code == integrity.OK:
        try:  # a collective: only once every process holds the arrays
          self._verify(out)
        except ChecksumMismatch as e:
          error = e
        code = integrity.agree(integrity.OK if error is None
                               else integrity.DAMAGED)
      if code == integrity.OK:
        if attempt:
          log.info("checkpoint step %d read on try %d", step, attempt + 1)
        return code, out, ""
      if attempt + 1 < READ_TRIES:
        delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
        log.info("checkpoint step %d in %s: read failed (%s); trying again "
                 "in %g s", step, self.directory,
                 error_text(error) if error else "on another process", delay)
        time.sleep(delay)
    why = error_text(error) if error is not None else (
        "it cannot be read on another process")
    return code, None, why

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable steps to `checkpoints.damaged/<step>` (process 0)."""
    if not steps:
      return
    aside = self.directory.parent / DAMAGED_DIR
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      for step in steps:
        target = aside / str(step)
        if target.exists():
          shutil.rmtree(target)
        os.replace(self.directory / str(step), target)
      log.info("moved unreadable checkpoint steps %s to %s", steps, aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoints set aside")
    self._mngr.reload()

  def _read(self, step: int, abstract_state: Any, data_iterator: Any):
    """The step's items as orbax restores them (not yet checked)."""
    rest = {"step": abstract_state.step, "updates": abstract_state.updates,
            "skipped": abstract_state.skipped,
            "opt_state": abstract_state.opt_state,
            "ref_params": abstract_state.ref_params}
    items = {PARAMS: ocp.args.StandardRestore(abstract_state.params),
             OPT: ocp.args.StandardRestore(rest),
             META: ocp.args.JsonRestore()}
    step_dir = self.directory / str(step)
    legacy = sorted((step_dir / DATA).glob("process_*-of-*.json"))
    if data_iterator is not None and not legacy:
      items[DATA] = ocp.args.JsonRestore()
    if (step_dir / INTEGRITY).exists():
      items[INTEGRITY] = ocp.args.JsonRestore()
    # The item handlers themselves, not the manager: its restore runs
    # barriers, which a process whose read failed would not reach while
    # the others wait in them. The outcome is agreed on afterwards instead.
    handler = ocp.CompositeCheckpointHandler()
    try:
      restored = handler.restore(step_dir, ocp.args.Composite(**items))
    finally:
      handler.close()
    out = {key: restored[key] for key in items}
    if data_iterator is not None:
      # Checkpoints written by grain's own handler hold one file per
      # process, all equal (a global iterator): any of them will do.
      out[DATA] = (json.loads(legacy[0].read_text()) if legacy
                   else out[DATA])
    return out

  def _verify(self, out: dict[str, Any]) -> None:
    """Raises `ChecksumMismatch` if `out` differs from its integrity record
    (every process computes the sums: call it on all of them)."""
    record = out.get(INTEGRITY) or {"arrays": {}, "json": {}}
    for item in (PARAMS, OPT):
      check_arrays(item, record["arrays"].get(item, {}), out[item])
    for item, digest in record["json"].items():
      if item in out and json_digest(out[item]) != digest:
        raise ChecksumMismatch(
            f"the {item} item differs from the checksum recorded when it was "
            "saved: its bytes changed on disk")

  def _assemble(self, out: dict[str, Any], abstract_state: Any,
                data_iterator: Any, step: int):
    del step
    if data_iterator is not None:
      data_iterator.set_state(out[DATA])
    opt = out[OPT]
    state = abstract_state.replace(
        params=out[PARAMS], opt_state=opt["opt_state"],
        ref_params=opt["ref_params"], step=opt["step"],
        updates=opt["updates"], skipped=opt["skipped"])
    return state, out[META]

  def restore(self, step: int, abstract_state: Any, data_iterator: Any):
    """Restores `(state, meta)` of `step`, checked against its integrity
    record; `data_iterator` is set in place.

    Raises:
      ChecksumMismatch: the restored data differ from what was saved.
    """
    out = self._read(step, abstract_state, data_iterator)
    self._verify(out)
    return self._assemble(out, abstract_state, data_iterator, step)

  def close(self) -> None:
    """Waits for the save in flight (raising if it failed), then closes.

    After a reported failure, orbax's own re-raise on closing is dropped.
    """
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self._mngr.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise
