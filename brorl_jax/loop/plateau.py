"""The plateau stop: end a run once held-out pass@1 stopped rising.

`eval.plateau_window = W` (>= 3): after every evaluation, the least-squares
slope of pass@1 against cumulative generated tokens over the last W
evaluations is tested (`analysis.intervals.plateaued`, one-sided at
`eval.plateau_confidence`); when it is not significantly positive the run
stops after that step, checkpointed there (the branch point of the paper's
Figure 1: `compare --from W/checkpoints/S`). The evaluations seen so far
and the stop live in the loop's checkpointed meta (`eval_history`,
`plateau_step`), so a resumed run keeps its history and a finished one
trains no further step.
"""

from __future__ import annotations

import logging

from brorl_jax import run_config
from brorl_jax.analysis import intervals

log = logging.getLogger("brorl_jax.train")

PASS1 = "eval/pass@1"


class PlateauStop:
  """Records evaluations in the loop's meta and says when to stop."""

  def __init__(self, cfg: run_config.EvalConfig):
    self.window = cfg.plateau_window
    self.confidence = cfg.plateau_confidence

  @staticmethod
  def reached(meta: dict) -> bool:
    """Whether this run (perhaps before a resume) already plateaued."""
    return meta.get("plateau_step") is not None

  def record(self, meta: dict, step: int, metrics: dict) -> bool:
    """Adds an evaluation (tokens so far, pass@1) to `meta`; True when
    pass@1 just plateaued: sets `meta["plateau_step"]` and logs
    `eval/plateau` = 1 in `metrics`. No-op when off or nothing evaluated."""
    if not self.window or metrics.get(PASS1) is None:
      return False
    history = meta.setdefault("eval_history", [])
    history.append([meta["generated_tokens_total"], metrics[PASS1]])
    tokens, pass1 = zip(*history)
    if not intervals.plateaued(tokens, pass1, self.window, self.confidence):
      return False
    meta["plateau_step"] = step
    metrics["eval/plateau"] = 1
    log.info("step %d: held-out pass@1 stopped rising over the last %d "
             "evaluations (%s): stopping", step, self.window,
             ", ".join(f"{p:.4f}" for p in pass1[-self.window:]))
    return True
