"""The `numeric`, `choice` and `exact` verifiers.

Each finds the final answer the same way (`formatting.final_answer`: the
configured pattern, else the last `\\boxed{}`, else the last `<answer>` tag)
and has its own fallback when there is none. A reference that cannot be read
(a numeric gold that is not a number, a choice gold that is not a letter) is
a data error: the verifier raises `ValueError` naming it, and the pool counts
the item as an `error`.
"""

from __future__ import annotations

import math
import re

from brorl_jax.rewards import formatting
from brorl_jax.rewards.config import RewardsConfig

_DEFAULT = RewardsConfig()
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
# No two quantifiers compete for the same digits (the old `\d*\.?\d+` did,
# so a failed match on a long digit run took quadratic time).
_NUMBER = re.compile(
    r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?"
    r"|[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
_FRACTION = re.compile(r"([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_SLASH = re.compile(r"([-+]?[\d.]+)\s*/\s*([\d.]+)")
_SCIENTIFIC = re.compile(
    r"([-+]?[\d.]+)\s*(?:\*|\\times|\\cdot|x)\s*10\^\{?([-+]?\d+)\}?")
# The longest answer text `parse_number` reads (a number, not an essay).
MAX_NUMBER_CHARS = 1000
_NUMBER_NOISE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "\\$", "$",
                 "\\%", "%", "^\\circ", "^{\\circ}")


def parse_number(text: str, max_chars: int = MAX_NUMBER_CHARS
                 ) -> float | None:
  """Reads a number written as a model or a dataset would write it.

  Accepts integers and decimals, thousands separators (`1,234.5`), a sign
  or a Unicode minus, `\\frac{a}{b}` / `\\dfrac`, `a/b`, scientific forms
  (`1.5e-3`, `1.5 \\times 10^{-3}`), and ignores `$`, `\\%`, degrees and
  `\\text{...}` units around a single number (`18 \\text{ dollars}` -> 18).
  Linear in the length of `text`; texts longer than `max_chars` are not read.

  Args:
    text: the answer string.
    max_chars: the longest text read (`numeric.max_answer_chars`).

  Returns:
    The value, or None when the text is not one number (or is too long).
  """
  if len(text) > max_chars:
    return None
  s = _TEXT_WRAPPER.sub(r" \1 ", text.replace("\u2212", "-")).strip()
  for token in _NUMBER_NOISE:
    s = s.replace(token, "")
  s = s.rstrip(".")
  if re.fullmatch(_NUMBER, s):
    try:
      return float(s.replace(",", ""))
    except ValueError:
      return None
  for pattern, combine in ((_FRACTION, lambda a, b: a / b),
                           (_SLASH, lambda a, b: a / b),
                           (_SCIENTIFIC, lambda a, b: a * 10.0 ** b)):
    match = pattern.fullmatch(s)
    if match:
      parts = match.groups()
      sign = -1.0 if parts[0] == "-" else 1.0
      if pattern is _FRACTION:
        numerator, denominator = parse_number(parts[1]), parse_number(parts[2])
      else:
        numerator, denominator = parse_number(parts[0]), parse_number(parts[1])
        sign = 1.0
      if numerator is None or denominator is None:
        return None
      try:
        return sign * combine(numerator, denominator)
      except (ZeroDivisionError, OverflowError):
        return None
  # A lone number with words around it: "x = 5", "18 dollars".
  found = _NUMBER.findall(s)
  if len(found) == 1 and not re.search(r"[\\^_{}/]", s):
    return float(found[0].replace(",", ""))
  return None


def verify_numeric(completion: str, answer: str, *,
                   config: RewardsConfig | None = None, **meta) -> float:
  """Scores a numeric answer with relative/absolute tolerance.

  The final answer is the configured pattern, the last box or the last
  `<answer>` tag; with none, the last number in the text when
  `numeric.last_number_fallback` (GSM8K style). Equal within
  `math.isclose(pred, gold, rel_tol, abs_tol)` scores 1.

  Examples (gold -> completion -> reward):
    `18` -> "... so she makes $18 every day." -> 1.0 (last number)
    `0.5` -> "\\boxed{\\frac{1}{2}}" -> 1.0;  `1234` -> "\\boxed{1,234}" -> 1.0
    `3` -> "\\boxed{3.1}" -> 0.0;  `3` -> "no digits here" -> 0.0

  Args:
    completion: the model's text.
    answer: the gold number (any form `parse_number` reads).
    config: the rewards config (defaults when None).
    **meta: the record's other fields; ignored.

  Returns:
    1.0 or 0.0 (`format.unmet_reward` when a format requirement is unmet).

  Raises:
    ValueError: the gold is not a number.
  """
  del meta
  config = config or _DEFAULT
  gold = parse_number(str(answer), max_chars=len(str(answer)))
  if gold is None or not math.isfinite(gold):
    raise ValueError(f"numeric verifier: reference answer {answer!r:.80} is "
                     f"not a {'number' if gold is None else 'finite number'}; "
                     "use the 'math' or 'exact' verifier for it")
  options = config.numeric
  found = formatting.find_answer(completion, config.format,
                                 options.answer_pattern)
  if found is None:
    return config.format.unmet_reward
  text, candidate = found
  if candidate is None and options.last_number_fallback:
    found = _NUMBER.findall(text)
    candidate = found[-1] if found else None
  value = (parse_number(candidate, options.max_answer_chars)
           if candidate is not None else None)
  if value is None or not math.isfinite(value):
    return 0.0
  return float(math.isclose(value, gold, rel_tol=options.rel_tol,
                            abs_tol=options.abs_tol))


def _letter(text: str, letters: str) -> str | None:
  """`C`, `(c)`, `C.`, `\\text{(C)}`, `**C**`, `C) 42` -> "C"; else None."""
  s = _TEXT_WRAPPER.sub(r"\1", text).replace("*", "").strip()
  match = re.fullmatch(r"\(?([A-Za-z])\)?(?:[.:)]\s*.*|\s+.*)?", s, re.DOTALL)
  if match and match.group(1).upper() in letters:
    return match.group(1).upper()
  return None


def verify_choice(completion: str, answer: str, *,
                  config: RewardsConfig | None = None, **meta) -> float:
  """Scores a multiple-choice answer given as a letter (A-E style).

  The final answer is the configured pattern, the last box or the last
  `<answer>` tag (any case, with parentheses or `\\text{}`); with none, the
  last "answer is X" / "answer: (X)" / "option X" phrase (upper case).

  Examples (gold -> completion -> reward):
    `C` -> "\\boxed{C}" -> 1.0;  `(C)` -> "<answer>(c)</answer>" -> 1.0
    `B` -> "So the answer is (B)." -> 1.0;  `B` -> "\\boxed{D}" -> 0.0
    `B` -> "I pick B" -> 0.0 (no box, tag or "answer is")

  Args:
    completion: the model's text.
    answer: the gold letter, e.g. "C" or "(C)".
    config: the rewards config (defaults when None).
    **meta: the record's other fields; ignored.

  Returns:
    1.0 or 0.0 (`format.unmet_reward` when a format requirement is unmet).

  Raises:
    ValueError: the gold is not one of `choice.letters`.
  """
  del meta
  config = config or _DEFAULT
  letters = config.choice.letters
  gold = _letter(str(answer), letters)
  if gold is None:
    raise ValueError(f"choice verifier: reference answer {answer!r} is not "
                     f"one of the letters {letters!r}")
  found = formatting.find_answer(completion, config.format,
                                 config.choice.answer_pattern)
  if found is None:
    return config.format.unmet_reward
  text, candidate = found
  if candidate is not None:
    return float(_letter(candidate, letters) == gold)
  phrases = re.findall(
      r"(?i:answer|option|choice)\s*(?:(?i:is)|:|=)?\s*[:\-]?\s*\**\(?"
      rf"([{letters}])\)?\**(?![A-Za-z])", text)
  return float(bool(phrases) and phrases[-1] == gold)


def _normalize_exact(text: str, case_sensitive: bool) -> str:
  text = " ".join(text.split())
  return text if case_sensitive else text.casefold()


def verify_exact(completion: str, answer: str, *,
                 config: RewardsConfig | None = None, **meta) -> float:
  """Scores an exact string answer (whitespace-collapsed comparison).

  The final answer is the configured pattern, the last box or the last
  `<answer>` tag; with none, the whole scored text. Nothing is numeric
  here: `69` and `69.0` differ (the data readers read a JSON *number*
  answer in its shortest form, `69.0` -> "69"; use `numeric` for values).

  Examples (gold -> completion -> reward):
    `Paris` -> "<answer> Paris </answer>" -> 1.0;  `Paris` -> "paris" -> 0.0
    (1.0 with `exact.case_sensitive=False`);  `a b` -> "a   b" -> 1.0

  Args:
    completion: the model's text.
    answer: the gold string.
    config: the rewards config (defaults when None).
    **meta: the record's other fields; ignored.

  Returns:
    1.0 or 0.0 (`format.unmet_reward` when a format requirement is unmet).
  """
  del meta
  config = config or _DEFAULT
  options = config.exact
  found = formatting.find_answer(completion, config.format,
                                 options.answer_pattern)
  if found is None:
    return config.format.unmet_reward
  text, candidate = found
  if candidate is None:
    candidate = text
  return float(_normalize_exact(candidate, options.case_sensitive)
               == _normalize_exact(str(answer), options.case_sensitive))
