"""The workdir lock: flock where it is enforced, a lease elsewhere."""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from brorl_jax.config import ConfigError
from brorl_jax.integrity import lock as lock_lib
from brorl_jax.integrity.lock import Holder, WorkdirLocked

_HOLD = """
import sys, time
from brorl_jax.integrity import lock
for mode, workdir in zip(sys.argv[1::2], sys.argv[2::2]):
  lock.take(workdir, mode, lease_s=4)
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("mode", ["flock", "lease"])
def test_a_second_taker_is_refused_naming_the_holder(tmp_path, mode):
  first = lock_lib.take(tmp_path, mode, lease_s=4)
  assert first.kind == mode
  t0 = time.monotonic()
  with pytest.raises(WorkdirLocked) as e:
    lock_lib.take(tmp_path, mode, lease_s=4)
  assert time.monotonic() - t0 < 1     # the holder is this (live) process
  message = str(e.value)
  assert f"--workdir {tmp_path} is in use by another run" in message
  assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in message
  assert "\n" not in message
  first.release()
  lock_lib.take(tmp_path, mode, lease_s=4).release()   # free again


def test_a_killed_holder_never_blocks_the_restart(tmp_path):
  dirs = {"flock": tmp_path / "a", "lease": tmp_path / "b"}
  for d in dirs.values():
    d.mkdir()
  proc = subprocess.Popen(
      [sys.executable, "-c", _HOLD, "flock", dirs["flock"], "lease",
       dirs["lease"]], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  for mode, workdir in dirs.items():
    with pytest.raises(WorkdirLocked, match=f"pid {proc.pid}"):
      lock_lib.take(workdir, mode, lease_s=4)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  for mode, workdir in dirs.items():
    t0 = time.monotonic()
    lock = lock_lib.take(workdir, mode, lease_s=4)
    # flock: the kernel released it; lease: a dead pid of this host is
    # taken over at once (no wait for the expiry).
    assert time.monotonic() - t0 < 3
    lock.release()


def _foreign(beat=0, token="t"):
  return Holder(host="other-host", pid=123, since=time.time(), token=token,
                beat=beat, kind="lease")


def test_a_lease_of_another_host_is_live_while_it_beats(tmp_path):
  path = tmp_path / lock_lib.LOCK_FILE
  writer = lock_lib._LeaseLock(path, 4)
  writer._write(_foreign())
  stop = threading.Event()

  def beat():
    n = 0
    while not stop.wait(0.5):
      n += 1
      writer._write(_foreign(beat=n))
  thread = threading.Thread(target=beat)
  thread.start()
  try:
    t0 = time.monotonic()
    with pytest.raises(WorkdirLocked, match="host other-host, pid 123"):
      lock_lib.take(tmp_path, "lease", lease_s=4)
    assert time.monotonic() - t0 < 3     # seen beating: no wait for expiry
  finally:
    stop.set()
    thread.join()
  # Silent now: taken over after the lease (4 s of this clock), with a
  # warning; the old holder, if it wakes up, finds it lost.
  t0 = time.monotonic()
  lock = lock_lib.take(tmp_path, "lease", lease_s=4)
  assert time.monotonic() - t0 >= 4
  assert Holder.from_text(path.read_text()).pid == os.getpid()
  lock.release()
  assert not path.exists()


def test_a_holder_that_lost_its_lease_stops(tmp_path):
  lock = lock_lib.take(tmp_path, "lease", lease_s=4)
  lock.check()
  lock_lib._LeaseLock(tmp_path / lock_lib.LOCK_FILE, 4)._write(_foreign())
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    try:
      lock.check()
    except WorkdirLocked as e:
      assert "lost its lease" in str(e) and "other-host, pid 123" in str(e)
      break
    time.sleep(0.2)
  else:
    pytest.fail("the lost lease was not noticed")
  lock.release()
  # The other run's record stays.
  assert Holder.from_text(
      (tmp_path / lock_lib.LOCK_FILE).read_text()).host == "other-host"


def test_auto_takes_flock_on_a_local_disk_and_a_lease_elsewhere(
    tmp_path, monkeypatch):
  fstype, _ = lock_lib.filesystem_type(tmp_path)
  assert fstype                          # found in /proc/self/mountinfo
  monkeypatch.setattr(lock_lib, "filesystem_type",
                      lambda p: ("ext4", "rw"))
  assert lock_lib.choose(tmp_path, "auto") == "flock"
  for fs in ("nfs4", "lustre", "fuse.gcsfuse"):
    monkeypatch.setattr(lock_lib, "filesystem_type", lambda p, fs=fs: (fs, ""))
    assert lock_lib.choose(tmp_path, "auto") == "lease"
  # flock accepted but not enforced (a FUSE mount): auto falls back to the
  # lease; an explicit "flock" is a config error naming the fix.
  monkeypatch.setattr(lock_lib, "filesystem_type", lambda p: ("ext4", "rw"))
  monkeypatch.setattr(lock_lib, "_flock_enforced", lambda path: False)
  lock = lock_lib.take(tmp_path, "auto", lease_s=4)
  assert lock.kind == "lease"
  lock.release()
  with pytest.raises(ConfigError, match="checkpoint.lock.*use 'lease'"):
    lock_lib.take(tmp_path, "flock")


def test_flock_respects_a_live_lease(tmp_path):
  lease = lock_lib.take(tmp_path, "lease", lease_s=4)
  with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
    lock_lib.take(tmp_path, "flock")
  lease.release()


def test_holder_record_round_trips_and_unreadable_records_are_named():
  me = lock_lib._me("lease")
  assert Holder.from_text(me.to_json()) == me
  assert Holder.from_text("") is None and Holder.from_text("{") is None
  unknown = dataclasses.replace(me, pid=-1)
  assert "record cannot be read" in unknown.describe()
