"""Dataset records and their JSONL / Parquet readers.

One row is one prompt with its reference (DESIGN.md §5):

  {"prompt": str | "messages": [{"role", "content"}, ...],
   "answer": str, "verifier": str, "task"?: str, "tests"?: {...},
   "meta"?: {...}}

* `prompt` (raw user text) or `messages` (a conversation): exactly one.
* `answer`: the reference the verifier compares against; numbers are read as
  their shortest decimal string (`27` -> "27", `0.5` -> "0.5", and an
  integral float `69.0` -> "69", the form `\\boxed{69}` and the `exact`
  verifier use); NaN and infinities are refused. It may be omitted when
  `tests` is given (code tasks), and is then "".
* `verifier`: a verifier name (`math`, `numeric`, `exact`, `choice`, `code`,
  `reasoning_gym`, `countdown`, ...); a file spec may give a default.
* `task`: the task family for per-task metrics; default: the file spec's
  `task`, else the file name's stem (`math500.jsonl` -> "math500").
* `tests`: for code, `{"inputs": [...], "outputs": [...], "fn_name"?: str}`
  (a JSON string holding that object is accepted too).
* `meta`: free-form; verifiers receive it as keyword arguments. Other
  top-level keys are moved into `meta` under their own name (an error if
  `meta` already has that key), so nothing is dropped.

Every string of a row (keys and values, nested ones included) must be valid
UTF-8 text: a lone surrogate (`"\\ud800"` in JSON) cannot be tokenized or
written back out, so it makes the row malformed.

A malformed row raises `DataError` naming the file, the line (JSONL, 1-based)
or row (Parquet, 1-based) and the field, or with `skip_bad_rows` is skipped
and counted in `ReadResult.bad_rows`.

A file spec may also name a Hugging Face `datasets` source (a `save_to_disk`
directory, `DIR:SPLIT`, or `hf:NAME[:CONFIG]@SPLIT`: `hf_datasets.py`), and
carries the `data` section's column mapping (`columns.py`), applied to every
kind of file before a row is parsed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from brorl_jax.data import hf_datasets
from brorl_jax.data.columns import ColumnError, Columns

_log = logging.getLogger(__name__)

_FIELDS = ("prompt", "messages", "answer", "verifier", "task", "tests", "meta")
_FIX = ("fix the row, or set data.skip_bad_rows=True to skip and count bad "
        "rows")


class DataError(ValueError):
  """A bad data file or row.

  Attributes:
    path: the file.
    line: 1-based line (JSONL) or row (Parquet), or None for the whole file.
    field: the offending field, or None.
  """

  def __init__(self, path, line: int | None, field: str | None, message: str):
    where = str(path) + (f":{line}" if line is not None else "")
    what = f" field '{field}':" if field else ""
    super().__init__(f"{where}:{what} {message}")
    self.path, self.line, self.field = str(path), line, field


class _FieldError(Exception):
  """A problem with one field of a row (location added by the reader)."""

  def __init__(self, field: str | None, message: str):
    super().__init__(message)
    self.field = field


@dataclasses.dataclass(frozen=True)
class Record:
  """One prompt with its reference, as the verifiers and metrics need it.

  Attributes:
    answer: the reference answer ("" for test-checked code).
    verifier: name of the verifier that scores completions.
    task: task family (per-task metrics, mixture weights).
    prompt: the user text, or None when `messages` is given.
    messages: the conversation (dicts with `role`, `content`), or None.
    tests: code tests (`inputs`, `outputs`, optional `fn_name`), or None.
    meta: everything else; passed to the verifier as keyword arguments.
  """

  answer: str
  verifier: str
  task: str
  prompt: str | None = None
  messages: tuple[dict[str, str], ...] | None = None
  tests: dict[str, Any] | None = None
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_row(self) -> dict[str, Any]:
    """The JSON row this record reads back from."""
    row = {"prompt": self.prompt,
           "messages": list(self.messages) if self.messages else None,
           "answer": self.answer, "verifier": self.verifier,
           "task": self.task, "tests": self.tests, "meta": self.meta}
    return {k: v for k, v in row.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class FileSpec:
  """A data file and how to read it.

  Attributes:
    path: a `.jsonl` (or `.json` lines) or `.parquet` file.
    weight: mixture weight among the training files; None means the file's
      size (after filtering), i.e. sampling proportional to size.
    task: default `task` of its rows; None means the file name's stem.
    verifier: default `verifier` for rows without one; None requires it.
    max_prompts: use only the file's first this many prompts (those that
      fit `rollout.max_prompt_len`); None = all.
    columns: the column mapping (set from the `data` section, not by the
      entry); None = the record field names.
  """

  path: str
  weight: float | None = None
  task: str | None = None
  verifier: str | None = None
  max_prompts: int | None = None
  columns: Columns | None = None

  @classmethod
  def parse(cls, spec: str | os.PathLike | Mapping[str, Any]) -> FileSpec:
    """A FileSpec from a path or a `{"path": ..., "weight": ...}` mapping."""
    if isinstance(spec, FileSpec):
      return spec
    if hasattr(spec, "to_dict"):  # an ml_collections ConfigDict
      spec = spec.to_dict()
    if isinstance(spec, (str, os.PathLike)):
      return cls(path=os.fspath(spec))
    unknown = sorted(set(spec) - {"path", "weight", "task", "verifier",
                                  "max_prompts"})
    if unknown or "path" not in spec:
      raise ValueError(
          f"a data file entry needs 'path' and may have 'weight', 'task', "
          f"'verifier', 'max_prompts'; got keys {sorted(spec)}")
    weight, limit = spec.get("weight"), spec.get("max_prompts")
    return cls(path=os.fspath(spec["path"]),
               weight=None if weight is None else float(weight),
               task=spec.get("task"), verifier=spec.get("verifier"),
               max_prompts=None if limit is None else int(limit))


@dataclasses.dataclass
class ReadResult:
  """Records of one file and what was skipped.

  Attributes:
    path: the file.
    task: the file's default task name.
    records: the valid records, in file order.
    rows: rows read (blank JSONL lines excluded).
    bad_rows: malformed rows skipped (only with `skip_bad_rows`).
    errors: the first few skip messages, for the log.
  """

  path: str
  task: str
  records: list[Record]
  rows: int = 0
  bad_rows: int = 0
  errors: list[str] = dataclasses.field(default_factory=list)


def _string(row, field: str, required: bool, default=None) -> str | None:
  value = row.get(field)
  if value is None:
    if required and default is None:
      raise _FieldError(field, "missing")
    return default
  if not isinstance(value, str):
    raise _FieldError(field, f"must be a string, got {type(value).__name__}")
  return value


def answer_text(value: str | int | float) -> str:
  """A reference answer as text: strings as they are, numbers in their
  shortest form (`69.0` -> "69").

  Raises:
    ValueError: a NaN or infinite number.
  """
  if isinstance(value, float):
    if not math.isfinite(value):
      raise ValueError(f"must be a finite number, got {value}")
    if value.is_integer() and abs(value) < 2 ** 53:
      return str(int(value))
  return str(value)


def text_problem(value: Any) -> str | None:
  """Why `value` (a string, or the strings nested in its lists and objects,
  keys included) is not valid UTF-8 text, or None when it is."""
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      return (f"is not valid UTF-8 text: {value[e.start]!a} at character "
              f"{e.start} (a lone surrogate)")
  elif isinstance(value, Mapping):
    for key, item in value.items():
      problem = text_problem(key) or text_problem(item)
      if problem:
        return problem
  elif isinstance(value, (list, tuple)):
    for item in value:
      problem = text_problem(item)
      if problem:
        return problem
  return None


def _messages(value) -> tuple[dict[str, str], ...]:
  if not isinstance(value, list) or not value:
    raise _FieldError("messages", "must be a non-empty list of "
                      "{'role': str, 'content': str}")
  out = []
  for i, m in enumerate(value):
    if (not isinstance(m, Mapping) or not isinstance(m.get("role"), str)
        or not isinstance(m.get("content"), str)):
      raise _FieldError("messages", f"message {i} must be {{'role': str, "
                        f"'content': str}}, got {m!r:.80}")
    out.append(dict(m))
  return tuple(out)


def _tests(value) -> dict[str, Any]:
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise _FieldError("tests", f"a string that is not JSON: {e}") from None
  if not isinstance(value, Mapping):
    raise _FieldError("tests", f"must be an object, got "
                      f"{type(value).__name__}")
  inputs, outputs = value.get("inputs"), value.get("outputs")
  if (inputs is not None or outputs is not None) and not (
      isinstance(inputs, list) and isinstance(outputs, list)
      and len(inputs) == len(outputs)):
    raise _FieldError("tests", "'inputs' and 'outputs' must be lists of the "
                      "same length")
  return dict(value)


def parse_record(row: Any, *, task: str, verifier: str | None = None,
                 known_verifiers: Collection[str] | None = None) -> Record:
  """Validates one row and builds its Record.

  Args:
    row: the decoded row (must be a mapping).
    task: task name used when the row has none.
    verifier: verifier used when the row has none (None: required).
    known_verifiers: allowed verifier names; None allows any.

  Returns:
    The record.

  Raises:
    _FieldError: the field and what is wrong with it.
  """
  if not isinstance(row, Mapping):
    raise _FieldError(None, f"a row must be a JSON object, got "
                      f"{type(row).__name__}")
  for key, value in row.items():
    if text_problem(key):
      raise _FieldError(None, f"a field name {text_problem(key)}")
    if text_problem(value):
      raise _FieldError(key, text_problem(value))
  prompt, messages = row.get("prompt"), row.get("messages")
  if (prompt is None) == (messages is None):
    raise _FieldError("prompt", "give exactly one of 'prompt' and 'messages'")
  if prompt is not None:
    prompt = _string(row, "prompt", True)
    if not prompt.strip():
      raise _FieldError("prompt", "is empty")
  else:
    messages = _messages(messages)
  tests = None if row.get("tests") is None else _tests(row["tests"])
  answer = row.get("answer")
  if answer is None:
    if tests is None:
      raise _FieldError("answer", "missing (only rows with 'tests' may omit "
                        "it)")
    answer = ""
  elif isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
    raise _FieldError("answer", "must be a string or a number, got "
                      f"{type(answer).__name__}")
  else:
    try:
      answer = answer_text(answer)
    except ValueError as e:
      raise _FieldError("answer", str(e)) from None
  meta = row.get("meta")
  if meta is None:
    meta = {}
  elif not isinstance(meta, Mapping):
    raise _FieldError("meta", f"must be an object, got {type(meta).__name__}")
  meta = dict(meta)
  for key in row.keys() - set(_FIELDS):
    if key in meta:
      raise _FieldError(key, "is both a top-level field and a meta key")
    meta[key] = row[key]
  verifier = _string(row, "verifier", True, verifier)
  if known_verifiers is not None and verifier not in known_verifiers:
    raise _FieldError("verifier", f"unknown verifier {verifier!r}; "
                      f"registered: {', '.join(sorted(known_verifiers))}")
  return Record(answer=answer, verifier=verifier,
                task=_string(row, "task", True, task),
                prompt=prompt, messages=messages, tests=tests, meta=meta)


def _jsonl_rows(path: pathlib.Path) -> Iterator[tuple[int, Any]]:
  """(line number, decoded row or _FieldError) for each non-blank line."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte order mark
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield line_no, _FieldError(
            None, f"invalid UTF-8 at byte {e.start} of the line")
        continue
      if not text.strip():
        continue
      try:
        yield line_no, json.loads(text)
      except json.JSONDecodeError as e:
        yield line_no, _FieldError(None, f"bad JSON: {e}")


def _parquet_rows(path: pathlib.Path) -> Iterator[tuple[int, Any]]:
  """(row number, row dict) for each Parquet row."""
  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # only Parquet readers pay for the import
  import pyarrow.parquet as pq
  # pylint: enable=g-import-not-at-top
  try:
    pf = pq.ParquetFile(path)
  except (OSError, ValueError, pa.ArrowException) as e:
    raise DataError(path, None, None, f"not a readable Parquet file: {e}")
  row_no = 0
  for batch in pf.iter_batches(batch_size=1024):
    try:
      rows = batch.to_pylist()
    except (ValueError, pa.ArrowException) as e:  # e.g. bad UTF-8
      raise DataError(path, row_no + 1, None,
                      f"cannot decode rows {row_no + 1}-"
                      f"{row_no + batch.num_rows}: {e}") from e
    for row in rows:
      row_no += 1
      # Parquet has no "absent": missing optional fields come back as None.
      yield row_no, {k: v for k, v in row.items() if v is not None}


def read_records(spec: FileSpec | str | os.PathLike, *,
                 skip_bad_rows: bool = False,
                 known_verifiers: Collection[str] | None = None,
                 max_errors_kept: int = 5) -> ReadResult:
  """Reads and validates all records of one file or `datasets` source.

  Args:
    spec: the file (a FileSpec gives default task and verifier, and the
      column mapping).
    skip_bad_rows: skip and count malformed rows instead of raising.
    known_verifiers: allowed verifier names; None allows any.
    max_errors_kept: how many skip messages `ReadResult.errors` keeps.

  Returns:
    The records and counts.

  Raises:
    DataError: a missing or unreadable file, a malformed row (unless
      skipped), or a file without any valid record.
  """
  spec = FileSpec.parse(spec)
  path = pathlib.Path(spec.path)
  task = spec.task or path.name.split(".")[0]
  if not path.is_file() and hf_datasets.is_source(spec.path):
    path, task = spec.path, spec.task or hf_datasets.default_task(spec.path)
    try:
      rows = hf_datasets.iter_rows(hf_datasets.open_dataset(spec.path))
    except hf_datasets.SourceError as e:
      raise DataError(path, None, None, str(e)) from None
  elif not path.is_file():
    raise DataError(path, None, None, "file not found")
  elif path.suffix.lower() == ".parquet":
    rows = _parquet_rows(path)
  elif path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
    rows = _jsonl_rows(path)
  else:
    raise DataError(path, None, None,
                    "unknown format: use .jsonl (one JSON object per line), "
                    ".parquet, or a Hugging Face datasets directory or "
                    "hf:NAME@SPLIT")
  result = ReadResult(path=str(path), task=task, records=[])
  columns = spec.columns or Columns()
  for line, row in rows:
    result.rows += 1
    try:
      if isinstance(row, _FieldError):
        raise row
      result.records.append(
          parse_record(columns.remap(row), task=task, verifier=spec.verifier,
                       known_verifiers=known_verifiers))
    except (_FieldError, ColumnError) as e:
      error = DataError(path, line, e.field, str(e))
      if not skip_bad_rows:
        raise DataError(path, line, e.field, f"{e}; {_FIX}") from None
      result.bad_rows += 1
      if len(result.errors) < max_errors_kept:
        result.errors.append(str(error))
  if result.bad_rows:
    _log.warning("%s: skipped %d of %d rows as malformed, e.g. %s", path,
                 result.bad_rows, result.rows, result.errors[0])
  if not result.records:
    raise DataError(path, None, None,
                    f"no valid records ({result.rows} rows, "
                    f"{result.bad_rows} malformed)")
  return result
