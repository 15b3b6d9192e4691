"""Small files written whole or not at all (host; issue 35.4).

A file rewritten in place (`open(path, "w")`) and cut short by a kill, a full
disk or a node loss is left truncated: a later start or export reads half
a JSON document. `write_text` writes a temporary file in the same directory,
syncs it and renames it over the old one (`os.replace`, atomic on POSIX
filesystems), so a reader sees the old file or the new one; unchanged
content is not rewritten at all (nothing to tear, no needless write on every
start). `directory` does the same for a directory of files (an HF export):
written beside the target, marked complete, then renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

# Files are created 0o666 minus the umask, as `open(path, "w")` creates them
# (mkstemp would make them 0o600).
_MODE = 0o666


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_text(path: str | os.PathLike, text: str, *,
               only_if_changed: bool = True) -> bool:
  """Writes `text` (UTF-8) to `path` atomically.

  Args:
    path: the file; its directory must exist.
    text: the whole content.
    only_if_changed: leave the file alone when it already holds `text`.

  Returns:
    Whether the file was written.
  """
  path = pathlib.Path(path)
  data = text.encode("utf-8")
  if only_if_changed:
    try:
      if path.read_bytes() == data:
        return False
    except OSError:
      pass                            # missing or unreadable: write it
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _MODE & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return True


# ---- directories (an export: many files, one completion) -------------------

MARKER = "brorl_complete.json"


def _listing(root: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(root)): p.stat().st_size
          for p in sorted(root.rglob("*")) if p.is_file()
          and p.name != MARKER}


def _replaceable(out: pathlib.Path) -> bool:
  """Whether `out` may be replaced: missing, empty, or an earlier export
  (ours with its marker, or any Hugging Face directory)."""
  if not out.exists():
    return True
  if not out.is_dir():
    return False
  return (not any(out.iterdir()) or (out / MARKER).exists()
          or (out / "config.json").exists())


@contextlib.contextmanager
def directory(out: str | os.PathLike, *, enabled: bool = True
              ) -> Iterator[pathlib.Path]:
  """Yields a temporary directory beside `out` to write into; on success
  records every file and its size in `MARKER` and renames it to `out`.

  An existing `out` (empty, or an earlier export) is replaced only then; an
  exception or a kill leaves `out` as it was (the temporary `.NAME.partial`
  is removed by the next export into `out`). With `enabled` False (the
  processes that only help) nothing is written or renamed.

  Raises:
    FileExistsError: `out` holds something else than an export.
  """
  out = pathlib.Path(out).absolute()
  tmp = out.with_name(f".{out.name}.partial")
  old = out.with_name(f".{out.name}.old")
  if not enabled:
    yield tmp
    return
  if not _replaceable(out):
    raise FileExistsError(
        f"{out} exists and is not an export (no {MARKER} or config.json): "
        "give a new or empty directory")
  out.parent.mkdir(parents=True, exist_ok=True)
  shutil.rmtree(tmp, ignore_errors=True)     # a killed export's
  tmp.mkdir()
  # Marked unfinished from the start: a reader given the temporary
  # directory itself refuses it.
  write_text(tmp / MARKER, json.dumps({"complete": False}))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  write_text(tmp / MARKER, json.dumps(
      {"complete": True, "files": _listing(tmp)}, indent=1))
  _fsync_dir(tmp)
  shutil.rmtree(old, ignore_errors=True)
  if out.exists():
    os.replace(out, old)
  os.replace(tmp, out)
  _fsync_dir(out.parent)
  shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  except OSError:
    pass                              # some filesystems refuse a dir fsync
  finally:
    os.close(fd)


def incomplete(root: str | os.PathLike) -> str | None:
  """What is missing from a directory `directory` wrote (None: complete, or
  not one of ours: no marker)."""
  root = pathlib.Path(root)
  marker = root / MARKER
  if not marker.exists():
    return None
  try:
    record = json.loads(marker.read_text(encoding="utf-8"))
    files = record["files"] if record.get("complete") else None
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return f"{MARKER} cannot be read"
  if files is None:
    return f"it was not finished ({MARKER} says so)"
  missing = [name for name in files if not (root / name).is_file()]
  if missing:
    return (f"{len(missing)} of its {len(files)} files are missing: "
            + ", ".join(missing[:5]))
  short = [name for name, size in files.items()
           if (root / name).stat().st_size != size]
  if short:
    return (f"{len(short)} files differ in size from the export's record: "
            + ", ".join(short[:5]))
  return None
