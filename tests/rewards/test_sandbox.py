"""Hostile programs in the sandbox (run as root, so namespaces must isolate).

Each hostile program is bounded, so that a broken sandbox cannot harm the
machine (50 children, an 8 GB *virtual* request, 100 MB of output). Each
runs to its end and scores 0 because it was denied (except the ones that
can only be stopped: sleeping forever, spinning); after each, a correct
program still scores 1, and no process of the sandbox is left.
"""

import os
import pathlib
import socket
import time
import uuid

import pytest

from brorl_jax.rewards import code_verifier, sandbox
from brorl_jax.rewards.code_verifier import verify_code
from brorl_jax.rewards.config import CodeConfig, RewardsConfig
from tests.rewards.sandbox_marks import (BACKENDS, FAILURES, REQUIRED,
                                         fresh_choices, needs_sandbox)

pytestmark = needs_sandbox

ECHO = {"inputs": ["ping"], "outputs": ["ping"]}
CORRECT = "```python\nprint(input())\n```"


def test_a_sandbox_works_here():
  assert BACKENDS or not REQUIRED, (
      f"BRORL_REQUIRE_SANDBOX=1 but no sandbox works: {FAILURES}")


@pytest.fixture(params=BACKENDS)
def config(request):
  return RewardsConfig(code=CodeConfig(sandbox=request.param,
                                       time_budget_s=1.0))


def _run(source, expected, config):
  tests = {"inputs": [""], "outputs": [expected]}
  passed, runs = code_verifier.run_tests(f"```python\n{source}\n```", tests,
                                         config=config)
  return passed[0], runs[0]


def _processes_with(token):
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
      continue
    if token.encode() in cmdline:
      found.append(int(pid))
  return found


def _still_works(config):
  assert verify_code(CORRECT, tests=ECHO, config=config) == 1.0


def test_sleeping_forever_is_stopped_within_the_budget(config):
  start = time.monotonic()
  passed, run = _run("import time\ntime.sleep(10_000)", "x", config)
  elapsed = time.monotonic() - start
  assert not passed and run.status == "timeout"
  assert elapsed < config.code.time_budget_s + sandbox.STARTUP_SLACK_S
  _still_works(config)


def test_spinning_is_stopped_within_the_budget(config):
  start = time.monotonic()
  passed, run = _run("while True:\n  pass", "x", config)
  assert not passed and run.status in ("timeout", "killed")
  assert time.monotonic() - start < (config.code.time_budget_s
                                     + sandbox.STARTUP_SLACK_S)
  _still_works(config)


def test_children_do_not_outlive_the_program(config):
  token = f"brorl-child-{uuid.uuid4().hex}"
  source = (
      "import os, time\n"
      "for _ in range(50):\n"
      "  if os.fork() == 0:\n"
      "    os.setsid()\n"  # try to escape the process group
      f"    os.execv('/usr/bin/sleep', ['{token}', '300'])\n"
      "time.sleep(0.2)\n"
      "print('forked')\n")
  passed, run = _run(source, "forked", config)
  assert run.status == "ok" and passed  # it ran to its end
  assert _processes_with(token) == []
  _still_works(config)


def test_memory_bomb_is_denied(config):
  source = ("try:\n  block = bytearray(8 << 30)\n  print('allocated')\n"
            "except MemoryError:\n  print('denied')\n")
  passed, run = _run(source, "allocated", config)
  assert not passed and run.status == "ok" and run.stdout.strip() == "denied"
  _still_works(config)


def test_host_files_cannot_be_read(config, tmp_path):
  canary = tmp_path / "canary.txt"
  secret = f"canary-{uuid.uuid4().hex}"
  canary.write_text(secret)
  repo = pathlib.Path(__file__).resolve().parents[2]
  home = pathlib.Path.home()
  host_files = [repo / "pyproject.toml", home / ".bashrc", home / ".profile",
                pathlib.Path("/etc/passwd"), pathlib.Path("/etc/hostname")]
  # Only files the host itself can read make the denial meaningful.
  paths = [str(canary), "../canary.txt"] + [
      str(p) for p in host_files if p.is_file() and os.access(p, os.R_OK)]
  assert len(paths) >= 4
  source = (
      f"for path in {paths!r}:\n"
      "  try:\n    print(open(path).read())\n"
      "  except OSError:\n    print('denied')\n")
  passed, run = _run(source, secret, config)
  assert not passed and run.status == "ok"
  assert run.stdout.split() == ["denied"] * len(paths)
  assert canary.read_text() == secret
  _still_works(config)


def test_writes_do_not_reach_the_host(config, tmp_path):
  name = f"escape-{uuid.uuid4().hex}"
  targets = [f"../{name}", f"/{name}", f"/tmp/../{name}",
             str(tmp_path / name), f"/usr/{name}"]
  source = (
      f"open('{name}', 'w').write('inside is fine')\n"
      f"for path in {targets!r}:\n"
      "  try:\n    open(path, 'w').write('x')\n    print('written')\n"
      "  except OSError:\n    print('denied')\n")
  passed, run = _run(source, "written", config)
  assert not passed and run.status == "ok"
  assert run.stdout.split() == ["denied"] * len(targets)
  for where in (pathlib.Path("/"), pathlib.Path("/tmp"), tmp_path,
                pathlib.Path("/usr"), pathlib.Path.cwd()):
    assert not (where / name).exists()
  _still_works(config)


def test_network_is_unreachable(config):
  listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  listener.bind(("127.0.0.1", 0))
  listener.listen(8)
  listener.setblocking(False)
  port = listener.getsockname()[1]
  source = (
      "import socket\n"
      "try:\n"
      f"  socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
      "  print('connected')\n"
      "except OSError:\n  print('denied')\n")
  try:
    passed, run = _run(source, "connected", config)
    assert not passed and run.status == "ok"
    assert run.stdout.strip() == "denied"
    with pytest.raises(BlockingIOError):
      listener.accept()  # nobody ever connected
  finally:
    listener.close()
  _still_works(config)


def test_huge_output_is_capped(config):
  source = ("import sys\nfor _ in range(100_000):\n"
            "  sys.stdout.write('x' * 999 + '\\n')")
  start = time.monotonic()
  passed, run = _run(source, "x", config)
  assert not passed and run.status == "output_limit"
  assert len(run.stdout) <= config.code.max_output_bytes
  assert time.monotonic() - start < config.code.time_budget_s + 2
  _still_works(config)


def test_no_isolation_refuses_with_instructions(monkeypatch):
  which = sandbox.shutil.which
  monkeypatch.setattr(sandbox.shutil, "which", lambda name: (
      None if name in ("bwrap", "unshare") else which(name)))
  with fresh_choices():
    with pytest.raises(sandbox.SandboxUnavailable,
                       match="apt-get install bubblewrap.*allow_unsandboxed"):
      verify_code(CORRECT, tests=ECHO)
    trusted = RewardsConfig(code=CodeConfig(allow_unsandboxed=True))
    assert sandbox.backend_for(trusted.code) == "none"
    assert verify_code(CORRECT, tests=ECHO, config=trusted) == 1.0


def test_limits_bind_without_util_linux_launchers(config, monkeypatch):
  """The preexec_fn fallback sets the same rlimits as prlimit/setpriv."""
  monkeypatch.setattr(sandbox, "_have_util_linux", lambda: False)
  assert sandbox._launcher(config.code, 1.0)[1] is not None
  test_memory_bomb_is_denied(config)
  passed, run = _run("import resource\n"
                     "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])",
                     str(config.code.max_open_files), config)
  assert passed and run.status == "ok"
