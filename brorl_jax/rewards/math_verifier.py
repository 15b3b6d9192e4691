"""The `math` verifier: final-answer extraction, then math-verify equivalence.

The ProRL rule: reward 1 when the extracted answer matches the gold after
string normalization OR math-verify (sympy) accepts it as equal; else 0.

math-verify is imported on first use, so the parent process that only builds
a `RewardPool` never pays for it (and never loads sympy).
"""

from __future__ import annotations

import functools
import re
import threading

from brorl_jax.rewards import formatting
from brorl_jax.rewards.config import MathConfig, RewardsConfig

_DEFAULT = RewardsConfig()
# Unescaped `$`: a gold that already carries its delimiters.
_DOLLAR = re.compile(r"(?<!\\)\$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")
_REMOVALS = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ",
             "^\\circ", "^{\\circ}", "\\%", "%", "\\$", "$", "\\displaystyle")


def normalize_answer(answer: str) -> str:
  """Normalizes a final answer for the string-match half of the ProRL rule.

  Drops whitespace, `$`, sizing (`\\left`/`\\right`), thin spaces, degree and
  percent signs, `\\text{...}` wrappers and a trailing period; maps
  `\\dfrac`/`\\tfrac` to `\\frac`. E.g. `\\dfrac{1}{2}.` -> `\\frac{1}{2}`,
  `90^\\circ` -> `90`, `\\text{(C)}` -> `(C)`.

  Args:
    answer: an answer string (gold or extracted).

  Returns:
    The normalized string.
  """
  text = answer.strip()
  text = _TEXT_WRAPPER.sub(r"\1", text)
  for token in _REMOVALS:
    text = text.replace(token, "")
  text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  text = re.sub(r"\s+", "", text)
  return text.rstrip(".")


def _wrap_gold(gold: str) -> str:
  # math-verify parses a bare LaTeX gold to nothing (ENV.md §8): delimit it.
  if "\\boxed" in gold or _DOLLAR.search(gold):
    return gold
  return f"${gold}$"


def _wrap_prediction(answer: str) -> str:
  # Boxing keeps math-verify's box-content rules; unbalanced braces (from a
  # regex match) would break the box, so those are delimited with `$`.
  if answer.count("{") == answer.count("}"):
    return f"\\boxed{{{answer}}}"
  return f"${answer}$"


def _timeouts(config: MathConfig) -> int | None:
  # math-verify's signal.alarm timeouts raise in non-main threads; there the
  # caller (the pool) must bound the time.
  if (config.signal_timeout_s <= 0
      or threading.current_thread() is not threading.main_thread()):
    return None
  return config.signal_timeout_s


@functools.lru_cache(maxsize=8192)
def _parse_gold(gold: str, timeout: int | None):
  # Imported here: slow to import; only the worker processes that score
  # math items pay for it.
  import math_verify  # pylint: disable=g-import-not-at-top
  return math_verify.parse(_wrap_gold(gold), parsing_timeout=timeout)


def _judge(gold: str, prediction: str, timeout: int | None) -> bool:
  """math-verify's judgement; `prediction` is a LaTeX string to parse."""
  # Imported here: slow to import; only the worker processes that score
  # math items pay for it.
  import math_verify  # pylint: disable=g-import-not-at-top
  return bool(math_verify.verify(
      _parse_gold(gold, timeout),
      math_verify.parse(prediction, parsing_timeout=timeout),
      timeout_seconds=timeout))


# The N rollouts of a prompt mostly repeat a few final answers, so verdicts
# on short (extracted) answers are cached: at most ~16k x 1 kB per worker.
_verdict = functools.lru_cache(maxsize=16384)(_judge)


def verify_math(completion: str, answer: str, *,
                config: RewardsConfig | None = None, **meta) -> float:
  """Scores a math completion against a gold final answer.

  The final answer is, in order: the last match of `math.answer_pattern`
  (when configured), the content of the last `\\boxed{}` / `\\fbox{}`
  (brace-matched), the content of the last `<answer>...</answer>`. With none
  of them the reward is 0, unless `math.allow_unboxed` lets math-verify pick
  the last expression of the text. Reward 1 when the normalized strings are
  equal or math-verify judges the answers equal, else 0.

  Examples (gold -> completion -> reward):
    `\\frac{1}{2}` -> "so x = \\boxed{0.5}." -> 1.0
    `\\left( 3, \\frac{\\pi}{2} \\right)` -> "\\boxed{(3, \\pi/2)}" -> 1.0
    `1,-2` (a set) -> "\\boxed{-2, 1}" -> 1.0;  `\\boxed{1}` -> 0.0
    `5` -> "The answer is 5." (no box) -> 0.0
    `18` -> "#### 18" with answer_pattern r"####\\s*(.+)" -> 1.0

  Args:
    completion: the model's text (decoded completion).
    answer: the gold final answer, LaTeX allowed, without `$` delimiters.
    config: the rewards config (defaults when None).
    **meta: the record's other fields; ignored.

  Returns:
    1.0 or 0.0 (`format.unmet_reward` when a format requirement is unmet).
  """
  del meta
  config = config or _DEFAULT
  options = config.math
  found = formatting.find_answer(completion, config.format,
                                 options.answer_pattern)
  if found is None:
    return config.format.unmet_reward
  text, prediction = found
  timeout = _timeouts(options)
  if prediction is None:
    if options.allow_unboxed and len(text) <= 100 * options.max_answer_chars:
      return float(_judge(answer, text, timeout))
    return 0.0
  if len(prediction) > options.max_answer_chars:
    return 0.0
  if options.string_match and (normalize_answer(prediction)
                               == normalize_answer(answer)):
    return 1.0
  return float(_verdict(answer, _wrap_prediction(prediction), timeout))
