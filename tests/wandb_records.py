"""Reads a W&B run file (`run-ID.wandb`) back: its history rows and config.

The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1,
version 0), then LevelDB-log records (4-byte CRC, 2-byte length, 1-byte
type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks, each payload a
`wandb_internal_pb2.Record`. wandb ships no reader for it any more, so the
tests (and anyone checking an offline run) use this one.
"""

import glob
import json
import pathlib
import struct
import time

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7


def records(path):
  """The `Record` protos of one run file, in order."""
  data = pathlib.Path(path).read_bytes()
  assert data[:4] == b":W&B", f"{path} is not a W&B run file"
  pos, out, pending = _HEADER, [], b""
  while pos + _HEADER <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < _HEADER:                     # block trailer: zero padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
    if length == 0 and kind == 0:
      break
    chunk = data[pos + _HEADER:pos + _HEADER + length]
    pos += _HEADER + length
    pending = chunk if kind in (1, 2) else pending + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
  return out


def history(path):
  """The logged rows: dicts of metric name -> value."""
  return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
           for item in r.history.item}
          for r in records(path) if r.WhichOneof("record_type") == "history"]


def run(path):
  """The run record: `run_id`, `project`, `display_name`, `group`, ...."""
  return next(r.run for r in records(path)
              if r.WhichOneof("record_type") == "run")


def config(path):
  """The run's config: the run record's, updated by later config records."""
  out = {}
  for r in records(path):
    kind = r.WhichOneof("record_type")
    if kind in ("run", "config"):
      update = r.run.config.update if kind == "run" else r.config.update
      out.update({item.key: json.loads(item.value_json) for item in update
                  if item.key != "_wandb"})
  return out


def run_files(workdir, timeout_s=60.0):
  """The workdir's offline run files, oldest first, each complete.

  `run.finish()` returns before W&B's service process has written the file
  out, so this waits (up to `timeout_s`) until each file ends with the
  run's exit record.
  """
  paths = sorted(glob.glob(str(pathlib.Path(workdir) / "wandb" /
                               "offline-run-*" / "run-*.wandb")))
  deadline = time.monotonic() + timeout_s
  for path in paths:
    while not any(r.WhichOneof("record_type") == "exit"
                  for r in records(path)):
      assert time.monotonic() < deadline, f"{path} never completed"
      time.sleep(0.2)
  return paths
