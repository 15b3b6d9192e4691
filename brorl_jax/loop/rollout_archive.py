"""The rollouts archive: every step's rollouts in a ragged tensorstore store.

Layout of `W/rollouts/` (one zarr v2 array per folder, written with
tensorstore). Ragged fields are stored as levanter's `JaggedArrayStore` does,
flat data plus offsets; here `*_offsets[i]` is the *end* of row i in the flat
array (its start is the previous row's end, or 0), so no leading zero is kept:

  prompt_tokens        int32   [NPT]  prompt ids of every prompt, flat
  prompt_offsets       int64   [NP]   end of each prompt in prompt_tokens
  rollout_step         int32   [NR]   RL step of each rollout
  rollout_prompt       int32   [NR]   prompt index p within its step
  rollout_index        int32   [NR]   rollout index g within its group
  reward               float32 [NR]
  status               uint8   [NR]   verifier status, `STATUS_CODES`
  completion_offsets   int64   [NR]   end of each completion, flat arrays
  completion_tokens    int32   [NCT]  completion ids (only the first `length`)
  completion_logprobs  float32 [NCT]  sampler log-probs of those tokens
  steps                int64   [S, 5] per step: step, then the end of its
                                      rows in prompt_offsets, rollout_*,
                                      prompt_tokens, completion_tokens

Rollouts of a step are in (p, g) row-major order. `steps` is the commit
record: an append writes the data arrays first, awaits them (tensorstore's
file driver syncs), and only then adds the step's row, so a crash in between
leaves extra data past the committed ends, which reads ignore and the next
open cuts away. Rows of `steps` start as -1 (the fill value), so a row whose
resize landed but whose write did not is recognized as uncommitted.
Single-row reads are slow (levanter's warning): `read_step` reads whole
steps with one request per array.

Texts for reading go to `samples.jsonl` beside the arrays, one JSON object
per line (`{"step", "prompt", "completion", "reward", "status"}`).
"""

from __future__ import annotations

import pathlib
import time
from typing import Any, Mapping, Sequence

import numpy as np
import tensorstore as ts

from brorl_jax.loop import metrics as metrics_lib
from brorl_jax.rewards import STATUS_CODES

SAMPLES_FILE = "samples.jsonl"


def _writable(text: str) -> str:
  """`text` with what UTF-8 cannot encode (lone surrogates, e.g. from a data
  row) spelled as `\\udXXX`, so that any text can be written."""
  return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Verifier status as stored (uint8): the reward pool's status strings.
STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}

# Zarr chunk lengths (elements): about 1 MiB for the flat token arrays.
_TOKEN_CHUNK = 1 << 18
_ROW_CHUNK = 1 << 16
_STEP_CHUNK = 1024
_STEP_COLUMNS = 5  # step, prompt_end, rollout_end, prompt_token_end,
                   # completion_token_end

# name -> (dtype, chunk length, kind of row): a row is a prompt, a rollout,
# a prompt token or a completion token; the column of `steps` holding the
# end of that kind of row in a step.
_ARRAYS = {
    "prompt_tokens": ("<i4", _TOKEN_CHUNK, 3),
    "prompt_offsets": ("<i8", _ROW_CHUNK, 1),
    "rollout_step": ("<i4", _ROW_CHUNK, 2),
    "rollout_prompt": ("<i4", _ROW_CHUNK, 2),
    "rollout_index": ("<i4", _ROW_CHUNK, 2),
    "reward": ("<f4", _ROW_CHUNK, 2),
    "status": ("|u1", _ROW_CHUNK, 2),
    "completion_offsets": ("<i8", _ROW_CHUNK, 2),
    "completion_tokens": ("<i4", _TOKEN_CHUNK, 4),
    "completion_logprobs": ("<f4", _TOKEN_CHUNK, 4),
}
# lz4 is fast enough not to show next to a step's sampling time; the byte
# shuffle helps the small ints and offsets.
_COMPRESSOR = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}


def encode_status(status: Any) -> np.ndarray:
  """Encodes verifier statuses ('ok' | 'timeout' | 'error', or their codes).

  Args:
    status: `[P, G]` array-like of strings or small ints (`STATUS_CODES`).

  Returns:
    `[P, G]` uint8 codes.

  Raises:
    ValueError: an unknown status string or code.
  """
  array = np.asarray(status)
  if array.dtype.kind in "iu":
    if array.size and not np.isin(array, list(STATUS_NAMES)).all():
      raise ValueError(f"status codes must be in {STATUS_NAMES}, got "
                       f"{sorted(set(array.ravel().tolist()))}")
    return array.astype(np.uint8)
  try:
    return np.vectorize(STATUS_CODES.__getitem__, otypes=[np.uint8])(array)
  except KeyError as e:
    raise ValueError(f"unknown verifier status {e}; expected one of "
                     f"{list(STATUS_CODES)}") from e


def _spec(path: pathlib.Path, dtype: str, chunks: list[int],
          fill_value: int | float) -> dict:
  return {
      "driver": "zarr",
      "kvstore": {"driver": "file", "path": str(path)},
      "metadata": {"dtype": dtype, "chunks": chunks, "fill_value": fill_value,
                   "compressor": _COMPRESSOR},
  }


def _open_array(path: pathlib.Path, dtype: str, chunks: list[int],
                fill_value: int | float = 0, *,
                create: bool = True) -> ts.TensorStore:
  """Opens a resizable zarr array, creating it empty when it is missing.

  The metadata (dtype, chunks, compressor) is checked against an existing
  array. The shape is given only on creation: tensorstore checks a given
  shape against an existing array's, and these arrays grow.
  """
  spec = _spec(path, dtype, chunks, fill_value)
  try:
    return ts.open(spec, open=True).result()
  except ValueError as e:
    if "NOT_FOUND" not in str(e):
      raise
    if not create:
      raise FileNotFoundError(f"{path}: no rollout archive array here") from e
  spec["metadata"]["shape"] = [0] + chunks[1:]
  return ts.open(spec, create=True, open=True).result()


def _flat_ends(lengths: np.ndarray, start: int) -> np.ndarray:
  return start + np.cumsum(lengths, dtype=np.int64)


class RolloutArchive:
  """Appends each RL step's rollouts to `directory`; reads them back.

  With `enabled=False` every method is a no-op (reads return nothing) and
  nothing is created: e.g. processes that do not own an archive. One writer
  per directory: in a multi-host run give each process its own directory
  (`rollouts/process_<i>`) or enable only one. Readers beside a running
  writer open with `read_only=True` and see the steps committed by then.
  """

  def __init__(self, directory: str | pathlib.Path, *, enabled: bool = True,
               read_only: bool = False):
    """Opens the archive, creating it when missing (unless read-only).

    A crash between an append's data writes and its commit leaves data past
    the committed ends; a writer cuts it here.

    Args:
      directory: the archive folder (`W/rollouts`).
      enabled: False makes every call a no-op.
      read_only: open an existing archive for reading only: nothing is
        created or repaired (safe beside a running writer); writes raise.

    Raises:
      FileNotFoundError: `read_only` and there is no archive.
    """
    self.directory = pathlib.Path(directory)
    self.enabled = enabled
    self.read_only = read_only
    self._arrays: dict[str, ts.TensorStore] = {}
    if not enabled:
      return
    if not read_only:
      self.directory.mkdir(parents=True, exist_ok=True)
    self._steps = _open_array(self.directory / "steps",
                              "<i8", [_STEP_CHUNK, _STEP_COLUMNS], -1,
                              create=not read_only)
    table = self._steps.read().result()                       # [S, 5]
    # Leading committed rows; a trailing -1 row is a resize without its
    # write.
    committed = int(np.argmax(np.append(table[:, 0] < 0, True)))
    self._table = table[:committed]
    for name, (dtype, chunk, _) in _ARRAYS.items():
      self._arrays[name] = _open_array(self.directory / name, dtype, [chunk],
                                       create=not read_only)
    if not read_only:
      self._cut_to_committed()

  # -- bookkeeping ------------------------------------------------------------

  def _ends(self, num_steps: int) -> np.ndarray:
    """`[5]` ends of each kind of row after the first `num_steps` steps."""
    if num_steps == 0:
      return np.zeros(_STEP_COLUMNS, np.int64)
    return self._table[num_steps - 1]

  def _check_writable(self) -> None:
    if self.read_only:
      raise PermissionError(f"rollout archive {self.directory} was opened "
                            "read-only")

  def _cut_to_committed(self) -> None:
    """Shrinks every array to the committed ends (after a crash/truncate)."""
    futures = []
    if self._steps.shape[0] > len(self._table):
      futures.append(self._steps.resize(
          exclusive_max=[len(self._table), None], shrink_only=True))
    ends = self._ends(len(self._table))
    names = []
    for name, (_, _, column) in _ARRAYS.items():
      if self._arrays[name].shape[0] > ends[column]:
        names.append(name)
        futures.append(self._arrays[name].resize(
            exclusive_max=[int(ends[column])], shrink_only=True))
    results = [f.result() for f in futures]
    if self._steps.shape[0] > len(self._table):
      self._steps = results.pop(0)
    for name, array in zip(names, results):
      self._arrays[name] = array

  def steps(self) -> list[int]:
    """The committed steps, ascending."""
    if not self.enabled:
      return []
    return [int(s) for s in self._table[:, 0]]

  # -- writing ----------------------------------------------------------------

  def append(self, step: int, *, prompt_ids: Sequence[np.ndarray],
             completion_ids: np.ndarray, lengths: np.ndarray,
             logprobs: np.ndarray, rewards: np.ndarray,
             status: Any) -> float:
    """Appends one step's rollouts (durable when it returns).

    Args:
      step: the RL step; must exceed every stored step (on resume, call
        `truncate_after` first).
      prompt_ids: P 1-D int arrays, each prompt's ids without padding.
      completion_ids: `[P, G, T]` int completion ids; only the first
        `lengths[p, g]` of each row are stored.
      lengths: `[P, G]` int, response lengths (0 <= length <= T).
      logprobs: `[P, G, T]` float, the sampler's log-probs of those tokens.
      rewards: `[P, G]` float.
      status: `[P, G]` verifier statuses, strings 'ok' | 'timeout' |
        'error' or their codes (`STATUS_CODES`: 0, 1, 2).

    Returns:
      Seconds spent (0.0 when disabled).

    Raises:
      ValueError: inconsistent shapes or a step that is not new.
    """
    if not self.enabled:
      return 0.0
    self._check_writable()
    start_time = time.perf_counter()
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    if len(self._table) and step <= self._table[-1, 0]:
      raise ValueError(
          f"rollout archive {self.directory}: step {step} is not after the "
          f"last stored step {int(self._table[-1, 0])}; on resume call "
          "truncate_after(checkpoint_step) first")
    rows = self._rows(step, prompt_ids, completion_ids, lengths, logprobs,
                      rewards, status)
    # After an append that failed part-way in this process (no I/O when
    # every array is at its committed length).
    self._cut_to_committed()
    ends = self._ends(len(self._table))
    new_ends = ends.copy()
    new_ends[0] = step
    for name, values in rows.items():
      new_ends[_ARRAYS[name][2]] = ends[_ARRAYS[name][2]] + len(values)
    # Data first: resize every array, then write every slice, all at once.
    resized = [self._arrays[name].resize(
        exclusive_max=[int(new_ends[_ARRAYS[name][2]])], expand_only=True)
               for name in rows]
    for name, future in zip(rows, resized):
      self._arrays[name] = future.result()
    writes = []
    for name, values in rows.items():
      begin = int(ends[_ARRAYS[name][2]])
      writes.append(
          self._arrays[name][begin:begin + len(values)].write(values))
    for future in writes:
      future.result()
    # Commit: the step's row. A crash before this line leaves the step out.
    num_steps = len(self._table)
    self._steps = self._steps.resize(exclusive_max=[num_steps + 1, None],
                                     expand_only=True).result()
    self._steps[num_steps].write(new_ends).result()
    self._table = np.concatenate([self._table, new_ends[None]])
    return time.perf_counter() - start_time

  def _rows(self, step, prompt_ids, completion_ids, lengths, logprobs,
            rewards, status) -> dict[str, np.ndarray]:
    """Validates one step's arrays and flattens them into new rows."""
    completion_ids = np.asarray(completion_ids)
    logprobs = np.asarray(logprobs, np.float32)
    lengths = np.asarray(lengths)
    if completion_ids.ndim != 3:
      raise ValueError(f"completion_ids must be [P, G, T], got shape "
                       f"{completion_ids.shape}")
    num_prompts, group, max_len = completion_ids.shape
    if num_prompts == 0 or group == 0:
      raise ValueError(f"a step needs P >= 1 prompts and G >= 1 rollouts, "
                       f"got completion_ids of shape {completion_ids.shape}")
    for name, array, shape in (
        ("logprobs", logprobs, completion_ids.shape),
        ("lengths", lengths, (num_prompts, group)),
        ("rewards", np.asarray(rewards), (num_prompts, group)),
        ("status", np.asarray(status), (num_prompts, group))):
      if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (from "
                         f"completion_ids [P, G, T]), got {array.shape}")
    if len(prompt_ids) != num_prompts:
      raise ValueError(f"prompt_ids has {len(prompt_ids)} prompts, "
                       f"completion_ids has P = {num_prompts}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > max_len):
      raise ValueError(f"lengths must lie in [0, T = {max_len}], got "
                       f"[{lengths.min()}, {lengths.max()}]")
    prompts = [np.asarray(p).reshape(-1) for p in prompt_ids]
    prompt_lengths = np.array([len(p) for p in prompts], np.int64)
    ends = self._ends(len(self._table))
    # Row-major (p, g, t) boolean selection concatenates the completions in
    # rollout order without a Python loop.
    keep = np.arange(max_len) < lengths[..., None]            # [P, G, T]
    grid_p, grid_g = np.meshgrid(np.arange(num_prompts), np.arange(group),
                                 indexing="ij")               # [P, G]
    return {
        "prompt_tokens": (np.concatenate(prompts).astype(np.int32)
                          if prompts else np.zeros(0, np.int32)),
        "prompt_offsets": _flat_ends(prompt_lengths, ends[3]),
        "rollout_step": np.full(num_prompts * group, step, np.int32),
        "rollout_prompt": grid_p.reshape(-1).astype(np.int32),
        "rollout_index": grid_g.reshape(-1).astype(np.int32),
        "reward": np.asarray(rewards, np.float32).reshape(-1),
        "status": encode_status(status).reshape(-1),
        "completion_offsets": _flat_ends(lengths.reshape(-1), ends[4]),
        "completion_tokens": completion_ids[keep].astype(np.int32),
        "completion_logprobs": logprobs[keep],
    }

  def truncate_after(self, step: int) -> list[int]:
    """Drops every step after `step` (resume from checkpoint `step`).

    Commits first (the `steps` rows are reset to -1 and cut), then shrinks
    the data arrays (`resize(..., shrink_only=True)`); `samples.jsonl` is
    cut too.

    Args:
      step: the last step to keep.

    Returns:
      The dropped steps.
    """
    if not self.enabled:
      return []
    self._check_writable()
    metrics_lib.truncate_jsonl(self.directory / SAMPLES_FILE, step)
    keep = int(np.searchsorted(self._table[:, 0], step, side="right"))
    dropped = [int(s) for s in self._table[keep:, 0]]
    if not dropped:
      return []
    # Reset the rows before cutting them: a later expand may bring the
    # old contents of a partly kept chunk back into view.
    self._steps[keep:len(self._table)].write(-1).result()
    self._table = self._table[:keep]
    self._cut_to_committed()
    return dropped

  def write_text_samples(self, step: int,
                         samples: Sequence[Mapping[str, Any]]) -> None:
    """Appends decoded samples to `samples.jsonl` (for people to read).

    Each line is `{"step", "prompt", "completion", "reward", "status", ...}`.

    Args:
      step: the RL step.
      samples: dicts with `prompt` and `completion` (str), and normally
        `reward` (number; None or non-finite -> null) and `status` (str;
        missing -> null). Other keys (e.g. `answer`) are kept: numbers and
        strings as they are, anything else as its `str`.

    Raises:
      ValueError: a sample without `prompt` or `completion`.
    """
    if not self.enabled:
      return
    self._check_writable()
    records = []
    for sample in samples:
      missing = {"prompt", "completion"} - set(sample)
      if missing:
        raise ValueError(f"text sample lacks {sorted(missing)}: "
                         f"{sorted(sample)}")
      record = {"step": int(step),
                "prompt": _writable(str(sample["prompt"])),
                "completion": _writable(str(sample["completion"])),
                "reward": None, "status": None}
      for key, value in sample.items():
        if key in ("prompt", "completion", "step"):
          continue
        if value is None or isinstance(value, str):
          record[key] = value if value is None else _writable(value)
        else:
          try:
            record[key] = metrics_lib.json_value(
                metrics_lib.scalar(key, value))
          except TypeError:
            record[key] = _writable(str(value))
      records.append(record)
    metrics_lib.append_jsonl(self.directory / SAMPLES_FILE, records)

  # -- reading ----------------------------------------------------------------

  def read_step(self, step: int) -> dict[str, Any]:
    """Reads one stored step.

    Args:
      step: a stored step (see `steps()`).

    Returns:
      `prompt_ids`: list of P int32 arrays; per rollout, in (p, g) order
      (R = P * G rows): `prompt_index`, `rollout_index`, `lengths` ([R]
      int), `rewards` ([R] float32), `status` ([R] uint8 codes),
      `completion_ids`, `logprobs` (lists of R arrays, int32 / float32,
      ragged); and `step`.

    Raises:
      KeyError: the step is not stored.
    """
    if not self.enabled:
      raise KeyError(f"rollout archive {self.directory} is disabled")
    index = np.flatnonzero(self._table[:, 0] == step)
    if not len(index):
      raise KeyError(f"step {step} is not in the rollout archive "
                     f"{self.directory} (stored: {self.steps()})")
    begin, end = self._ends(int(index[0])), self._ends(int(index[0]) + 1)
    futures = {name: self._arrays[name][int(begin[c]):int(end[c])].read()
               for name, (_, _, c) in _ARRAYS.items()}
    data = {name: f.result() for name, f in futures.items()}
    prompt_cuts = data["prompt_offsets"][:-1] - begin[3]
    completion_cuts = data["completion_offsets"][:-1] - begin[4]
    return {
        "step": int(step),
        "prompt_ids": np.split(data["prompt_tokens"], prompt_cuts),
        "prompt_index": data["rollout_prompt"],
        "rollout_index": data["rollout_index"],
        "lengths": np.diff(data["completion_offsets"], prepend=begin[4]),
        "rewards": data["reward"],
        "status": data["status"],
        "completion_ids": np.split(data["completion_tokens"],
                                   completion_cuts),
        "logprobs": np.split(data["completion_logprobs"], completion_cuts),
    }

  def read_text_samples(self) -> list[dict]:
    """The records of `samples.jsonl` ([] when there are none)."""
    path = self.directory / SAMPLES_FILE
    if not self.enabled or not path.exists():
      return []
    return metrics_lib.read_jsonl(path)

  def close(self) -> None:
    """Drops the handles (every append is already durable)."""
    self._arrays = {}

  def __enter__(self) -> RolloutArchive:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
