"""Per-step metrics: `W/metrics.jsonl` plus TensorBoard events (host only).

`metrics.jsonl` holds one JSON object per line, `{"step": int, <name>:
value, ...}`, with flat metric names such as `reward/mean`, `eval/pass@1`,
`mass/u2` or `time/sample_s`. Values are Python ints or floats. JSON has no
NaN or infinity, so a non-finite value is written as `null` (and read back
as `None`); TensorBoard gets the real value, which it can show. Several lines
may share a step (e.g. training and evaluation metrics written apart);
readers merge them by step.

Every write is flushed and fsynced, so a crash loses at most the line being
written; a torn last line is dropped when the file is reopened. On resume
from checkpoint step s the loop calls `truncate_after(s)`, so the file of a
resumed run equals that of an uninterrupted one (timing metrics aside), and
TensorBoard is told to purge events after s (`purge_step`).

TensorBoard events come from tensorboardX: `flax.metrics.tensorboard` would
import TensorFlow. A W&B run (`wandb_writer.py`), when given, gets every row
too.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pathlib
import sys
import tempfile
from typing import Any, Iterable, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"


def scalar(name: str, value: Any) -> int | float:
  """Converts a metric value to a Python int or float.

  Args:
    name: metric name, for the error message.
    value: a Python/numpy number, a 0-d or one-element numpy array, or a
      host-side JAX scalar (see `MetricsWriter.write` for device arrays).

  Returns:
    An int for integer and bool values, else a float (possibly non-finite).

  Raises:
    TypeError: the value is not numeric or has more than one element.
  """
  if isinstance(value, (bool, np.bool_)):
    return int(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    array = np.asarray(value)
    if array.size == 1 and (array.dtype.kind in "biuf"):
      return scalar(name, array.reshape(()).item())
  raise TypeError(f"metric {name!r}: expected a numeric scalar, got "
                  f"{type(value).__name__} {value!r:.80}")


def json_value(value: int | float | None) -> int | float | None:
  """The JSON form of a scalar: non-finite floats become None (`null`)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _fsync_append(path: pathlib.Path, text: str) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def append_jsonl(path: str | pathlib.Path, records: Iterable[Mapping]) -> None:
  """Appends records as JSON lines, flushed and fsynced (NaN -> error)."""
  text = "".join(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n"
                 for r in records)
  if text:
    _fsync_append(pathlib.Path(path), text)


def repair_jsonl_tail(path: str | pathlib.Path) -> bool:
  """Cuts a torn last line (no trailing newline) left by a crash.

  Args:
    path: a JSONL file; a missing file is left alone.

  Returns:
    True when something was cut.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return False
  with open(path, "rb+") as f:
    data = f.read()
    if not data or data.endswith(b"\n"):
      return False
    f.truncate(data.rfind(b"\n") + 1)
    f.flush()
    os.fsync(f.fileno())
  return True


def truncate_jsonl(path: str | pathlib.Path, step: int) -> int:
  """Drops the lines whose `"step"` is greater than `step`.

  The file is rewritten to a temporary file in the same folder and renamed
  over the original, so a crash leaves either the old or the new file. A
  torn last line is dropped too.

  Args:
    path: a JSONL file of objects with an int `"step"`; missing: no-op.
    step: the last step to keep (the checkpoint step being resumed).

  Returns:
    The number of lines dropped.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return 0
  kept, dropped = [], 0
  lines = path.read_text(encoding="utf-8").split("\n")
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record_step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      if number == len(lines):  # torn last line (no newline after it)
        dropped += 1
        continue
      raise ValueError(f"{path}:{number}: not a JSON object with a 'step' "
                       f"({e}); fix or remove the line") from e
    if record_step > step:
      dropped += 1
    else:
      kept.append(line + "\n")
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return dropped


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  """Reads a JSONL file; a torn last line is skipped.

  Raises:
    FileNotFoundError: naming the path.
    ValueError: a malformed line other than the last, naming file and line.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  lines = path.read_text(encoding="utf-8").split("\n")
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):
        continue
      raise ValueError(f"{path}:{number}: invalid JSON ({e})") from e
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{number}: expected a JSON object")
    records.append(record)
  return records


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, in file order.

  Each is `{"step": int, name: int | float | None, ...}`; `None` stands for
  a non-finite value.

  Raises:
    FileNotFoundError: the file is missing (the message names its path).
  """
  return read_jsonl(pathlib.Path(workdir) / METRICS_FILE)


def _device_get(metrics: Mapping[str, Any]) -> Mapping[str, Any]:
  """Fetches JAX arrays with one explicit transfer.

  `np.asarray` on a device array is an implicit transfer, refused under
  `jax_transfer_guard="disallow"`; `jax.device_get` is explicit. JAX is not
  imported here unless the caller already did (the plot CLI needs no JAX).
  """
  jax = sys.modules.get("jax")
  if jax is None or not any(isinstance(v, jax.Array)
                            for v in metrics.values()):
    return metrics
  return jax.device_get(dict(metrics))


class MetricsWriter:
  """Appends per-step metrics to `W/metrics.jsonl` and TensorBoard events.

  Use as a context manager or call `close()`. With `enabled=False` (every
  process but 0 in a multi-host run) every method is a no-op and nothing is
  created.
  """

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True,
               enabled: bool = True, wandb: Any = None):
    """Opens (appends to) the workdir's metrics.

    Args:
      workdir: the run's workdir; created if missing.
      tensorboard: also write TensorBoard event files into `workdir`.
      enabled: False makes every call a no-op.
      wandb: a `wandb_writer.WandbWriter` (`log(step, values)`, `close()`)
        that gets every row written, or None.
    """
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.enabled = enabled
    self._tensorboard = tensorboard
    self._tb = None
    self._purge_step: int | None = None
    self._wandb = wandb if enabled else None
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      repair_jsonl_tail(self.path)

  def _summary_writer(self):
    # Created on first use so that `truncate_after`, called right after
    # opening on resume, can pass `purge_step` to it. Imported here: it takes
    # about a second, which the plot CLI (a reader only) need not pay.
    if self._tb is None:
      # Imported here: see above (a second the plot CLI need not pay).
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(str(self.workdir),
                                            purge_step=self._purge_step)
      # Purge once: a writer reopened later must keep the new events.
      self._purge_step = None
    return self._tb

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
    """Writes one line for `step` and the same scalars to TensorBoard.

    Args:
      step: the RL step (int-like).
      metrics: flat name -> numeric scalar (Python, numpy or JAX; device
        arrays are fetched with one `jax.device_get`).

    Returns:
      The record as written to JSON (non-finite values as None); `{}` when
      disabled.

    Raises:
      TypeError: a value is not a numeric scalar (names the metric).
      ValueError: a metric is named "step".
    """
    if not self.enabled:
      return {}
    if "step" in metrics:
      raise ValueError("metric name 'step' is reserved for the step number")
    step = scalar("step", step)
    if not isinstance(step, int):
      raise TypeError(f"step must be an integer, got {step!r}")
    values = {k: scalar(k, v) for k, v in _device_get(metrics).items()}
    record = {"step": step} | {k: json_value(v) for k, v in values.items()}
    append_jsonl(self.path, [record])
    if self._tensorboard:
      tb = self._summary_writer()
      for name, value in values.items():
        tb.add_scalar(name, value, global_step=step)
      tb.flush()
    if self._wandb is not None:
      self._wandb.log(step, values)
    return record

  def truncate_after(self, step: int) -> int:
    """Drops the lines of steps after `step` (resume from checkpoint `step`).

    The file is rewritten atomically (temp file + rename). TensorBoard is
    told to discard events with a later step (`purge_step = step + 1`).

    Args:
      step: the checkpoint step the run resumes from.

    Returns:
      The number of lines dropped (0 when disabled).
    """
    if not self.enabled:
      return 0
    dropped = truncate_jsonl(self.path, step)
    self._purge_step = step + 1
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    return dropped

  def flush(self) -> None:
    """Flushes TensorBoard (the JSONL file is flushed on every write)."""
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Closes the TensorBoard writer (further writes reopen it) and finishes
    the W&B run (further writes skip it)."""
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
