"""Counters of a reward pool, summarized as flat metric names.

`summary()` gives, for the train loop to log (e.g. under `verifier/`):
`items`, `timeouts`, `errors`, `restarts` (workers replaced after a timeout
or a crash), `recycled` (replaced after `recycle_every` items), and per
verifier `<name>/count`, `<name>/mean_reward`, `<name>/mean_latency_s`,
`<name>/timeouts`, `<name>/errors`.
"""

from __future__ import annotations

import collections
import dataclasses

from brorl_jax.rewards.registry import VerifyResult


@dataclasses.dataclass
class _Counter:
  count: int = 0
  reward: float = 0.0
  seconds: float = 0.0
  timeouts: int = 0
  errors: int = 0


class PoolStats:
  """Running totals since creation (the pool swaps in a fresh one on pop)."""

  def __init__(self):
    self.by_verifier: dict[str, _Counter] = collections.defaultdict(_Counter)
    self.restarts = 0
    self.recycled = 0

  def add(self, verifier: str, result: VerifyResult) -> None:
    """Counts one result of `verifier`."""
    counter = self.by_verifier[verifier]
    counter.count += 1
    counter.reward += result.reward
    counter.seconds += result.seconds
    counter.timeouts += result.status == "timeout"
    counter.errors += result.status == "error"

  def summary(self) -> dict[str, float]:
    """The flat metrics described in the module doc."""
    counters = self.by_verifier.values()
    out: dict[str, float] = {
        "items": sum(c.count for c in counters),
        "timeouts": sum(c.timeouts for c in counters),
        "errors": sum(c.errors for c in counters),
        "restarts": self.restarts, "recycled": self.recycled}
    for name, c in sorted(self.by_verifier.items()):
      out[f"{name}/count"] = c.count
      out[f"{name}/mean_reward"] = c.reward / max(c.count, 1)
      out[f"{name}/mean_latency_s"] = c.seconds / max(c.count, 1)
      out[f"{name}/timeouts"] = c.timeouts
      out[f"{name}/errors"] = c.errors
    return out
