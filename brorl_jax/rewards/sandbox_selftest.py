"""The sandbox's self-test: what a hostile program must NOT manage in it.

Before the code verifier runs any model-written program, the process that
chooses the sandbox (the reward pool's parent, or a lone caller of
`run_program`) runs one probe program in each candidate sandbox and checks,
from inside and from the host, that it could not

* act as the host's root: its uid and gids, as the host's /proc shows them
  while it runs, are not 0 of the host's user namespace; it holds no
  capability; `no_new_privs` is set;
* change host kernel settings: `/proc/sys/kernel/core_pattern`,
  `/proc/sys/vm/overcommit_memory`, `/proc/sysrq-trigger`,
  `/proc/sys/kernel/modprobe` (and a few more) do not open for writing (they
  are opened and closed, never written), and no file under `/proc/sys` is
  writable (`access(W_OK)`, which honours read-only mounts);
* reach the network: a TCP connection to a listener of the host on
  127.0.0.1 fails, and it sees no interface but `lo`;
* write outside the sandbox: files it creates at host paths (the temporary
  directory, the interpreter's prefix, `/usr`, the home and working
  directories) do not appear on the host;
* stay alive after its deadline: a child it starts in a new session, and
  the program itself (sleeping), are gone once its budget is over.

Any of these that succeeds is a finding; a sandbox with a finding is not
used (`sandbox.backend_for` tries the next one or refuses, in one line with
the fix).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Sequence

# Host-global files under /proc that a sandboxed program must not open for
# writing. Opened (O_WRONLY) and closed at once: nothing is ever written.
KERNEL_FILES = ("/proc/sys/kernel/core_pattern",
                "/proc/sys/vm/overcommit_memory", "/proc/sysrq-trigger",
                "/proc/sys/kernel/modprobe", "/proc/sys/kernel/panic",
                "/proc/sys/vm/drop_caches")
# The probe program's tests run for this long before the sandbox must stop
# it; its report is printed at once, well before.
BUDGET_S = 1.0
# When the report did not come back in time (a loaded machine), the probe is
# repeated once with this budget before the sandbox is called broken.
RETRY_BUDGET_S = 5.0
# How long the host waits for the sandbox's processes to disappear.
_REAP_S = 2.0

# Runs inside the harness as a stdin program (standard library only). The
# placeholders are filled with JSON literals by `_program`.
_PROGRAM = r'''
import json, os, socket, sys, time

# A child in a new session: the host reads its ids while it runs, and it
# must not outlive the deadline.
if os.fork() == 0:
  os.setsid()
  os.execv(sys.executable, [sys.executable, "-I", "-S", "-c",
                            "import time; time.sleep(300)", TOKEN])
report = {}
opened = []
for path in KERNEL_FILES:
  try:
    os.close(os.open(path, os.O_WRONLY))  # opened and closed, never written
    opened.append(path)
  except OSError:
    pass
writable = []
for top, dirs, files in os.walk("/proc/sys"):
  for name in files:
    path = os.path.join(top, name)
    if os.access(path, os.W_OK):
      writable.append(path)
report["kernel_opened"] = opened
report["kernel_writable"] = writable[:5]
report["kernel_writable_count"] = len(writable)
try:
  socket.create_connection(("127.0.0.1", PORT), timeout=0.5).close()
  report["connected"] = True
except OSError:
  report["connected"] = False
report["interfaces"] = [name for _, name in socket.if_nameindex()]
written = []
for path in TARGETS:
  try:
    with open(path, "w") as f:
      f.write("written by the sandbox self-test")
    written.append(path)
  except OSError:
    pass
report["written"] = written
print(json.dumps(report), flush=True)
time.sleep(10_000)  # the sandbox must stop this at the deadline
'''


def _program(token: str, port: int, targets: Sequence[str]) -> str:
  header = (f"KERNEL_FILES = {json.dumps(list(KERNEL_FILES))}\n"
            f"PORT = {port}\nTOKEN = {json.dumps(token)}\n"
            f"TARGETS = {json.dumps(list(targets))}\n")
  return header + _PROGRAM


def _targets(token: str, prefixes: Sequence[str]) -> list[str]:
  """Host paths the probe tries to create (absolute, without duplicates)."""
  dirs = [tempfile.gettempdir(), "/usr", os.path.expanduser("~"),
          os.getcwd(), *prefixes]
  seen: dict[str, None] = {}
  for d in dirs:
    seen.setdefault(os.path.join(os.path.realpath(d), token), None)
  return list(seen)


def _live_with(token: str) -> list[int]:
  """Host processes (not zombies) whose command line holds `token`."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      if token.encode() not in pathlib.Path(
          f"/proc/{pid}/cmdline").read_bytes():
        continue
      state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
      if state[1].split()[0] in ("Z", "X"):
        continue
    except (OSError, IndexError):
      continue
    found.append(int(pid))
  return found


def _outlived(token: str) -> bool:
  """Whether a process of the probe is still alive after `_REAP_S` (killed
  then, so that a failed probe leaves nothing behind)."""
  deadline = time.monotonic() + _REAP_S
  while True:
    pids = _live_with(token)
    if not pids:
      return False
    if time.monotonic() > deadline:
      for pid in pids:
        try:
          os.kill(pid, 9)
        except OSError:
          pass
      return True
    time.sleep(0.05)


def _identity(status: dict[str, str]) -> list[str]:
  """What the ids and privileges of a sandboxed process, as the host's
  /proc shows them (in the host's user namespace), allow."""
  found = []
  if "0" in status.get("Uid", "0").split():
    found.append("runs as uid 0 of the host's user namespace (host root)")
  if "0" in (status.get("Gid", "0").split()
             + status.get("Groups", "").split()):
    found.append("holds gid 0 of the host's user namespace")
  if int(status.get("CapEff", "0"), 16) or int(status.get("CapBnd", "0"), 16):
    found.append("holds capabilities")
  if status.get("NoNewPrivs") != "1":
    found.append("no_new_privs is not set")
  return found


def findings(report: dict[str, Any]) -> list[str]:
  """What the probe program managed, from its own report."""
  found = []
  for path in report["kernel_opened"]:
    found.append(f"opened {path} for writing")
  if report["kernel_writable_count"]:
    found.append(f"{report['kernel_writable_count']} files under /proc/sys "
                 f"are writable (e.g. {report['kernel_writable'][0]})")
  if report["connected"]:
    found.append("connected to a host listener on 127.0.0.1")
  extra = [n for n in report["interfaces"] if n != "lo"]
  if extra:
    found.append(f"sees network interfaces {', '.join(extra)}")
  return found


class _Watcher(threading.Thread):
  """Reads, from the host, the status of the probe's child while it runs:
  its uid and gids as the host's user namespace sees them (the sandbox may
  nest user namespaces, so the probe cannot tell from inside)."""

  def __init__(self, token: str, seconds: float):
    super().__init__(daemon=True, name="sandbox-self-test-watcher")
    self.token, self.seconds = token, seconds
    self.status: dict[str, str] | None = None
    self.stop = threading.Event()

  def run(self) -> None:
    deadline = time.monotonic() + self.seconds
    while not self.stop.is_set() and time.monotonic() < deadline:
      for pid in _live_with(self.token):
        try:
          lines = pathlib.Path(f"/proc/{pid}/status").read_text()
        except OSError:
          continue
        self.status = dict((k, v.strip()) for k, _, v in (
            line.partition(":") for line in lines.splitlines()))
        return
      time.sleep(0.02)


Launch = Callable[[str, float], tuple[list[dict[str, Any]], str, float]]


def run(launch: Launch, prefixes: Sequence[str]) -> list[str] | str:
  """Runs the probe program through `launch(program, budget_s)`.

  Args:
    launch: runs a stdin program in the sandbox under test with the given
      budget; returns (the harness's records, its stderr, seconds taken).
    prefixes: the directories the sandbox binds read-only (interpreter).

  Returns:
    The findings (empty: the sandbox holds), or a string when the sandbox
    did not run the probe at all (its error).
  """
  token = f"brorl-selftest-{uuid.uuid4().hex}"
  targets = _targets(token, prefixes)
  listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  try:
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    program = _program(token, listener.getsockname()[1], targets)
    for budget in (BUDGET_S, RETRY_BUDGET_S):
      watcher = _Watcher(token, budget + 30.0)
      watcher.start()
      records, err, seconds = launch(program, budget)
      watcher.stop.set()
      watcher.join()
      stdout = records[0].get("stdout", "") if records else ""
      if stdout.strip() and watcher.status is not None:
        break
    found: list[str] = []
    try:
      listener.accept()[0].close()
      found.append("connected to a host listener on 127.0.0.1")
    except BlockingIOError:
      pass
  finally:
    listener.close()
  written = [p for p in targets if os.path.lexists(p)]
  for path in written:
    os.unlink(path)
  outlived = _outlived(token)
  try:
    report = json.loads(stdout.strip().splitlines()[0])
  except (json.JSONDecodeError, IndexError):
    if outlived or written:
      found.append("the probe ran unconfined but its report was lost")
    else:
      return err.strip()[-500:] or "the probe program gave no output"
  else:
    if watcher.status is None:
      found.append("the host could not see its processes' ids")
    else:
      found.extend(_identity(watcher.status))
    found = [f for f in findings(report) if f not in found] + found
  if written:
    found.append(f"wrote {written[0]} on the host")
  if outlived:
    found.append("a process it started was alive after its deadline")
  elif records and records[0].get("status") != "timeout":
    found.append("it was not stopped at its deadline")
  if seconds > budget + 5.0:
    found.append(f"it ran {seconds:.1f} s against a budget of {budget:g} s")
  return found


def python_prefixes(exe: str, binds: Sequence[str]) -> list[str]:
  """The directories the probe tries to write into besides the fixed ones."""
  return sorted({os.path.dirname(os.path.dirname(exe)), *binds,
                 sys.base_prefix})
