"""One run per workdir: a lock held for the whole run (host; issue 35.1).

Two trainers on one workdir cut each other's logs back and race for the
same checkpoint steps. Whatever writes a workdir's checkpoints or cuts its
logs (the train loop, its warm start, each arm of `brorl-compare`) holds
this lock from before its first write to its end; a second start exits at
once with one line naming the holder (host, pid, since when).

Two kinds, chosen per workdir (`checkpoint.lock`):

* `flock`: an advisory `flock(2)` on `W/.lock`, released by the kernel when
  the process ends however it ends (kill -9, OOM), so a crash never leaves
  a lock behind. Used where it is enforced: a local filesystem (ext4, xfs,
  btrfs, tmpfs, overlay, zfs, ...) on which a second open file cannot take
  the lock (probed).
* `lease`: `W/.lock` holds a record (host, pid, process start, a token) whose
  beat a background thread advances every `lease_s / 4` seconds. A start
  that finds a record watches it: a beat that moves means a live holder (exit
  at once); one that stays still for `lease_s` of the watcher's own clock (no
  clock is compared across hosts) is a dead holder, taken over; a holder on
  this host whose process is gone is taken over at once. A holder that finds
  its record replaced has lost the lease and stops at the next step (`check`).
  For shared filesystems where flock is absent, local to one node or
  emulated: NFS (flock becomes per-process POSIX locks that the server
  drops when a client's state expires), Lustre (`localflock` is per node;
  without `flock` the call fails), GCS FUSE and other FUSE mounts (not
  enforced across mounts).

`auto` (the default) picks flock where it is enforced, else the lease.
Multi-process runs take the lock once, on process 0; the others wait for
its outcome (`acquire`).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import tempfile
import threading
import time
import uuid
from typing import Any, Callable

from brorl_jax.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
MODES = ("auto", "flock", "lease", "off")
# Filesystems whose flock(2) is the kernel's own and local to this machine.
LOCAL_FILESYSTEMS = frozenset((
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "overlay",
    "zfs", "f2fs", "bcachefs", "jfs", "reiserfs"))
# Pause between a lease claim and its read-back (another claimant's write in
# that window wins; the loser sees it and stops).
SETTLE_S = 1.0


class WorkdirLocked(ConfigError):
  """Another run holds the workdir (the message names it), or this run lost
  its lease to one."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a workdir's lock (the record in `W/.lock`)."""

  host: str
  pid: int
  since: float                      # wall-clock seconds (time.time())
  token: str = ""
  start_ticks: int | None = None    # /proc/<pid>/stat field 22
  pid_namespace: str = ""           # the pid's namespace (containers)
  beat: int = 0
  kind: str = "flock"

  def describe(self) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.since))
    if self.pid < 0:
      return f"a holder whose record cannot be read, written {when}"
    return f"host {self.host}, pid {self.pid}, since {when}"

  def is_here(self) -> bool:
    """Whether its pid can be checked from this process (same host, same
    pid namespace)."""
    return (self.host == socket.gethostname()
            and self.pid_namespace == _pid_namespace())

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_text(cls, text: str) -> "Holder | None":
    try:
      raw = json.loads(text)
      return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls)
                    if f.name in raw})
    except (ValueError, TypeError, KeyError):
      return None                   # empty or torn: a write in progress


def _start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (pid reuse guard)."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _pid_namespace() -> str:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return ""


def _unknown(since: float) -> Holder:
  return Holder(host="", pid=-1, since=since)


def _alive_here(holder: Holder) -> bool:
  """Whether `holder` (a process of this host) still runs."""
  try:
    os.kill(holder.pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass                            # someone else's process: it exists
  ticks = _start_ticks(holder.pid)
  return (holder.start_ticks is None or ticks is None
          or ticks == holder.start_ticks)


def _me(kind: str) -> Holder:
  return Holder(host=socket.gethostname(), pid=os.getpid(), since=time.time(),
                token=uuid.uuid4().hex, start_ticks=_start_ticks(os.getpid()),
                pid_namespace=_pid_namespace(), kind=kind)


def filesystem_type(path: pathlib.Path) -> tuple[str, str]:
  """(type, mount options) of the filesystem holding `path` (Linux's
  /proc/self/mountinfo; ("", "") when unknown)."""
  target = os.path.realpath(path)
  best, found = -1, ("", "")
  try:
    lines = pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
  except OSError:
    return found
  for line in lines:
    left, _, right = line.partition(" - ")
    fields, tail = left.split(), right.split()
    if len(fields) < 5 or len(tail) < 1:
      continue
    point = fields[4].replace("\\040", " ")
    inside = target == point or target.startswith(point.rstrip("/") + "/")
    if inside and len(point) > best:
      best = len(point)
      found = (tail[0], ",".join([fields[5]] + tail[2:3]))
  return found


# ---- flock -----------------------------------------------------------------

def _flock_enforced(path: pathlib.Path) -> bool:
  """Whether a second open of the (locked) file is refused the lock (FUSE
  mounts may accept every flock; NFS's emulation is per process)."""
  other = os.open(path, os.O_RDWR)
  try:
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return True
  except OSError:
    return False
  finally:
    os.close(other)
  return False


class _FlockLock:
  kind = "flock"

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._fd: int | None = None
    self.holder: Holder | None = None

  def try_acquire(self) -> Holder | None:
    """Takes the lock (None) or returns who holds it.

    Raises:
      OSError: flock is not available or not enforced here.
    """
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
      os.close(fd)
      return Holder.from_text(text) or _unknown(os.path.getmtime(self.path))
    except OSError:
      os.close(fd)
      raise
    if not _flock_enforced(self.path):
      os.close(fd)
      raise OSError(errno.ENOLCK, "flock is not enforced on this filesystem")
    # A live lease of a run started with checkpoint.lock='lease' holds it
    # too (its holder takes no flock).
    found = Holder.from_text(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    if (found is not None and found.kind == "lease" and found.is_here()
        and _alive_here(found)):
      os.close(fd)
      return found
    me = _me(self.kind)
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.to_json().encode(), 0)
    os.fsync(fd)
    self._fd, self.holder = fd, me
    return None

  def check(self) -> None:
    """A kernel lock cannot be lost while its process lives."""

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)           # closing the file releases the lock
      self._fd = None


# ---- lease -----------------------------------------------------------------

class _LeaseLock:
  kind = "lease"

  def __init__(self, path: pathlib.Path, lease_s: float,
               sleep: Callable[[float], None] = time.sleep):
    self.path = path
    self.lease_s = lease_s
    self.beat_s = lease_s / 4
    self._sleep = sleep
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.holder: Holder | None = None
    self.lost: Holder | None = None

  def _read(self) -> Holder | None:
    try:
      return Holder.from_text(self.path.read_text())
    except FileNotFoundError:
      return None

  def _write(self, holder: Holder) -> None:
    fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=LOCK_FILE + ".")
    try:
      with os.fdopen(fd, "w") as f:
        f.write(holder.to_json())
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise

  def _live_holder(self) -> Holder | None:
    """The holder if it is alive (watching its beat), else None."""
    seen = self._read()
    if seen is None:
      return None
    if seen.is_here():
      return seen if _alive_here(seen) else None
    deadline = time.monotonic() + self.lease_s
    while time.monotonic() < deadline:
      self._sleep(min(1.0, self.beat_s))
      now = self._read()
      if now is None:
        return None                 # released meanwhile
      if (now.token, now.beat) != (seen.token, seen.beat):
        return now                  # its beat moved: alive
    log.warning("the workdir lease of %s did not beat for %.0f s: taking "
                "it over", seen.describe(), self.lease_s)
    return None

  def try_acquire(self) -> Holder | None:
    holder = self._live_holder()
    if holder is not None:
      return holder
    me = _me(self.kind)
    self._write(me)
    self._sleep(SETTLE_S)
    now = self._read()
    if now is None or now.token != me.token:
      return now or _unknown(time.time())
    self.holder = me
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name="workdir-lease")
    self._thread.start()
    return None

  def _beat(self) -> None:
    while not self._stop.wait(self.beat_s):
      try:
        now = self._read()
        if now is None or now.token != self.holder.token:
          self.lost = now or _unknown(time.time())
          return
        self.holder = dataclasses.replace(self.holder,
                                          beat=self.holder.beat + 1)
        self._write(self.holder)
      except OSError as e:          # a storage hiccup: try at the next beat
        log.warning("could not renew the workdir lease %s: %s", self.path, e)

  def check(self) -> None:
    if self.lost is not None:
      raise WorkdirLocked(
          f"this run lost its lease on {self.path.parent} to another run "
          f"({self.lost.describe()}): it stopped so that two runs never "
          "write one workdir (its lease was not renewed for "
          f"{self.lease_s:.0f} s: storage stalled or the process was "
          "paused); nothing after the last checkpoint is kept")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.holder is not None and self.lost is None:
      now = self._read()
      if now is not None and now.token == self.holder.token:
        self.path.unlink(missing_ok=True)
    self.holder = None


# ---- the run's lock --------------------------------------------------------

def choose(workdir: pathlib.Path, mode: str) -> str:
  """The kind `mode` ("auto", "flock", "lease") means for `workdir`."""
  if mode != "auto":
    return mode
  fstype, _ = filesystem_type(workdir)
  return "flock" if fstype in LOCAL_FILESYSTEMS else "lease"


class WorkdirLock:
  """The lock of one workdir, held by this process (`acquire` makes it)."""

  def __init__(self, workdir: pathlib.Path, impl: Any):
    self.workdir = workdir
    self._impl = impl

  @property
  def kind(self) -> str:
    return "off" if self._impl is None else self._impl.kind

  def check(self) -> None:
    """Raises `WorkdirLocked` if the lease was lost (the loop calls it at
    every step and before every save)."""
    if self._impl is not None:
      self._impl.check()

  def release(self) -> None:
    if self._impl is not None:
      self._impl.release()
      self._impl = None

  def __enter__(self) -> "WorkdirLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _locked_error(workdir: pathlib.Path, holder: Holder) -> WorkdirLocked:
  return WorkdirLocked(
      f"--workdir {workdir} is in use by another run ({holder.describe()}); "
      "two runs on one workdir would cut each other's logs and "
      "checkpoints: wait for it to end (or stop it), or give another "
      "--workdir")


def take(workdir: str | os.PathLike, mode: str = "auto", *,
         lease_s: float = 60.0) -> WorkdirLock:
  """Takes `workdir`'s lock in this process (single-process callers).

  Args:
    workdir: an existing directory.
    mode: "auto", "flock", "lease" or "off".
    lease_s: the lease's expiry (beats every quarter of it).

  Raises:
    WorkdirLocked: another run holds it (names the holder).
    ConfigError: `mode` is "flock" where flock cannot be used.
  """
  workdir = pathlib.Path(workdir).absolute()
  if mode == "off":
    return WorkdirLock(workdir, None)
  path = workdir / LOCK_FILE
  kind = choose(workdir, mode)
  impl: Any = (_FlockLock(path) if kind == "flock"
               else _LeaseLock(path, lease_s))
  try:
    holder = impl.try_acquire()
  except OSError as e:
    if mode == "flock":
      raise ConfigError(
          f"config key 'checkpoint.lock': flock cannot lock {path} "
          f"({e.strerror or e}); use 'lease' (or 'auto') on this "
          "filesystem") from None
    log.info("flock is not usable on %s (%s): using a lease", workdir,
             e.strerror or e)
    impl = _LeaseLock(path, lease_s)
    holder = impl.try_acquire()
  if holder is not None:
    raise _locked_error(workdir, holder)
  log.info("holding the workdir lock %s (%s)", path, impl.kind)
  return WorkdirLock(workdir, impl)


def acquire(workdir: str | os.PathLike, mode: str = "auto", *,
            lease_s: float = 60.0) -> WorkdirLock:
  """`take` on process 0; every process learns its outcome (a collective).

  Process 0 holds the lock for the run; the others hold nothing, and raise
  `WorkdirLocked` too when process 0 could not take it.
  """
  # Imported here: only this collective needs JAX; `take` (compare, the
  # lock's tests, tools) runs without importing it.
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return take(workdir, mode, lease_s=lease_s)
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = take(workdir, mode, lease_s=lease_s)
    except ConfigError as e:
      error = e
  code = int(multihost_utils.broadcast_one_to_all(
      np.int32(0 if error is None else 1)))
  if error is not None:
    raise error
  if code:
    raise WorkdirLocked(f"--workdir {workdir} is in use by another run "
                        "(process 0 names it)")
  return lock or WorkdirLock(pathlib.Path(workdir).absolute(), None)
