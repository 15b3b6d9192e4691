"""The code sandbox: Linux namespaces, a read-only interpreter, rlimits.

Model-written code runs in `sandbox_harness.py` inside (DESIGN.md §4):

* bubblewrap (`bwrap`): new PID, network, mount, IPC, UTS and cgroup
  namespaces, a root that holds only `/usr`, the interpreter's prefix
  (read-only), a minimal `/dev`, a `/proc` whose `/proc/sys` and
  `/proc/sysrq-trigger` are read-only, and a size-capped private tmpfs
  `/tmp` as the working directory; no home, no `/etc`, an empty
  environment; `--die-with-parent` kills it all when the worker dies. Run
  by an ordinary user, bubblewrap also makes a user namespace
  (`--unshare-all`) and the code runs as that user.
* util-linux `unshare` (fallback, root only): the same namespaces and
  mounts, set up by a small shell script inside a private mount namespace,
  then `chroot`.

Run by root (uid 0 of its user namespace), either backend sets up the
namespaces as root and then, as the last step before the harness starts,
`setpriv` switches to uid/gid 65534 (nobody/nogroup) with no supplementary
groups, an empty capability bounding set and `no_new_privs`: model code
never runs as the host's root. (A user namespace mapping root to 65534
would need `newuidmap` or a bubblewrap that can be run as nobody, and
nobody may not reach the interpreter, e.g. under a 0700 `/root`; the
switch works wherever root may create the namespaces at all, including
hosts with user namespaces disabled.)

Either way: rlimits (CPU time, address space, file size, open files) are set
in the launched process before exec and again, per test, by the harness;
the output read back is capped; the whole PID namespace dies with its first
process, which the worker kills (SIGKILL to the process group) at the end.
Before a backend is used, `sandbox_selftest` checks that a hostile probe
program gets nowhere in it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import os
import pathlib
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

from brorl_jax.rewards import sandbox_selftest
from brorl_jax.rewards.config import CodeConfig

_HARNESS = pathlib.Path(__file__).with_name("sandbox_harness.py")
_MB = 1 << 20
# Start-up of the sandbox and the interpreter, on top of the tests' budget.
STARTUP_SLACK_S = 2.0
_DEVICES = ("null", "zero", "random", "urandom")
# Loaded before any fork (for the fallback launcher): importing in a forked
# child can deadlock.
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
# Whom model code runs as when the sandbox is started by root: nobody /
# nogroup, the conventional unprivileged ids (mapped in common containers).
SANDBOX_UID = SANDBOX_GID = 65534
# Host-global files of the sandbox's /proc made read-only (where present).
_PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")


class SandboxUnavailable(RuntimeError):
  """No isolation is available; the message says how to enable it."""


@dataclasses.dataclass(frozen=True)
class TestRun:
  """What one test of a program produced.

  Attributes:
    status: "ok" (exited 0), "error" (non-zero exit or exception), "timeout",
      "killed" (by a signal, e.g. the CPU rlimit), "output_limit", or
      "not_run" (the sandbox ended before reaching this test).
    stdout: the program's stdout (at most `max_output_bytes`).
    value: the JSON text of the returned value (call-based tests).
  """
  status: str
  stdout: str = ""
  value: str = ""


@functools.lru_cache(maxsize=8)
def _interpreter(python: str | None) -> tuple[str, tuple[str, ...]]:
  """The interpreter to run and the directories it needs (to bind)."""
  if python is None:
    prefix = sys.base_prefix
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    exe = os.path.join(prefix, "bin", version)
    if not os.path.exists(exe):
      exe = os.path.realpath(sys.executable)
  else:
    exe = os.path.realpath(python)
    prefix = subprocess.run(
        [exe, "-I", "-S", "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True, text=True, check=True, timeout=30).stdout.strip()
  roots = {os.path.realpath(prefix)}
  roots.add(os.path.dirname(os.path.dirname(os.path.realpath(exe))))
  binds = tuple(sorted(r for r in roots if not r.startswith("/usr/")
                       and r != "/usr"))
  return exe, binds


def _as_root() -> bool:
  return os.geteuid() == 0


def _drop_to_nobody() -> list[str]:
  """`setpriv` arguments that leave root for nobody, for good."""
  return ["/usr/bin/setpriv", f"--reuid={SANDBOX_UID}",
          f"--regid={SANDBOX_GID}", "--clear-groups", "--no-new-privs",
          "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
          "--"]


def _parents(path: str) -> list[str]:
  """The ancestors of `path` below `/`, outermost first."""
  parts = pathlib.PurePosixPath(path).parents
  return [str(p) for p in reversed(parts) if str(p) != "/"]


def _bwrap_command(config: CodeConfig, exe: str,
                   binds: Sequence[str]) -> list[str]:
  if _as_root():
    # No user namespace: one made by root would map its root to the host's
    # root. The namespaces are made as root, setpriv then becomes nobody.
    cmd = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net",
           "--unshare-uts", "--unshare-cgroup-try", "--cap-drop", "ALL"]
    cmd += [x for cap in ("SETUID", "SETGID", "SETPCAP")
            for x in ("--cap-add", f"CAP_{cap}")]
  else:
    cmd = ["bwrap", "--unshare-all", "--cap-drop", "ALL"]
  cmd += ["--die-with-parent", "--new-session", "--clearenv",
          "--setenv", "PATH", "/usr/bin", "--hostname", "sandbox",
          "--ro-bind", "/usr", "/usr"]
  made = set()
  for path in binds:
    # bwrap would make the parents 0700 (unreachable once nobody).
    for parent in _parents(path):
      if parent not in made and not parent.startswith("/usr/"):
        cmd += ["--dir", parent]
        made.add(parent)
    cmd += ["--ro-bind", path, path]
  for link in ("lib", "lib64", "bin", "sbin"):
    if os.path.islink(f"/{link}") or os.path.isdir(f"/usr/{link}"):
      cmd += ["--symlink", f"usr/{link}", f"/{link}"]
  cmd += ["--proc", "/proc"]
  for name in _PROC_READ_ONLY:
    cmd += ["--ro-bind-try", f"/proc/{name}", f"/proc/{name}"]
  cmd += ["--dev", "/dev", "--size", str(config.tmpfs_mb * _MB),
          "--tmpfs", "/tmp", "--remount-ro", "/", "--chdir", "/tmp"]
  harness = [exe, "-I", "-S", "-c", _HARNESS.read_text()]
  if not _as_root():
    return cmd + harness
  # bwrap makes /tmp 0755 for root; nobody needs to write there.
  return cmd + ["/bin/sh", "-c", "chmod 1777 /tmp && exec \"$0\" \"$@\"",
                *_drop_to_nobody(), *harness]


@functools.lru_cache(maxsize=1)
def _mount_point() -> str:
  # An empty host directory that each sandbox's private mount namespace
  # covers with its own tmpfs; nothing is ever written into it on the host,
  # so one fixed path serves every process.
  path = os.path.join(tempfile.gettempdir(), "brorl_sandbox_root")
  try:
    os.mkdir(path, 0o700)
  except FileExistsError:
    pass
  if os.path.islink(path) or not os.path.isdir(path):
    path = tempfile.mkdtemp(prefix="brorl_sandbox_root_")
  return path


def _unshare_command(config: CodeConfig, exe: str,
                     binds: Sequence[str]) -> list[str]:
  root = _mount_point()
  lines = ["set -e", "umask 022", f'R="{root}"',
           'mount -t tmpfs -o size=16m,mode=0755 tmpfs "$R"',
           'mkdir -p "$R/usr" "$R/proc" "$R/dev" "$R/tmp"']
  for path in ("/usr",) + tuple(binds):
    lines += [f'mkdir -p "$R{path}"', f'mount --bind "{path}" "$R{path}"',
              f'mount -o remount,bind,ro,nosuid,nodev "$R{path}"']
  for link in ("lib", "lib64", "bin", "sbin"):
    if os.path.islink(f"/{link}") or os.path.isdir(f"/usr/{link}"):
      lines.append(f'ln -s "usr/{link}" "$R/{link}"')
  for dev in _DEVICES:
    lines += [f'touch "$R/dev/{dev}"',
              f'mount --bind /dev/{dev} "$R/dev/{dev}"']
  lines.append('mount -t proc -o nosuid,nodev,noexec proc "$R/proc"')
  for name in _PROC_READ_ONLY:
    target = f'"$R/proc/{name}"'
    lines.append(f"if [ -e {target} ]; then mount --bind {target} {target};"
                 f" mount -o remount,bind,ro {target}; fi")
  lines += [f'mount -t tmpfs -o size={config.tmpfs_mb}m,mode=1777 tmpfs '
            '"$R/tmp"',
            'mount -o remount,ro "$R"',
            'exec chroot "$R" /usr/bin/env -i PATH=/usr/bin '
            + " ".join(_drop_to_nobody()) +
            ' /bin/sh -c \'cd /tmp && exec "$0" "$@"\' '
            f'"{exe}" -I -S -c "$HARNESS"']
  return ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts",
          "--cgroup", "--fork", "--kill-child", "--propagation", "private",
          "sh", "-c", "\n".join(lines)]


def _launcher(config: CodeConfig, cpu_s: float):
  """What sets the rlimits and the parent-death signal before exec.

  util-linux `prlimit` and `setpriv` apply them and exec the sandbox, so no
  Python runs between fork and exec (a Python `preexec_fn` is unsafe in a
  process with threads, e.g. JAX's). Without them, a `preexec_fn` does it.

  Returns:
    (command prefix, preexec_fn or None).
  """
  limits = {"cpu": int(cpu_s) + 1, "as": config.memory_mb * _MB,
            "fsize": config.max_file_mb * _MB,
            "nofile": max(64, config.max_open_files), "core": 0}
  if _have_util_linux():
    # SIGKILL on the worker's death, even when the worker is SIGKILLed.
    return (["prlimit"] + [f"--{k}={v}" for k, v in limits.items()]
            + ["--", "setpriv", "--pdeathsig", "KILL", "--"], None)
  names = {"cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS,
           "fsize": resource.RLIMIT_FSIZE, "nofile": resource.RLIMIT_NOFILE,
           "core": resource.RLIMIT_CORE}

  def preexec():
    for key, value in limits.items():
      resource.setrlimit(names[key], (value, value))
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  return [], preexec


@functools.lru_cache(maxsize=1)
def _have_util_linux() -> bool:
  return bool(shutil.which("prlimit") and shutil.which("setpriv"))


def _command(config: CodeConfig, backend: str) -> list[str]:
  exe, binds = _interpreter(config.python)
  if backend == "bwrap":
    return _bwrap_command(config, exe, binds)
  if backend == "unshare":
    return _unshare_command(config, exe, binds)
  return [exe, "-I", "-S", "-c", _HARNESS.read_text()]


def _launch(config: CodeConfig, backend: str, request: dict[str, Any],
            timeout_s: float) -> tuple[list[dict[str, Any]], str]:
  """Runs the harness; returns its JSON records and stderr (both capped)."""
  env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
  if backend == "unshare":
    env["HARNESS"] = _HARNESS.read_text()
  data = json.dumps(request).encode()
  limit = (len(request["inputs"]) + 1) * (2 * config.max_output_bytes + 4096)
  prefix, preexec = _launcher(config, timeout_s)
  cmd = prefix + _command(config, backend)
  if backend != "none":
    # The sandbox works in its own /tmp; nothing of the host is needed (and
    # nothing is left behind when the worker is killed mid-item).
    return _run_harness(cmd, data, env, "/", preexec, timeout_s, limit)
  with tempfile.TemporaryDirectory(prefix=scratch_prefix(os.getpid())) as cwd:
    return _run_harness(cmd, data, env, cwd, preexec, timeout_s, limit)


def scratch_prefix(pid: int) -> str:
  """The name prefix of the scratch directories an unsandboxed run of
  process `pid` makes in the temporary directory."""
  return f"brorl_code_{pid}_"


def remove_scratch(pid: int) -> None:
  """Removes the scratch directories process `pid` left (it was killed
  before it could: the reward pool calls this for each dead worker)."""
  root = pathlib.Path(tempfile.gettempdir())
  for path in root.glob(scratch_prefix(pid) + "*"):
    shutil.rmtree(path, ignore_errors=True)


def _run_harness(cmd, data, env, cwd, preexec, timeout_s, limit):
  """Feeds `data` to the harness, reads its output (capped) until done."""
  proc = subprocess.Popen(
      cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, env=env, cwd=cwd, preexec_fn=preexec,
      start_new_session=True)
  out, err = bytearray(), bytearray()
  deadline = time.monotonic() + timeout_s
  try:
    pending = memoryview(data)
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    while streams and time.monotonic() < deadline and len(out) <= limit:
      writers = [proc.stdin.fileno()] if pending else []
      readable, writable, _ = select.select(
          list(streams), writers, [], max(0.0, deadline - time.monotonic()))
      if writable:
        try:
          pending = pending[os.write(writers[0], pending[:65536]):]
        except BrokenPipeError:
          pending = pending[:0]
        if not pending:
          proc.stdin.close()
      for fd in readable:
        chunk = os.read(fd, 65536)
        if chunk:
          if len(streams[fd]) < limit:
            streams[fd] += chunk
        else:
          del streams[fd]
  finally:
    # The whole sandbox dies with its first process (PID namespace, and
    # --die-with-parent / --kill-child below it).
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
      if not stream.closed:
        stream.close()
    proc.wait()
  records = []
  for line in bytes(out).decode("utf-8", "replace").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      break  # a cut-off last line, or output the program forged
    if isinstance(record, dict) and record.get("i") == len(records):
      records.append(record)
  return records, bytes(err[:4096]).decode("utf-8", "replace")


def _one_line(text: str) -> str:
  return " ".join(text.split())


@functools.lru_cache(maxsize=8)
def _probe(backend: str, config: CodeConfig) -> str | None:
  """Runs the self-test in `backend`; returns None or why it is unusable."""
  if backend != "none" and shutil.which(backend) is None:
    return f"'{backend}' is not installed"
  if backend == "unshare" and not _as_root():
    return "'unshare' needs root (it makes namespaces without a user one)"
  outcome = self_test(backend, config)
  if isinstance(outcome, str):
    return f"'{backend}' failed: {_one_line(outcome)}"
  if outcome:
    return f"'{backend}' failed its self-test: {'; '.join(outcome)}"
  return None


def self_test(backend: str, config: CodeConfig) -> list[str] | str:
  """Runs `sandbox_selftest`'s probe program in `backend`.

  Returns:
    What the probe managed (empty: the sandbox holds), or a string: the
    sandbox did not run it (its error).
  """
  exe, binds = _interpreter(config.python)

  def launch(program: str, budget_s: float):
    request = {"program": program, "mode": "stdin", "fn_name": None,
               "inputs": [""], "budget_s": budget_s,
               "pid_namespace": backend != "none", "limits": _limits(config)}
    start = time.monotonic()
    try:
      records, err = _launch(config, backend, request,
                             budget_s + STARTUP_SLACK_S)
    except OSError as e:
      return [], f"failed to start: {e}", time.monotonic() - start
    return records, err, time.monotonic() - start
  return sandbox_selftest.run(
      launch, sandbox_selftest.python_prefixes(exe, binds))


def _limits(config: CodeConfig) -> dict[str, int]:
  return {"memory_mb": config.memory_mb, "max_file_mb": config.max_file_mb,
          "max_open_files": config.max_open_files,
          "max_output_bytes": config.max_output_bytes}


# The backend chosen per config in this process (or the refusal); a lock
# makes concurrent callers (the pool's start-up thread and `submit`) wait
# for one self-test instead of running several.
_CHOSEN: dict[CodeConfig, str | SandboxUnavailable] = {}
_CHOSEN_LOCK = threading.Lock()


def _key(config: CodeConfig) -> CodeConfig:
  # The tests' budget does not change what the sandbox lets through.
  return dataclasses.replace(config, time_budget_s=None)


def _choose(config: CodeConfig) -> str | SandboxUnavailable:
  candidates = (("bwrap", "unshare") if config.sandbox == "auto"
                else (config.sandbox,))
  failures = []
  for backend in candidates:
    failure = _probe(backend, config)
    if failure is None:
      return backend
    failures.append(failure)
  if config.allow_unsandboxed:
    return "none"
  return SandboxUnavailable(
      "the code verifier runs model-written code only inside a sandbox that "
      f"passes its self-test, and none does here ({'; '.join(failures)}). "
      "Fix: install bubblewrap (e.g. `apt-get install bubblewrap`, which "
      "provides /usr/bin/bwrap) and util-linux (setpriv, unshare), and run "
      "where namespaces may be made (as root, or with unprivileged user "
      "namespaces enabled); or, in a trusted setting only, set "
      "rewards.code.allow_unsandboxed=True.")


def backend_for(config: CodeConfig) -> str:
  """The isolation backend to use: "bwrap", "unshare" or "none".

  The first candidate ("auto": bubblewrap, then unshare) that runs the
  self-test's probe program without a finding; decided once per process and
  config.

  Args:
    config: the `rewards.code` options.

  Returns:
    The backend ("none" only when `allow_unsandboxed`).

  Raises:
    SandboxUnavailable: no namespace backend passes and unsandboxed runs
      are not allowed; the one-line message says why and how to fix it.
  """
  key = _key(config)
  with _CHOSEN_LOCK:
    if key not in _CHOSEN:
      _CHOSEN[key] = _choose(key)
    chosen = _CHOSEN[key]
  if isinstance(chosen, SandboxUnavailable):
    raise SandboxUnavailable(str(chosen))
  return chosen


def use_tested_backend(config: CodeConfig, backend: str) -> None:
  """Takes `backend` as chosen for `config` (the reward pool's workers: their
  parent ran the self-test)."""
  with _CHOSEN_LOCK:
    _CHOSEN[_key(config)] = backend


def forget_choices() -> None:
  """Drops every decision and probe result (tests that change the host)."""
  with _CHOSEN_LOCK:
    _CHOSEN.clear()
    _probe.cache_clear()


def run_program(program: str, inputs: Sequence[Any], *, mode: str,
                fn_name: str | None, config: CodeConfig) -> list[TestRun]:
  """Runs `program` on each test input inside the sandbox.

  Args:
    program: Python source.
    inputs: stdin strings (mode "stdin") or argument lists (mode "call").
    mode: "stdin" or "call".
    fn_name: the function to call in mode "call".
    config: the `rewards.code` options (budget, limits, backend).

  Returns:
    One `TestRun` per input, in order.

  Raises:
    SandboxUnavailable: as `backend_for`.
  """
  backend = backend_for(config)
  request = {"program": program, "mode": mode, "fn_name": fn_name,
             "inputs": list(inputs), "budget_s": config.time_budget_s,
             "pid_namespace": backend != "none", "limits": _limits(config)}
  records, _ = _launch(config, backend, request,
                       config.time_budget_s + STARTUP_SLACK_S)
  runs = [TestRun(r.get("status", "error"), r.get("stdout", ""),
                  r.get("value", "")) for r in records]
  return runs + [TestRun("not_run")] * (len(inputs) - len(runs))
