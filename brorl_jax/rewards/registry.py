"""Verifiers by name, the item/result records, and scoring one item.

A verifier is a pure, picklable, module-level function
`(completion: str, answer: str, *, config: RewardsConfig, **meta) -> float`.
`score(item, config)` calls the one named by `item.verifier` with the
record's `meta` as keywords (and `tests` for code); keys a verifier does not
use are ignored by it, and meta keys `completion`, `answer` and `config`
are not passed. Register your own with `register(name, fn)`; it must
live in an importable module, because pool workers import it by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

from brorl_jax.data import tasks
from brorl_jax.rewards import basic, code_verifier, gym_verifier
from brorl_jax.rewards import math_verifier
from brorl_jax.rewards.config import RewardsConfig

Verifier = Callable[..., float]

VERIFIERS: dict[str, Verifier] = {
    "math": math_verifier.verify_math,
    "numeric": basic.verify_numeric,
    "choice": basic.verify_choice,
    "exact": basic.verify_exact,
    "code": code_verifier.verify_code,
    "reasoning_gym": gym_verifier.verify_reasoning_gym,
    # The synthetic countdown task: any boxed expression that reaches the
    # target with each number once (data/tasks.py; stdlib only).
    "countdown": tasks.countdown_score,
}
STATUSES = ("ok", "timeout", "error")
# Their small-int codes in device arrays and the rollout archive.
STATUS_CODES = {name: code for code, name in enumerate(STATUSES)}
_RESERVED = ("completion", "answer", "config")


@dataclasses.dataclass(frozen=True)
class VerifyItem:
  """One completion to score.

  Attributes:
    completion: the model's decoded completion.
    answer: the record's reference answer.
    verifier: the registered verifier name, e.g. "math".
    tests: the record's tests (code), or None.
    meta: the record's meta; passed to the verifier as keywords.
  """
  completion: str
  answer: str
  verifier: str
  tests: Any = None
  meta: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class VerifyResult:
  """The outcome of scoring one item.

  Attributes:
    reward: the verifier's reward, or `rewards.default_score` when the item
      timed out or failed.
    status: "ok", "timeout" (killed after `rewards.timeout_s`) or "error"
      (the verifier raised, or its worker died).
    seconds: time spent on the item.
    error: what went wrong ("TypeName: message"), None when ok.
  """
  reward: float
  status: str
  seconds: float
  error: str | None = None


def register(name: str, fn: Verifier) -> None:
  """Registers a verifier under `name` (importable, module-level `fn`)."""
  if not callable(fn) or "<locals>" in getattr(fn, "__qualname__", "<locals>"):
    raise ValueError(f"verifier {name!r} must be a module-level function, "
                     "so that worker processes can import it")
  VERIFIERS[name] = fn


def get_verifier(name: str) -> Verifier:
  """The verifier registered as `name`.

  Raises:
    KeyError: unknown name; the message lists the registered ones.
  """
  try:
    return VERIFIERS[name]
  except (KeyError, TypeError):
    raise KeyError(f"unknown verifier {name!r}; registered verifiers: "
                   f"{', '.join(sorted(VERIFIERS))}") from None


def score(item: VerifyItem, config: RewardsConfig | None = None,
          verifiers: Mapping[str, Verifier] | None = None) -> float:
  """Scores one item in this process (no timeout: see `RewardPool`).

  Args:
    item: the item.
    config: the rewards config (defaults when None).
    verifiers: the name -> function table (the registry when None).

  Returns:
    The verifier's reward.

  Raises:
    Whatever the verifier raises (bad references, unavailable sandbox).
  """
  fn = (verifiers or VERIFIERS).get(item.verifier) or get_verifier(
      item.verifier)
  # Record meta comes in as keywords; names that would collide with the
  # verifier's own arguments are not meta.
  kwargs = {k: v for k, v in (item.meta or {}).items()
            if k not in _RESERVED}
  kwargs["config"] = config or RewardsConfig()
  if item.tests is not None:
    kwargs["tests"] = item.tests
  reward = float(fn(item.completion, item.answer, **kwargs))
  if not math.isfinite(reward):
    raise ValueError(f"verifier {item.verifier!r} returned {reward}")
  return reward
