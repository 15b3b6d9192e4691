"""A verifier worker process: scores chunks of items in its main thread.

Started by `RewardPool` as a fresh interpreter running `main(read_fd,
write_fd, parent_pid)`; it talks over two pipes with pickled messages:

  parent -> worker: setup dict (sys.path, memory limit, cpus, reward
    plugins), then (config, verifiers); then chunks [(key, VerifyItem),
    ...], or None (exit); before its first code item, ("sandbox", code
    config, backend): the sandbox the parent's self-test chose. Plugins are
    imported before the verifier table is unpickled: it refers to their
    functions by module name.
  worker -> parent: ("ready", info); ("result", key, reward, status,
    seconds, error) per item, in order; ("exiting",) when it quits
    mid-chunk (after a MemoryError): the parent requeues the rest.

It never imports JAX: nothing here or in the verifiers does, and unlike
`multiprocessing`'s spawn it does not re-import the parent's `__main__`
(which, for `python -m brorl_jax.train`, imports JAX). Verifiers run in the
main thread, where math-verify's signal-based timeouts work; the parent
enforces the per-item timeout by killing this process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection

_PR_SET_PDEATHSIG = 1


def info() -> dict:
  """What the parent may check about this worker (and tests assert)."""
  return {"pid": os.getpid(), "jax_imported": "jax" in sys.modules,
          "rlimit_as": resource.getrlimit(resource.RLIMIT_AS)[0],
          "cpus": sorted(os.sched_getaffinity(0))}


def _setup(setup: dict, parent_pid: int) -> None:
  # Die with the parent even if it is SIGKILLed (no orphans scoring on).
  ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent_pid:
    os._exit(1)  # pylint: disable=protected-access
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
  # math-verify warns that its own timeouts are off; here the pool's
  # per-item timeout bounds every call, so the warning is noise.
  for name in ("math_verify.grader", "math_verify.parser"):
    logging.getLogger(name).addFilter(
        lambda record: not record.getMessage().startswith("Timeout is disab"))
  sys.path[:] = setup["sys_path"]
  if setup["memory_mb"]:
    limit = setup["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
  if setup["cpus"]:
    os.sched_setaffinity(0, setup["cpus"])


def _warm_up(config, verifiers) -> None:
  """Pays first-call costs (imports, grammar loading) before timing starts."""
  # Imported here, once `setup` (the parent's sys.path, the memory limit)
  # has been applied: the verifiers load under the worker's limits.
  from brorl_jax.rewards import registry  # pylint: disable=g-import-not-at-top
  if "math" in verifiers:
    try:
      registry.score(registry.VerifyItem("\\boxed{\\frac{1}{2}}", "0.5",
                                         "math"), config, verifiers)
    except Exception:  # pylint: disable=broad-except
      pass  # a broken verifier reports itself on the first real item


def _load_plugins(entries) -> None:
  # Imported here, once `setup` has been applied (as the verifiers are).
  from brorl_jax.rewards import plugins  # pylint: disable=g-import-not-at-top
  plugins.load(entries)


def _score_one(item, config, verifiers):
  # Imported here, once `setup` (the parent's sys.path, the memory limit)
  # has been applied: the verifiers load under the worker's limits.
  from brorl_jax.rewards import registry  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  try:
    reward = registry.score(item, config, verifiers)
    return reward, "ok", time.perf_counter() - start, None
  except MemoryError:
    raise  # the process may be unusable: let it die and be replaced
  except Exception as e:  # pylint: disable=broad-except
    error = f"{type(e).__name__}: {e}"[:2000]
    return config.default_score, "error", time.perf_counter() - start, error


def main(read_fd: int, write_fd: int, parent_pid: int) -> None:
  """The worker loop (see the module doc for the protocol)."""
  receiver = Connection(read_fd, writable=False)
  sender = Connection(write_fd, readable=False)
  setup = receiver.recv()
  _setup(setup, parent_pid)
  _load_plugins(setup.get("plugins", ()))
  config, verifiers = receiver.recv()
  _warm_up(config, verifiers)
  sender.send(("ready", info()))
  while True:
    try:
      message = receiver.recv()
    except EOFError:
      return
    if message is None:
      return
    if isinstance(message, tuple) and message[0] == "sandbox":
      # Imported here, once `setup` has been applied (as the verifiers).
      # pylint: disable-next=g-import-not-at-top
      from brorl_jax.rewards import sandbox
      sandbox.use_tested_backend(message[1], message[2])
      continue
    for key, item in message:
      try:
        result = _score_one(item, config, verifiers)
      except MemoryError:
        # This process may be unusable now: report, hand the rest of the
        # chunk back, and exit to be replaced.
        sender.send(("result", key, config.default_score, "error", 0.0,
                     "MemoryError: rewards.worker_memory_mb exceeded"))
        sender.send(("exiting",))
        os._exit(3)  # pylint: disable=protected-access
      sender.send(("result", key) + result)


if __name__ == "__main__":
  try:
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
  except (EOFError, BrokenPipeError, KeyboardInterrupt):
    pass
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.exit(2)
