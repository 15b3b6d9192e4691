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
backward, e.g. NaN at padded positions), the loss terms themselves, or a
finite gradient whose update is not (a step too large). Later in a run,
`optim.max_consecutive_skips` skipped mini-batches in a row stop it the same
way, and an update that grows the parameter norm past
`optim.param_norm_jump` is flagged (`optim/param_norm_jumped`, a warning).
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

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
  if metrics.get("optim/skipped_params"):
    return (f"the update itself: loss and gradient are finite but the "
            f"updated parameters are not (optim/lr = {metrics.get('optim/lr')}"
            f": lower optim.learning_rate, or check optim.eps and the "
            f"optimizer state)")
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
  """Watches the skips of a run; `check` returns `NonFiniteRun` to raise
  when the first `steps` steps skipped every mini-batch, or
  `max_consecutive` mini-batches in a row were skipped.

  Args:
    num_minibatches: mini-batches per step (`algo.num_minibatches`).
    backend, platform, dtype: named in the message (`likely_cause`).
    steps: how many all-skipped first steps stop the run.
    max_consecutive: skipped mini-batches in a row that stop it (0: never).
    jump: a `optim/param_norm_ratio` above this is flagged (0: never).
  """

  def __init__(self, num_minibatches: int, *, backend: str, platform: str,
               dtype: str, steps: int = FIRST_STEPS, max_consecutive: int = 0,
               jump: float = 0.0):
    self.num_minibatches = num_minibatches
    self.describe = dict(backend=backend, platform=platform, dtype=dtype)
    self.steps = steps
    self.max_consecutive = max_consecutive
    self.jump = jump
    self._seen: list[dict] | None = []
    self._streak = 0

  def check(self, metrics: dict) -> NonFiniteRun | None:
    """Takes one step's metrics row before it is written (adds
    `optim/param_norm_jumped`); returns the error that stops the run."""
    ratio = metrics.get("optim/param_norm_ratio")
    if self.jump and ratio is not None:
      jumped = not math.isfinite(ratio) or ratio > self.jump
      metrics["optim/param_norm_jumped"] = int(jumped)
      if jumped:
        log.warning("the parameter norm grew %.3g-fold in one update (to "
                    "%.4g; optim.param_norm_jump = %g): a step this large "
                    "usually means the learning rate is too high",
                    ratio, metrics.get("optim/param_norm", float("nan")),
                    self.jump)
    skipped = int(metrics.get("optim/skipped", 0))
    everything = skipped >= self.num_minibatches
    self._streak = (self._streak + skipped if everything
                    else int(metrics.get("optim/skipped_trailing", 0)))
    if skipped:
      log.warning("%d of %d mini-batch updates skipped (loss, gradient or "
                  "updated parameters not finite; %d in a row)", skipped,
                  self.num_minibatches, self._streak)
    if self._seen is not None:
      if not everything:
        self._seen = None                     # a step trained: disarmed
      else:
        self._seen.append(metrics)
        if len(self._seen) >= self.steps:
          return NonFiniteRun(
              f"the first {self.steps} RL steps of this run skipped every "
              f"mini-batch ({self.num_minibatches} of {self.num_minibatches}"
              f" each: loss, gradient or updated parameters not finite), so "
              f"nothing trained; likely cause: "
              f"{likely_cause(self._seen[0], **self.describe)}")
    if self.max_consecutive and self._streak >= self.max_consecutive:
      return NonFiniteRun(
          f"{self._streak} mini-batch updates in a row were skipped (loss, "
          f"gradient or updated parameters not finite; "
          f"optim.max_consecutive_skips = {self.max_consecutive}), so the run "
          f"stopped with its parameters as of the last applied update (the "
          f"last checkpoint is finite); likely cause: "
          f"{likely_cause(metrics, **self.describe)}")
    return None
