"""The code verifier: program extraction, test forms, partial credit."""

import json

import pytest

from brorl_jax.rewards import code_verifier
from brorl_jax.rewards.code_verifier import (extract_program, parse_tests,
                                             stdout_matches, value_matches,
                                             verify_code)
from brorl_jax.rewards.config import FormatConfig, RewardsConfig
from tests.rewards.sandbox_marks import needs_sandbox

ADD_TESTS = {"inputs": ["1 2\n", "3 4\n", "10 -5\n", "0 0\n"],
             "outputs": ["3\n", "7", "5\n\n", "0"]}


def _fenced(source, tag="python"):
  return f"Here is my solution.\n```{tag}\n{source}\n```\nDone."


def test_extract_program_takes_the_last_python_or_untagged_block():
  text = "```python\nA\n```\ntext\n```\nB\n```"
  assert extract_program(text) == "B\n"
  assert extract_program("```py\nC\n```") == "C\n"
  assert extract_program("```Python3\nD\n```") == "D\n"
  assert extract_program("```cpp\nint main(){}\n```") is None
  assert extract_program("no code") is None


def test_parse_tests_forms():
  inputs, outputs, fn = parse_tests(json.dumps(ADD_TESTS))
  assert inputs == ADD_TESTS["inputs"] and fn is None
  inputs, outputs, fn = parse_tests(
      {"fn_name": "f", "inputs": ["[1, 2]", [3]], "outputs": [3, [3]]})
  assert inputs == [[1, 2], [3]] and fn == "f"
  assert parse_tests({"inputs": [[1]], "outputs": [1]}, fn_name="g")[2] == "g"
  for bad, message in [(None, "needs `tests`"), ("{", "not valid JSON"),
                       ({"inputs": ["1"], "outputs": []}, "1 inputs vs 0"),
                       ({"inputs": [[1]], "outputs": [1]}, "string inputs")]:
    with pytest.raises(ValueError, match=message):
      parse_tests(bad)


def test_comparisons():
  assert stdout_matches("3 \n 4\n\n", "3\n4")
  assert not stdout_matches("3\n4", "3 4")
  assert stdout_matches("a\nb\n", ["a", "b"])
  assert value_matches("[1, 2]", [1, 2])
  assert value_matches("3", [3])            # APPS wraps outputs in a list
  assert value_matches("0.30000000000000004", 0.3)
  assert value_matches("[1, 2]", "[1, 2]")
  assert not value_matches("[2, 1]", [1, 2])
  assert not value_matches("not json", 1)


@needs_sandbox
@pytest.mark.parametrize("source, expected", [
    ("a, b = map(int, input().split())\nprint(a + b)", 1.0),
    ("a, b = map(int, input().split())\nprint(a * b)", 0.25),  # 0*0 == 0+0
    ("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)", 0.75),
    ("import sys\nsys.exit(0)", 0.0),
    ("raise ValueError('no')", 0.0),
    ("def broken(:\n  pass", 0.0),
])
def test_stdin_tests_score_the_share_passed(source, expected):
  assert verify_code(_fenced(source), tests=ADD_TESTS) == expected


@needs_sandbox
def test_call_based_tests():
  tests = {"fn_name": "two_sum",
           "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6], [[3, 3], 6]],
           "outputs": [[0, 1], [1, 2], [[0, 1]]]}
  solution = ("class Solution:\n  def two_sum(self, nums, target):\n"
              "    seen = {}\n    for i, x in enumerate(nums):\n"
              "      if target - x in seen:\n"
              "        return [seen[target - x], i]\n      seen[x] = i\n")
  assert verify_code(_fenced(solution), tests=tests) == 1.0
  wrong_on_one = ("def two_sum(nums, target):\n"
                  "  return [0, 1] if nums[0] != 3 else [1, 0]\n")
  assert verify_code(_fenced(wrong_on_one), tests=tests) == pytest.approx(1 / 3)
  # fn_name may come from the record's meta instead of the tests.
  meta_tests = {"inputs": [[1, 2]], "outputs": [3]}
  assert verify_code(_fenced("def add(a, b):\n  return a + b"),
                     tests=meta_tests, fn_name="add") == 1.0


@needs_sandbox
def test_no_program_and_format():
  assert verify_code("print(1)", tests=ADD_TESTS) == 0.0
  think = RewardsConfig(format=FormatConfig(after_think=True))
  good = _fenced("a, b = map(int, input().split())\nprint(a + b)")
  assert verify_code(f"<think>{good}</think>", tests=ADD_TESTS,
                     config=think) == 0.0
  assert verify_code(f"<think>x</think>{good}", tests=ADD_TESTS,
                     config=think) == 1.0
  with pytest.raises(ValueError):
    verify_code("<think>", tests=None, config=think)


@needs_sandbox
def test_run_tests_reports_statuses():
  passed, runs = code_verifier.run_tests(
      _fenced("x = input()\nprint(x)\nif x == 'boom':\n  raise SystemExit(3)"),
      {"inputs": ["hi", "boom"], "outputs": ["hi", "boom"]})
  assert passed == [True, False]
  assert [r.status for r in runs] == ["ok", "error"]
