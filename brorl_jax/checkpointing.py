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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from brorl_jax.model.config import ModelConfig
from brorl_jax.model.transformer import Policy

log = logging.getLogger(__name__)
MODEL_CONFIG_FILE = "model_config.json"
# Damaged steps are moved here (beside `checkpoints/`), not deleted.
DAMAGED_DIR = "checkpoints.damaged"


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


def error_text(error: BaseException) -> str:
  """The cause of a failed save or restore in one line.

  OS errors (also those tensorstore reports as `os_error_code=N` inside a
  long message) read `[Errno 28] No space left on device`; anything else is
  the exception's first line, at most 300 characters.
  """
  chain, seen = [], error
  while seen is not None and len(chain) < 20:
    if isinstance(seen, OSError) and seen.errno:
      return f"[Errno {seen.errno}] {seen.strerror or os.strerror(seen.errno)}"
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  texts = " ".join(str(e) for e in chain)
  code = re.search(r"os_error_code='?(\d+)", texts)
  if code:
    return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}"
  # tensorstore's status ("DATA_LOSS: Error reading ...") says the most.
  status = re.search(r"\b([A-Z]+(?:_[A-Z]+)+): [^\n]+", texts)
  if status:
    return status.group(0)[:300]
  first = (str(error).strip().splitlines() or [""])[0]
  first = first.split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {first[:300]}"


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

def save_params(path: str | pathlib.Path, params: Any) -> None:
  """Saves a parameter tree (blocking; all processes call it)."""
  path = pathlib.Path(path).absolute()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()


def restore_params(path: str | pathlib.Path, target: Any) -> Any:
  """Restores a parameter tree into `target` (ShapeDtypeStructs with
  shardings, or arrays whose shardings are reused)."""
  path = pathlib.Path(path).absolute()
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None)),
      target)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract)


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


def restore_train_params(checkpoint_dir: pathlib.Path, target: Any,
                         step: int | None) -> Any:
  """Only the policy parameters of a training checkpoint (export, eval)."""
  with ocp.CheckpointManager(pathlib.Path(checkpoint_dir).absolute()) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise FileNotFoundError(
          f"no checkpoint for step {step} in {checkpoint_dir}; available: "
          f"{mngr.all_steps()}")
    return mngr.restore(step, args=ocp.args.Composite(
        **{PARAMS: ocp.args.StandardRestore(target)}))[PARAMS]


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
    if data_iterator is not None:
      items[DATA] = ocp.args.JsonSave(data_iterator.get_state())
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
    """Restores the newest checkpoint that reads back.

    A step that cannot be read (a truncated or missing file) is reported in
    one warning line and moved to `checkpoints.damaged/`, so later saves of
    that step number can happen; the next older step is tried.

    Returns:
      (step, state, meta), or None when there is no checkpoint.

    Raises:
      CheckpointError: there are checkpoints but none reads back.
    """
    steps = sorted(self.all_steps(), reverse=True)
    damaged, reason = [], ""
    for i, step in enumerate(steps):
      try:
        state, meta = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # orbax and tensorstore raise many types
        reason = error_text(e)
        damaged.append(step)
        log.warning("checkpoint step %d in %s cannot be read (%s); %s", step,
                    self.directory, reason,
                    f"falling back to step {steps[i + 1]}"
                    if i + 1 < len(steps) else "no older checkpoint")
        continue
      self._set_aside(damaged)
      return step, state, meta
    if damaged:
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be read (steps "
          f"{sorted(damaged)}; step {damaged[-1]}: {reason}); restore them, "
          "or move that directory aside to start the run afresh")
    return None

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
      log.warning("moved unreadable checkpoint steps %s to %s", steps, aside)
    if jax.process_count() > 1:
      # Imported here: multihost_utils is only needed by multi-process runs.
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("checkpoints set aside")
    self._mngr.reload()

  def restore(self, step: int, abstract_state: Any, data_iterator: Any):
    """Restores `(state, meta)`; `data_iterator` is set in place."""
    rest = {"step": abstract_state.step, "updates": abstract_state.updates,
            "skipped": abstract_state.skipped,
            "opt_state": abstract_state.opt_state,
            "ref_params": abstract_state.ref_params}
    items = {PARAMS: ocp.args.StandardRestore(abstract_state.params),
             OPT: ocp.args.StandardRestore(rest),
             META: ocp.args.JsonRestore()}
    legacy = sorted((self.directory / str(step) / DATA).glob(
        "process_*-of-*.json"))
    if data_iterator is not None and not legacy:
      items[DATA] = ocp.args.JsonRestore()
    out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      # Checkpoints written by grain's own handler hold one file per
      # process, all equal (a global iterator): any of them will do.
      data_state = (json.loads(legacy[0].read_text()) if legacy
                    else out[DATA])
      data_iterator.set_state(data_state)
    opt = out[OPT]
    state = abstract_state.replace(
        params=out[PARAMS], opt_state=opt["opt_state"],
        ref_params=opt["ref_params"], step=opt["step"],
        updates=opt["updates"], skipped=opt["skipped"])
    return state, out[META]

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
