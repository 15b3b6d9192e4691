"""Stops a run whose first steps train nothing (host side of the update's
non-finite skips).

The update skips a mini-batch whose loss or gradient is not finite
(`rl/update.py`, counted as `optim/skipped`). One skipped mini-batch is a
bad batch; every mini-batch of the run's first steps skipped is a run that
trains nothing and would go on doing so, its only trace the counter
`optim/skipped_total`. `SkipWatch` stops such a run after `FIRST_STEPS`
steps with one line that names the likely cause, read off the first step's
metrics: non-finite parameters, a forward pass whose log-probs are not
finite, a finite loss with a non-finite gradient (the attention kernel's
backward, e.g. NaN at padded positions), or the loss terms themselves.
"""

from __future__ import annotations

import math

# Steps of a run (from its start or resume) that may skip every mini-batch
# before it stops.
FIRST_STEPS = 2


class NonFiniteRun(RuntimeError):
  """The run's first steps skipped every mini-batch."""


def _bad(metrics: dict, key: str) -> bool:
  value = metrics.get(key)
  return value is not None and not math.isfinite(value)


def likely_cause(metrics: dict, backend: str, platform: str,
                 dtype: str) -> str:
  """What most likely made a step's update non-finite, in words.

  Args:
    metrics: the step's metrics row (`optim/*`, `loss/*`, `rollout/*`).
    backend: the resolved attention backend of the update.
    platform: "cpu", "gpu" or "tpu".
    dtype: the model's compute dtype.
  """
  kernel = f"attention backend {backend!r} on {platform} ({dtype})"
  check = ("check the kernels with `python -m brorl_jax.bench gpu` (GPU) or "
           "compare --config.model.attention_backend=reference")
  if _bad(metrics, "optim/param_norm"):
    return ("the parameters are not finite (the initial weights: check "
            "init.path or the checkpoint the run resumed from)")
  if _bad(metrics, "loss/loss") and _bad(metrics, "rollout/logp_diff_mean"):
    return (f"the update's forward pass: its log-probs are not finite "
            f"({kernel}); {check}")
  if _bad(metrics, "loss/loss"):
    return (f"the loss terms: loss/loss = {metrics['loss/loss']} with finite "
            f"log-probs (a loss coefficient, the advantages or the "
            f"rewards are not finite)")
  return (f"the backward pass: the loss is finite, the gradient is not "
          f"(optim/grad_norm = {metrics.get('optim/grad_norm')}; the "
          f"{kernel} backward, e.g. NaN at padded positions); {check}")


class SkipWatch:
  """Watches the first `steps` steps; raises `NonFiniteRun` if each of them
  skipped every mini-batch.

  Args:
    num_minibatches: mini-batches per step (`algo.num_minibatches`).
    backend, platform, dtype: named in the message (`likely_cause`).
    steps: how many all-skipped first steps stop the run.
  """

  def __init__(self, num_minibatches: int, *, backend: str, platform: str,
               dtype: str, steps: int = FIRST_STEPS):
    self.num_minibatches = num_minibatches
    self.describe = dict(backend=backend, platform=platform, dtype=dtype)
    self.steps = steps
    self._seen: list[dict] = []

  def check(self, metrics: dict) -> None:
    """Takes one step's metrics row (after it is written)."""
    if self._seen is None:
      return
    if metrics.get("optim/skipped", 0) < self.num_minibatches:
      self._seen = None                       # a step trained: disarmed
      return
    self._seen.append(metrics)
    if len(self._seen) < self.steps:
      return
    first = self._seen[0]
    raise NonFiniteRun(
        f"the first {self.steps} RL steps of this run skipped every "
        f"mini-batch ({self.num_minibatches} of {self.num_minibatches} "
        f"each: loss or gradient not finite), so nothing trained; likely "
        f"cause: {likely_cause(first, **self.describe)}")
