"""SIGTERM as a flag every process agrees on (the loop polls it between
phases; the last completed step is then saved and the run exits 0)."""

from __future__ import annotations

import logging
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Preemption:
  """SIGTERM sets a flag; the loop checks it between phases."""

  def __init__(self):
    self.requested_at: float | None = None
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested_at is None:
      self.requested_at = time.monotonic()
      log.warning("SIGTERM: abandoning the in-flight iteration")

  def requested(self) -> bool:
    """True on every process once any process was asked to stop."""
    flag = self.requested_at is not None
    if jax.process_count() > 1:
      flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
      if flag and self.requested_at is None:   # told by another process
        self.requested_at = time.monotonic()
    return flag

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)
