"""When the KL reference is reset to the current policy (host side).

ProRL's hard reset: the reference moves to the current policy on a schedule,
when the step's KL to it grows too large, or when held-out pass@1 drops
below its best. The decision is taken on the host from the step's metrics;
the reset itself is `train_state.reset_reference` (device, jitted by the
loop).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from brorl_jax.config import check


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
  """Reference policy resets (section `algo.reference`; only with a KL term).

  Attributes:
    reset_every: reset the reference to the current policy every K RL steps
      (ProRL v2: 200-500); 0 = never on a schedule.
    reset_kl_above: reset when the step's mean KL to the reference exceeds
      this; None = off.
    reset_on_eval_drop: reset when held-out pass@1 drops by more than this
      below its best so far; None = off.
    reset_optimizer: also re-initialize the optimizer state (ProRL v1 does,
      ProRL v2 does not).
  """

  reset_every: int = 0
  reset_kl_above: float | None = None
  reset_on_eval_drop: float | None = None
  reset_optimizer: bool = False

  def __post_init__(self):
    check(self.reset_every >= 0, "algo.reference.reset_every", "must be >= 0")


def reset_reason(cfg: ReferenceConfig, step: int, metrics: Mapping[str, Any],
                 best_eval: float | None) -> str | None:
  """Why the reference is reset after `step`, or None to keep it.

  Args:
    cfg: the reset rules.
    step: completed RL steps.
    metrics: the step's metrics (`loss/kl_ref`, and `eval/pass@1` on
      evaluation steps).
    best_eval: the best held-out pass@1 so far (None before any).

  Returns:
    "schedule", "kl", "eval" (the first rule that fires) or None.
  """
  if cfg.reset_every and step % cfg.reset_every == 0:
    return "schedule"
  if (cfg.reset_kl_above is not None
      and metrics.get("loss/kl_ref", 0.0) > cfg.reset_kl_above):
    return "kl"
  if (cfg.reset_on_eval_drop is not None and "eval/pass@1" in metrics
      and best_eval is not None
      and metrics["eval/pass@1"] < best_eval - cfg.reset_on_eval_drop):
    return "eval"
  return None
