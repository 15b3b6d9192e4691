"""Hugging Face `datasets` as prompt sources (the optional `[datasets]` extra).

An entry of `data.train_files` / `data.eval_files` may be, besides a JSONL or
Parquet file:

  DIR              a directory written by `Dataset.save_to_disk`
  DIR:SPLIT        a directory written by `DatasetDict.save_to_disk`, and
                   the split to read (a one-split DatasetDict needs none)
  hf:NAME@SPLIT    `datasets.load_dataset(NAME, split=SPLIT)`
  hf:NAME:CONFIG@SPLIT   the same with a configuration name

`hf:` names go through the `datasets` cache (`HF_DATASETS_CACHE`, `HF_HOME`)
and honour offline mode (`HF_HUB_OFFLINE=1` / `HF_DATASETS_OFFLINE=1`: the
cached copy, no network). Rows are read as `records.read_records` reads a
Parquet file's (missing values are absent fields), through the column
mapping (`columns.py`), so bad rows are named (`hf:NAME@SPLIT:ROW`) or
skipped and counted the same way. The default task of a source is the
directory's name or the dataset name's last part (`hf:openai/gsm8k:main@test`
-> "gsm8k").

`datasets` is imported only when such a source is read (it is an optional
dependency, and costs a second or two to import).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator

HF_PREFIX = "hf:"
_INSTALL = "pip install 'brorl-jax[datasets]' (or pip install datasets)"
_DATASET_FILES = ("state.json", "dataset_info.json")
_DICT_FILE = "dataset_dict.json"


class SourceError(ValueError):
  """A `datasets` source that cannot be read (the message says why and how
  to fix it; `records.read_records` reports it as a `DataError`)."""


def _split_dir(path: str) -> tuple[pathlib.Path, str | None] | None:
  """(directory, split) when `path` names a saved dataset, else None."""
  p = pathlib.Path(path)
  if p.is_dir():
    return p, None
  head, sep, split = path.rpartition(":")
  if sep and head and split and pathlib.Path(head).is_dir():
    return pathlib.Path(head), split
  return None


def is_source(path: str | os.PathLike) -> bool:
  """True when `path` is an `hf:` name or a directory (`[:split]`)."""
  path = os.fspath(path)
  return path.startswith(HF_PREFIX) or _split_dir(path) is not None


def parse_hub_name(path: str) -> tuple[str, str | None, str]:
  """`hf:NAME[:CONFIG]@SPLIT` -> (NAME, CONFIG or None, SPLIT).

  Raises:
    SourceError: the entry is not of that form.
  """
  body = path[len(HF_PREFIX):]
  name, sep, split = body.rpartition("@")
  if not sep or not name or not split:
    raise SourceError(f"expected hf:NAME[:CONFIG]@SPLIT (e.g. "
                      f"hf:openai/gsm8k:main@test), got {path!r}")
  name, _, config = name.partition(":")
  if not name:
    raise SourceError(f"no dataset name in {path!r}")
  return name, config or None, split


def default_task(path: str) -> str:
  """The task name of a source's rows that name none."""
  if path.startswith(HF_PREFIX):
    try:
      name = parse_hub_name(path)[0]
    except SourceError:
      name = path[len(HF_PREFIX):]
    return name.rstrip("/").rsplit("/", 1)[-1]
  where = _split_dir(path)
  directory = where[0] if where else pathlib.Path(path)
  return directory.resolve().name


def _import_datasets():
  try:
    # Imported on use: an optional dependency, slow to import.
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SourceError(f"reading Hugging Face datasets needs the `datasets` "
                      f"package ({e}): {_INSTALL}") from None
  return datasets


def _load_saved(directory: pathlib.Path, split: str | None) -> Any:
  datasets = _import_datasets()
  is_dict = (directory / _DICT_FILE).is_file()
  if not is_dict and not all((directory / f).is_file()
                             for f in _DATASET_FILES):
    raise SourceError(
        f"{directory} is a directory but not one written by "
        "`datasets` (`save_to_disk`: it lacks dataset_dict.json, or "
        "state.json and dataset_info.json); point at a .jsonl / .parquet "
        "file or a saved dataset")
  try:
    loaded = datasets.load_from_disk(str(directory))
  except Exception as e:  # pylint: disable=broad-except
    raise SourceError(f"cannot load the saved dataset: {type(e).__name__}: "
                      f"{e}") from None
  if isinstance(loaded, datasets.DatasetDict):
    splits = sorted(loaded)
    if split is None:
      if len(splits) != 1:
        raise SourceError(
            f"a DatasetDict with splits {', '.join(splits)}: name one, e.g. "
            f"{directory}:{splits[0]}")
      split = splits[0]
    if split not in loaded:
      raise SourceError(f"no split {split!r}; the DatasetDict has "
                        f"{', '.join(splits)}")
    return loaded[split]
  if split is not None:
    raise SourceError(f"a single Dataset (no splits) was saved here; drop "
                      f"':{split}'")
  return loaded


def _offline() -> bool:
  return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
             for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_hub(path: str) -> Any:
  name, config, split = parse_hub_name(path)
  datasets = _import_datasets()
  try:
    return datasets.load_dataset(name, config, split=split)
  except Exception as e:  # pylint: disable=broad-except
    # `datasets` raises many types here (ConnectionError, FileNotFoundError,
    # DatasetNotFoundError, ValueError for a bad split, ...): one message.
    detail = " ".join(f"{type(e).__name__}: {e}".split())[:500]
    if _offline():
      fix = ("offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) reads only "
             "the cache, which has no copy of it: load it once online, or "
             "save_to_disk it elsewhere and point at the directory")
    else:
      fix = ("check the name, configuration and split; if the Hub cannot be "
             "reached, set HF_HUB_OFFLINE=1 to use a cached copy, or "
             "save_to_disk the dataset where the Hub can be reached and "
             "point at that directory")
    raise SourceError(f"cannot load {name!r} (config {config!r}, split "
                      f"{split!r}) with datasets.load_dataset: {detail}; "
                      f"{fix}") from None


def open_dataset(path: str) -> Any:
  """The `datasets.Dataset` a source names (see the module doc).

  Raises:
    SourceError: not installed, not a saved dataset, unknown split, or the
      Hub unreachable / the dataset not cached.
  """
  if path.startswith(HF_PREFIX):
    return _load_hub(path)
  where = _split_dir(path)
  if where is None:
    raise SourceError("not found: neither a file nor a saved dataset "
                      "directory")
  return _load_saved(*where)


def iter_rows(dataset: Any) -> Iterator[tuple[int, Any]]:
  """(1-based row number, row dict without missing values) of a dataset."""
  for row_no, row in enumerate(dataset, start=1):
    yield row_no, {k: v for k, v in row.items() if v is not None}
