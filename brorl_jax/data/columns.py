"""Column mapping: a dataset's own column names -> the record fields.

Datasets name their columns as they like (`question` / `solution`, GSM8K's
`question` / `answer`, veRL's `prompt` / `reward_model.ground_truth`). The
`data` section maps them onto the record fields of `records.py`:

  data.prompt_key    the prompt: a string (-> `prompt`) or a list of
                     {role, content} messages (-> `messages`)
  data.answer_key    the reference answer (-> `answer`)
  data.verifier_key  the verifier name (-> `verifier`); rows without one
                     use the file's `verifier`, else `data.default_verifier`

for every kind of file (JSONL, Parquet, `datasets` directories and `hf:`
names). A key may be dotted to reach into a nested column
(`reward_model.ground_truth`). A prompt column holding a list of messages
(veRL's layout, where `prompt` is the chat) is read as `messages`, whatever
its name. A mapped column is consumed; a column that
bears a record field's name but was mapped away (an `answer` column when
`answer_key = "solution"`) moves into `meta` like any other extra column, so
nothing is dropped. With the default names a row passes through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

_MISSING = object()


class ColumnError(Exception):
  """A mapped column a row lacks or holds in the wrong form.

  Attributes:
    field: the dataset's column name (the key the user set).
  """

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


def _lookup(row: Mapping[str, Any], key: str) -> Any:
  """`row[key]`, or the nested value a dotted key names; `_MISSING`."""
  if key in row:
    return row[key]
  node: Any = row
  for part in key.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return _MISSING
    node = node[part]
  return node


@dataclasses.dataclass(frozen=True)
class Columns:
  """Where a row keeps its prompt, answer and verifier name.

  Attributes:
    prompt: the prompt's column (`data.prompt_key`).
    answer: the reference answer's column (`data.answer_key`).
    verifier: the verifier name's column (`data.verifier_key`).
  """

  prompt: str = "prompt"
  answer: str = "answer"
  verifier: str = "verifier"

  def __post_init__(self):
    for name in ("prompt", "answer", "verifier"):
      value = getattr(self, name)
      if not isinstance(value, str) or not value:
        raise ValueError(f"data.{name}_key must be a column name, got "
                         f"{value!r}")

  @property
  def identity(self) -> bool:
    """True when every column has its record field's name."""
    return self == Columns()

  def remap(self, row: Any) -> Any:
    """The row with its mapped columns under the record field names.

    Args:
      row: one decoded row (anything but a mapping passes through, for the
        record parser to reject).

    Returns:
      A new dict (the row itself when `identity`).

    Raises:
      ColumnError: a mapped prompt or answer column is missing, or the
        prompt column is neither text nor a list of messages.
    """
    if not isinstance(row, Mapping):
      return row
    prompt = _lookup(row, self.prompt)
    chat = isinstance(prompt, (list, tuple))
    if self.identity and not chat:
      return row
    out = dict(row)
    fields = {}
    if self.prompt != "prompt" or chat:
      if prompt is _MISSING or prompt is None:
        raise ColumnError(self.prompt, "missing (the prompt column, "
                          "data.prompt_key)")
      if isinstance(prompt, str):
        fields["prompt"] = prompt
      elif isinstance(prompt, (list, tuple)):
        fields["messages"] = list(prompt)
      else:
        raise ColumnError(self.prompt, "must be text or a list of "
                          "{'role', 'content'} messages, got "
                          f"{type(prompt).__name__}")
      out.pop(self.prompt, None)
    if self.answer != "answer":
      answer = _lookup(row, self.answer)
      if answer is _MISSING or answer is None:
        if row.get("tests") is None:
          raise ColumnError(self.answer, "missing (the reference answer's "
                            "column, data.answer_key)")
      else:
        fields["answer"] = answer
      out.pop(self.answer, None)
    if self.verifier != "verifier":
      verifier = _lookup(row, self.verifier)
      if verifier is not _MISSING and verifier is not None:
        fields["verifier"] = verifier
      out.pop(self.verifier, None)
    # Columns named like a record field that a mapping replaced are data
    # like any other extra column: into meta (the record parser moves them).
    meta = out.get("meta")
    meta = {} if meta is None else dict(meta) if isinstance(
        meta, Mapping) else None
    for name in ("prompt", "messages", "answer", "verifier"):
      if name in out and (name in fields or (
          name == "messages" and "prompt" in fields) or (
              name == "prompt" and "messages" in fields)):
        if meta is None or name in meta:
          raise ColumnError(name, "is a column of its own and also the "
                            "target of a data.*_key mapping; rename one")
        meta[name] = out.pop(name)
    if meta:
      out["meta"] = meta
    out.update(fields)
    return out
