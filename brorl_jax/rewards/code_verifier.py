"""The `code` verifier: the last fenced Python block, run against tests.

Tests follow APPS / PRIME: `{"inputs": [...], "outputs": [...]}`, optionally
with `"fn_name"`, given as a dict or as its JSON string.

* stdin form (no `fn_name`): each input is fed to the program's stdin; its
  stdout matches when the stripped lines equal the expected output's
  stripped lines.
* call-based form (`fn_name`, from the tests or the record's meta): the
  program defines `fn_name` (a function, or a method of `class Solution`);
  each input is a JSON list of arguments (a JSON string of one is accepted),
  each output the JSON value returned (APPS' `[value]` wrapping accepted).

The program runs only inside the sandbox (`sandbox.py`); the reward is the
share of tests passed within `rewards.code.time_budget_s` (5 s as in ProRL).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from brorl_jax.rewards import formatting, sandbox
from brorl_jax.rewards.config import RewardsConfig

_DEFAULT = RewardsConfig()
_FENCE = re.compile(r"```[ \t]*(?i:python3?|py)?[ \t]*\n(.*?)```",
                    re.DOTALL)


def extract_program(text: str) -> str | None:
  """The last fenced block tagged python/py (or untagged), or None."""
  blocks = _FENCE.findall(text)
  return blocks[-1] if blocks else None


def parse_tests(tests: Any, fn_name: str | None = None
                ) -> tuple[list[Any], list[Any], str | None]:
  """Reads a record's tests into (inputs, outputs, fn_name).

  Args:
    tests: `{"inputs": [...], "outputs": [...], "fn_name"?: str}` or its
      JSON string.
    fn_name: a call-based function name from the record's meta, if any.

  Returns:
    The inputs, the expected outputs and the function name (None: stdin).

  Raises:
    ValueError: the tests are missing or malformed (names what is wrong).
  """
  if isinstance(tests, str):
    try:
      tests = json.loads(tests)
    except json.JSONDecodeError as e:
      raise ValueError(f"code verifier: tests are not valid JSON: {e}") from e
  if not isinstance(tests, dict):
    raise ValueError("code verifier: the record needs `tests` = {'inputs': "
                     "[...], 'outputs': [...]}, got "
                     f"{type(tests).__name__}")
  inputs, outputs = tests.get("inputs"), tests.get("outputs")
  if not isinstance(inputs, list) or not isinstance(outputs, list):
    raise ValueError("code verifier: tests need lists 'inputs' and 'outputs'")
  if len(inputs) != len(outputs) or not inputs:
    raise ValueError(f"code verifier: {len(inputs)} inputs vs {len(outputs)} "
                     "outputs; need the same number, at least one")
  fn_name = tests.get("fn_name") or fn_name
  if fn_name is None and not all(isinstance(x, str) for x in inputs):
    raise ValueError("code verifier: stdin tests need string inputs (or give "
                     "fn_name for call-based tests)")
  if fn_name is not None:
    inputs = [json.loads(x) if isinstance(x, str) else x for x in inputs]
  return inputs, outputs, fn_name


def _lines(text: str) -> list[str]:
  return [line.strip() for line in text.strip().splitlines()]


def stdout_matches(actual: str, expected: Any) -> bool:
  """Line-by-line comparison after stripping (APPS/PRIME style)."""
  if isinstance(expected, list):
    expected = "\n".join(map(str, expected))
  return _lines(actual) == _lines(str(expected))


def _equal(actual: Any, expected: Any) -> bool:
  if isinstance(actual, float) or isinstance(expected, float):
    try:
      return math.isclose(float(actual), float(expected), rel_tol=1e-9,
                          abs_tol=1e-9)
    except (TypeError, ValueError):
      return False
  if isinstance(actual, list) and isinstance(expected, list):
    return len(actual) == len(expected) and all(
        _equal(a, e) for a, e in zip(actual, expected))
  return actual == expected


def value_matches(actual_json: str, expected: Any) -> bool:
  """Call-based comparison: equal values (APPS' `[value]` form accepted)."""
  try:
    actual = json.loads(actual_json)
  except (json.JSONDecodeError, ValueError):
    return False
  if isinstance(expected, str):
    try:
      expected = json.loads(expected)
    except json.JSONDecodeError:
      pass
  if _equal(actual, expected):
    return True
  return (isinstance(expected, list) and len(expected) == 1
          and _equal(actual, expected[0]))


def run_tests(completion: str, tests: Any, *,
              config: RewardsConfig | None = None,
              fn_name: str | None = None) -> tuple[list[bool], list[Any]]:
  """Runs the completion's program on the tests in the sandbox.

  Args:
    completion: the model's text.
    tests: the record's tests (see `parse_tests`).
    config: the rewards config (defaults when None).
    fn_name: call-based function name from the record's meta.

  Returns:
    (passed per test, the sandbox's `TestRun` per test); both empty when
    the completion has no program or misses a format requirement.
  """
  config = config or _DEFAULT
  inputs, outputs, fn_name = parse_tests(tests, fn_name)
  text = formatting.apply_format(completion, config.format)
  program = extract_program(text) if text is not None else None
  if program is None:
    return [], []
  runs = sandbox.run_program(program, inputs,
                             mode="call" if fn_name else "stdin",
                             fn_name=fn_name, config=config.code)
  passed = []
  for run, expected in zip(runs, outputs):
    if run.status != "ok":
      passed.append(False)
    elif fn_name:
      passed.append(value_matches(run.value, expected))
    else:
      passed.append(stdout_matches(run.stdout, expected))
  return passed, runs


def verify_code(completion: str, answer: str = "", *,
                config: RewardsConfig | None = None, tests: Any = None,
                fn_name: str | None = None, **meta) -> float:
  """Scores a code completion: the share of tests its program passes.

  The program is the last fenced block of the completion (```python ... ```,
  ```py, or an untagged ``` block). It runs only inside the sandbox; where
  no sandbox works this raises `SandboxUnavailable`, which says how to
  enable one.

  Examples (tests -> completion -> reward):
    {"inputs": ["1 2\\n", "3 4\\n"], "outputs": ["3", "7"]} ->
      "```python\\na, b = map(int, input().split())\\nprint(a + b)\\n```"
      -> 1.0;  the same printing `a * b` -> 0.0 (2 != 3, 12 != 7);
      printing `a + b if a == 1 else 0` -> 0.5
    {"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]} ->
      "```python\\ndef add(a, b):\\n  return a + b\\n```" -> 1.0
    any tests -> a completion without a fenced block -> 0.0

  Args:
    completion: the model's text.
    answer: unused (code records carry `tests`); kept for the common form.
    config: the rewards config (defaults when None).
    tests: the record's tests, see `parse_tests`.
    fn_name: call-based function name (overridden by `tests["fn_name"]`).
    **meta: the record's other fields; ignored.

  Returns:
    The share of tests passed, in [0, 1] (`format.unmet_reward` when a
    format requirement is unmet).

  Raises:
    ValueError: the tests are malformed.
    SandboxUnavailable: no isolation and `code.allow_unsandboxed` is off.
  """
  del answer, meta
  config = config or _DEFAULT
  if formatting.apply_format(completion, config.format) is None:
    parse_tests(tests, fn_name)  # bad tests are an error, not a format miss
    return config.format.unmet_reward
  passed, _ = run_tests(completion, tests, config=config, fn_name=fn_name)
  if not passed:
    return 0.0
  return sum(passed) / len(passed)
