"""Finding the final answer in a completion, and format requirements.

Shared by every verifier: the text after `</think>`, the last `\\boxed{}`
(brace-matched, as the Hendrycks MATH grader does), the last `<answer>` tag,
the last match of a configured regex, and the check of `rewards.format`.
"""

from __future__ import annotations

import re

from brorl_jax.rewards.config import FormatConfig

THINK_END = "</think>"
_BOX_OPENERS = ("\\boxed", "\\fbox")


def after_think(text: str) -> str | None:
  """The text after the last `</think>`, or None when there is none."""
  index = text.rfind(THINK_END)
  return None if index < 0 else text[index + len(THINK_END):]


def last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` or `\\fbox{...}` in `text`.

  Braces are matched, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`. The
  brace-less form `\\boxed 5` gives `5`. An unclosed box gives None.

  Args:
    text: the completion (or the part of it being scored).

  Returns:
    The content, or None when there is no complete box.
  """
  start = max(text.rfind(opener) for opener in _BOX_OPENERS)
  if start < 0:
    return None
  opener = next(o for o in _BOX_OPENERS if text.startswith(o, start))
  i = start + len(opener)
  if text.startswith(" ", i) and not text.startswith("{", i):
    # `\boxed 5$`: the answer runs to the next `$` or whitespace.
    match = re.match(r"\s+([^\s$]+)", text[i:])
    return match.group(1) if match else None
  if not text.startswith("{", i):
    return None
  depth = 0
  for j in range(i, len(text)):
    char = text[j]
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return text[i + 1:j]
  return None


def last_tag(text: str, tag: str = "answer") -> str | None:
  """The stripped content of the last `<tag>...</tag>` pair, or None."""
  close = text.rfind(f"</{tag}>")
  if close < 0:
    return None
  open_ = text.rfind(f"<{tag}>", 0, close)
  if open_ < 0:
    return None
  return text[open_ + len(tag) + 2:close].strip()


def last_match(text: str, pattern: str | None) -> str | None:
  """The last match of `pattern` in `text`: group 1 if it has groups."""
  if pattern is None:
    return None
  last = None
  for last in re.finditer(pattern, text, flags=re.MULTILINE):
    pass
  if last is None:
    return None
  return (last.group(1) if last.re.groups else last.group(0)).strip()


def final_answer(text: str, pattern: str | None = None) -> str | None:
  """The final answer: pattern match, else last box, else `<answer>` tag.

  Args:
    text: the scored text.
    pattern: the configured answer regex, or None.

  Returns:
    The answer string, or None when the text has none of the three.
  """
  for found in (last_match(text, pattern), last_boxed(text),
                last_tag(text)):
    if found is not None:
      return found
  return None


def find_answer(completion: str, config: FormatConfig, pattern: str | None
                ) -> tuple[str, str | None] | None:
  """The answer verifiers' first steps: `apply_format`, then `final_answer`.

  Args:
    completion: the model's completion.
    config: the format requirements.
    pattern: the verifier's configured answer regex, or None.

  Returns:
    (the text to score, its final answer or None), or None when a format
    requirement is unmet; the verifier then returns `config.unmet_reward`.
  """
  text = apply_format(completion, config)
  if text is None:
    return None
  return text, final_answer(text, pattern)


def apply_format(completion: str, config: FormatConfig) -> str | None:
  """Checks `rewards.format` and returns the text a verifier should score.

  Args:
    completion: the model's completion.
    config: the format requirements.

  Returns:
    The text to score (the part after `</think>` when `after_think`), or
    None when a requirement is unmet; the verifier then returns
    `config.unmet_reward`.
  """
  text = completion
  if config.after_think:
    text = after_think(completion)
    if text is None:
      return None
  for requirement in config.require:
    if requirement == "answer_tag" and last_tag(text) is None:
      return None
    if requirement == "boxed" and last_boxed(text) is None:
      return None
  return text
