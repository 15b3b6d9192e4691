"""Runs one program against test inputs; executed INSIDE the sandbox.

Standalone on purpose (no package imports, `python -I -S`): the sandbox sees
only the interpreter. It reads one JSON request from stdin:

  {"program": src, "mode": "stdin" | "call", "fn_name": str | null,
   "inputs": [...], "budget_s": float, "pid_namespace": bool,
   "limits": {"memory_mb", "max_file_mb", "max_open_files",
              "max_output_bytes"}}

and writes one JSON line per test to stdout as each finishes:
{"i", "status": ok|error|timeout|killed|output_limit, "stdout", "value"}.
Expected outputs never enter the sandbox: the caller compares, so a program
that tampers with this process cannot make a wrong answer pass.

Each test runs in a forked child with rlimits (address space, CPU time,
file size, open files) set before the program runs; after each test every
other process in the PID namespace is killed, so children a program leaves
behind cannot outlive its test.
"""

import json
import os
import resource
import select
import signal
import sys
import time
import traceback

_MB = 1 << 20


def _limit(spec, seconds):
  limits = spec["limits"]
  cpu = int(seconds) + 1
  for name, value in ((resource.RLIMIT_AS, limits["memory_mb"] * _MB),
                      (resource.RLIMIT_FSIZE, limits["max_file_mb"] * _MB),
                      (resource.RLIMIT_NOFILE, limits["max_open_files"]),
                      (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(name, (value, value))


def _jsonable(value):
  if isinstance(value, (set, frozenset, tuple)):
    return list(value)
  return repr(value)


def _child(spec, code, test_input, seconds, fds):
  """In the forked child: limits, stdio, then the program. Never returns."""
  in_r, out_w, res_w = fds
  status = 1
  try:
    os.setpgid(0, 0)
    _limit(spec, seconds)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(in_r, 0)
    os.dup2(out_w, 1)
    os.dup2(devnull, 2)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    call = spec["mode"] == "call"
    scope = {"__name__": "solution" if call else "__main__",
             "__builtins__": __builtins__}
    try:
      exec(code, scope)  # pylint: disable=exec-used
      if call:
        fn_name = spec["fn_name"]
        fn = scope.get(fn_name)
        if fn is None and "Solution" in scope:
          fn = getattr(scope["Solution"](), fn_name)
        args = test_input if isinstance(test_input, list) else [test_input]
        value = fn(*args)
        os.write(res_w, json.dumps(value, default=_jsonable).encode())
      status = 0
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else (0 if e.code is None
                                                       else 1)
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
    sys.stdout.flush()
  finally:
    os._exit(status)  # pylint: disable=protected-access


def _kill_leftovers(spec, pid):
  """Kills the test's process group and, in a private PID namespace, all."""
  try:
    os.killpg(pid, signal.SIGKILL)
  except OSError:
    pass
  if spec["pid_namespace"]:
    me = os.getpid()
    for name in os.listdir("/proc"):
      if name.isdigit() and int(name) not in (1, me):
        try:
          os.kill(int(name), signal.SIGKILL)
        except OSError:
          pass
  while True:  # reap what is ours (as PID 1, orphans are ours too)
    try:
      if os.waitpid(-1, os.WNOHANG) == (0, 0):
        break
    except ChildProcessError:
      break


def _run_test(spec, code, test_input, seconds):
  """Runs one test; returns (status, stdout bytes, value bytes)."""
  stdin_data = (test_input if isinstance(test_input, str) else "").encode()
  in_r, in_w = os.pipe()
  out_r, out_w = os.pipe()
  res_r, res_w = os.pipe()
  pid = os.fork()
  if pid == 0:
    for fd in (in_w, out_r, res_r):
      os.close(fd)
    _child(spec, code, test_input, seconds, (in_r, out_w, res_w))
  for fd in (in_r, out_w, res_w):
    os.close(fd)
  deadline = time.monotonic() + seconds
  cap = spec["limits"]["max_output_bytes"]
  chunks = {out_r: [], res_r: []}
  sizes = {out_r: 0, res_r: 0}
  open_reads = {out_r, res_r}
  pending = memoryview(stdin_data)
  if not pending:
    os.close(in_w)
    in_w = None
  # A pidfd turns readable when the child exits, so one select() waits for
  # output, room for input and the exit together.
  try:
    exit_fd = os.pidfd_open(pid)
  except (AttributeError, OSError):
    exit_fd = None
  status, exit_code = None, None
  while status is None:
    if exit_code is None:
      waited, code_ = os.waitpid(pid, os.WNOHANG)
      if waited:
        exit_code = code_
    now = time.monotonic()
    if exit_code is not None and not open_reads:
      break
    if now >= deadline:
      status = "timeout"
      break
    # Once the program exited, only drain what is already buffered: its
    # children may hold the pipes open.
    if exit_code is not None:
      wait = 0.0
    else:
      wait = min(0.002 if exit_fd is None else 1.0, deadline - now)
    waitables = list(open_reads)
    if exit_code is None and exit_fd is not None:
      waitables.append(exit_fd)
    readable, writable, _ = select.select(
        waitables, [in_w] if in_w is not None else [], [], wait)
    if writable:
      try:
        sent = os.write(in_w, pending[:65536])
        pending = pending[sent:]
      except BrokenPipeError:
        pending = pending[:0]
      if not pending:
        os.close(in_w)
        in_w = None
    drained = True
    for fd in readable:
      if fd == exit_fd:
        continue
      data = os.read(fd, 65536)
      if not data:
        open_reads.discard(fd)
        continue
      drained = False
      chunks[fd].append(data)
      sizes[fd] += len(data)
      if sizes[fd] > cap:
        status = "output_limit"
    if exit_code is not None and drained:
      break
  if exit_fd is not None:
    os.close(exit_fd)
  _kill_leftovers(spec, pid)
  if exit_code is None:
    try:
      _, exit_code = os.waitpid(pid, 0)
    except ChildProcessError:
      exit_code = -1
  for fd in (out_r, res_r) + ((in_w,) if in_w is not None else ()):
    os.close(fd)
  if status is None:
    if os.WIFSIGNALED(exit_code):
      status = "killed"
    else:
      status = "ok" if os.WEXITSTATUS(exit_code) == 0 else "error"
  return status, b"".join(chunks[out_r])[:cap], b"".join(chunks[res_r])[:cap]


def main():
  """Reads the request, runs each test, writes one JSON line per test."""
  spec = json.loads(sys.stdin.buffer.read())
  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  start = time.monotonic()
  try:
    code = compile(spec["program"], "solution.py", "exec")
  except BaseException as e:  # pylint: disable=broad-except
    code, compile_error = None, f"{type(e).__name__}: {e}"
  for i, test_input in enumerate(spec["inputs"]):
    remaining = spec["budget_s"] - (time.monotonic() - start)
    if code is None:
      record = {"i": i, "status": "error", "error": compile_error[:500]}
    elif remaining <= 0:
      record = {"i": i, "status": "timeout"}
    else:
      status, out, value = _run_test(spec, code, test_input, remaining)
      record = {"i": i, "status": status,
                "stdout": out.decode("utf-8", "replace"),
                "value": value.decode("utf-8", "replace")}
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
