"""Verifiers that misbehave, for the pool tests (importable by workers)."""

import os
import signal
import sys
import time


def sleep_forever(completion, answer, **meta):
  del completion, answer, meta
  time.sleep(10_000)


def ignore_sigterm_and_sleep(completion, answer, **meta):
  del completion, answer, meta
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  time.sleep(10_000)


def crash(completion, answer, **meta):
  del completion, answer, meta
  os.kill(os.getpid(), signal.SIGKILL)


def allocate(completion, answer, **meta):
  del answer, meta
  block = bytearray(int(completion) << 20)
  return float(len(block) > 0)


def pid(completion, answer, **meta):
  del completion, answer, meta
  return float(os.getpid())


def jax_loaded(completion, answer, **meta):
  del completion, answer, meta
  return float("jax" in sys.modules)


def nan(completion, answer, **meta):
  del completion, answer, meta
  return float("nan")


ALL = {f.__name__: f for f in (sleep_forever, ignore_sigterm_and_sleep, crash,
                               allocate, pid, jax_loaded, nan)}
