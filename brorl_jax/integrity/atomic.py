"""Small files written whole or not at all (host; issue 35.4).

A file rewritten in place (`open(path, "w")`) and cut short by a kill, a full
disk or a node loss is left truncated: a later start or export reads half
a JSON document. `write_text` writes a temporary file in the same directory,
syncs it and renames it over the old one (`os.replace`, atomic on POSIX
filesystems), so a reader sees the old file or the new one; unchanged
content is not rewritten at all (nothing to tear, no needless write on every
start).
"""

from __future__ import annotations

import os
import pathlib
import tempfile

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
