"""What makes a resume trustworthy (issue 36.2, 36.3), host side.

* Integrity records: two 32-bit sums per saved array, computed on device
  (`integrity/checksums.py`, shard by shard; 8 bytes per array reach the
  host), and a SHA-256 per JSON item; `check_arrays` compares restored
  arrays with them.
* Read errors told apart: `proves_damage` is true for a missing, truncated
  or undecodable file or a checksum mismatch, false for errors that say
  nothing about the files (I/O, permissions, timeouts, unavailable storage).
* One decision for all processes: `agree` gathers each process's outcome and
  process 0 decides the one every process acts on; `shared_steps` gives every
  process process 0's list of steps.

No orbax here: `checkpointing.py` makes every orbax call.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from brorl_jax.integrity import checksums


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


class ChecksumMismatch(RuntimeError):
  """Restored data differ from what was saved (the integrity record)."""


# Errors that say nothing about the files themselves: retried, and never a
# reason to move a checkpoint aside.
_NOT_DAMAGE_ERRNOS = {
    errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE,
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETDOWN,
    errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.EBUSY,
    errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.ENOLCK, errno.EACCES,
    errno.EPERM}
_NOT_DAMAGE_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED",
                      "RESOURCE_EXHAUSTED", "CANCELLED", "PERMISSION_DENIED")


def proves_damage(error: BaseException) -> bool:
  """Whether a failed read shows the files are damaged (missing, truncated,
  undecodable, a checksum mismatch) rather than unreachable for now."""
  text = error_text(error)
  code = re.match(r"\[Errno (\d+)\]", text)
  if code:
    return int(code.group(1)) not in _NOT_DAMAGE_ERRNOS
  return not text.startswith(_NOT_DAMAGE_STATUS)


def _replicated(sharding: Any) -> jax.sharding.Sharding:
  """Where a checksum of an array with `sharding` lands: on all its devices."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec())
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  if sharding is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
  return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("all",)),
                                    jax.sharding.PartitionSpec())


@functools.lru_cache(maxsize=64)
def _checksum_fn(out_sharding: jax.sharding.Sharding) -> Any:
  # One program per distinct (shape, dtype, sharding) of a leaf, not one
  # over the whole tree: a transformer's layers share a few shapes, so a
  # 1.5B model compiles about ten small programs.
  return jax.jit(checksums.array_checksum, out_shardings=out_sharding)


def array_checksums(tree: Any) -> dict[str, list]:
  """`{path: [plain, weighted, shape, dtype]}` of every array of `tree`.

  Computed on device, shard by shard (no gather); only 8 bytes per array
  come to the host. Every process calls it for global arrays (a collective).
  """
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    total = _checksum_fn(_replicated(getattr(value, "sharding", None)))(value)
    # Read before the next is dispatched: many small collective programs in
    # flight at once starve XLA:CPU's thread pool on a 2-core host (devices
    # miss the all-gather's 40 s rendezvous and the process aborts).
    plain, weighted = np.asarray(total.addressable_data(0)).tolist()
    out[jax.tree_util.keystr(path)] = [plain, weighted, list(value.shape),
                                       str(value.dtype)]
  return out


def json_digest(value: Any) -> str:
  """SHA-256 of a JSON item's canonical text."""
  text = json.dumps(value, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def check_arrays(item: str, recorded: dict[str, list], tree: Any) -> None:
  """Raises `ChecksumMismatch` naming the first array of `tree` whose sums
  differ from `recorded` (arrays restored in another shape or dtype, or not
  recorded, are not compared)."""
  for path, now in array_checksums(tree).items():
    then = recorded.get(path)
    if then is None or then[2:] != now[2:]:
      continue
    if then[:2] != now[:2]:
      raise ChecksumMismatch(
          f"{item}{path} differs from the checksum recorded when it was "
          "saved: its bytes changed on disk")


# Outcomes of reading one step, ordered: the worst over processes counts.
OK, DAMAGED, UNREACHABLE = 0, 1, 2


def agree(code: int) -> int:
  """The outcome every process acts on: the worst over processes, as
  process 0 decides it from all of theirs (a collective)."""
  if jax.process_count() == 1:
    return code
  codes = multihost_utils.process_allgather(np.array([code], np.int32))
  decided = np.int32(np.max(codes) if jax.process_index() == 0 else 0)
  return int(multihost_utils.broadcast_one_to_all(decided))


def shared_steps(steps: list[int]) -> list[int]:
  """The steps to try, newest first: process 0's listing, for all."""
  steps = sorted(steps, reverse=True)
  if jax.process_count() == 1:
    return steps
  count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  mine = np.array(steps if jax.process_index() == 0 else [0] * count,
                  np.int32)
  return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]
