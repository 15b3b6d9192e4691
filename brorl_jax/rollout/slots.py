"""Slot accounting on the host: what the refill decode can reach.

An event simulation of the refill decode's pools (`refill.py`): each prompt's
G slots serve its rollouts in queue order, a slot taking the next rollout the
step its current one ends. A rollout of L tokens occupies L - 1 decode steps
(its first token comes from the prefill); rollouts that end at their first
token are never queued. The decode runs until the slowest pool is empty.
"""

from __future__ import annotations

import heapq

import numpy as np


def simulate_pools(lengths: np.ndarray, slots: int) -> dict[str, float]:
  """Steps and slot utilization of refilled pools over known lengths.

  Args:
    lengths: [P, N] rollout lengths (tokens, >= 1).
    slots: G, slots per prompt.

  Returns:
    {"steps": decode steps until the last rollout ends,
     "busy": slot-steps that produce a token,
     "utilization": busy / (steps * P * G) (1.0 when nothing is decoded)}.
  """
  lengths = np.asarray(lengths)
  if lengths.ndim != 2 or (lengths < 1).any():
    raise ValueError(f"lengths must be [P, N] with every entry >= 1, got "
                     f"shape {lengths.shape}, min {lengths.min()}")
  makespan = 0
  for row in lengths:
    free = [0] * slots                 # the step each slot becomes free
    for work in row[row > 1] - 1:
      t = heapq.heappop(free)
      heapq.heappush(free, t + int(work))
    makespan = max(makespan, max(free))
  busy = int(np.sum(lengths - 1))
  total = makespan * lengths.shape[0] * slots
  return {"steps": makespan, "busy": busy,
          "utilization": busy / total if total else 1.0}


def fixed_chunk_steps(lengths: np.ndarray, group: int) -> int:
  """Decode steps of fixed chunks of `group` rollouts of every prompt.

  Each chunk runs until its longest row ends (early stop): L_max - 1 steps.
  """
  lengths = np.asarray(lengths)
  p, n = lengths.shape
  chunks = lengths.reshape(p, n // group, group).max(axis=2)
  return int(np.sum(chunks.max(axis=0) - 1))


def skewed_lengths(rng: np.random.Generator, shape: tuple[int, int],
                   t_max: int, sigma: float = 0.8, mean_frac: float = 0.2,
                   capped: float = 0.02) -> np.ndarray:
  """Rollout lengths: lognormal(sigma) with mean mean_frac * T, a share
  `capped` set to T (the long tail that runs to the limit), all in [1, T]."""
  mu = np.log(mean_frac * t_max) - sigma**2 / 2
  lengths = np.ceil(rng.lognormal(mu, sigma, shape))
  lengths[rng.random(shape) < capped] = t_max
  return np.clip(lengths, 1, t_max).astype(np.int32)
