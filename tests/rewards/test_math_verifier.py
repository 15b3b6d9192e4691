"""The math verifier: >= 100 answer pairs, the real benchmark golds, options."""

import json
import time

import pytest

from brorl_jax.rewards.config import (FormatConfig, MathConfig,
                                      RewardsConfig)
from brorl_jax.rewards.math_verifier import normalize_answer, verify_math
from tests.conftest import FIXTURES
from tests.rewards.math_cases import CASES

NO_STRING_MATCH = RewardsConfig(math=MathConfig(string_match=False))


def _golds(name):
  path = FIXTURES / "benchmarks" / f"{name}.jsonl"
  return [json.loads(line)["answer"] for line in path.open(encoding="utf-8")]


def test_table_has_at_least_100_pairs_of_both_verdicts():
  assert len(CASES) >= 100
  assert sum(r == 0.0 for _, _, r in CASES) >= 30


@pytest.mark.parametrize("gold, completion, expected", CASES)
def test_answer_pairs(gold, completion, expected):
  assert verify_math(completion, gold) == expected


@pytest.mark.parametrize("name", ["math500", "gsm8k", "aime24", "amc23"])
def test_every_benchmark_gold_scores_one(name):
  golds = _golds(name)
  assert all(verify_math(f"The answer is \\boxed{{{g}}}", g) == 1.0
             for g in golds)


@pytest.mark.parametrize("name, stride", [("math500", 5), ("gsm8k", 1),
                                          ("aime24", 1), ("amc23", 1)])
def test_benchmark_golds_through_math_verify(name, stride):
  """Without the string shortcut: math-verify accepts each gold and
  rejects the gold of the record half a file away (a perturbed answer)."""
  golds = _golds(name)
  n = len(golds)
  for i in range(0, n, stride):
    gold, other = golds[i], golds[(i + n // 2) % n]
    assert verify_math(f"The answer is \\boxed{{{gold}}}.", gold,
                       config=NO_STRING_MATCH) == 1.0, gold
    if normalize_answer(other) != normalize_answer(gold):
      assert verify_math(f"\\boxed{{{other}}}", gold,
                         config=NO_STRING_MATCH) == 0.0, (gold, other)


@pytest.mark.parametrize("name", ["gsm8k", "aime24", "amc23"])
def test_integer_golds_off_by_one_score_zero(name):
  for gold in _golds(name):
    wrong = str(int(gold) + 1)
    assert verify_math(f"The answer is \\boxed{{{wrong}}}", gold) == 0.0


def test_answer_pattern_and_unboxed_options():
  gsm = RewardsConfig(math=MathConfig(answer_pattern=r"####\s*(.+)"))
  assert verify_math("3 + 15 = 18\n#### 18", "18", config=gsm) == 1.0
  assert verify_math("#### 17", "18", config=gsm) == 0.0
  # No pattern match: the last box is still used.
  assert verify_math(r"\boxed{18}", "18", config=gsm) == 1.0
  lenient = RewardsConfig(math=MathConfig(allow_unboxed=True))
  assert verify_math("so the answer is $\\frac{1}{2}$", "0.5") == 0.0
  assert verify_math("so the answer is $\\frac{1}{2}$", "0.5",
                     config=lenient) == 1.0


def test_format_requirements():
  think = RewardsConfig(format=FormatConfig(after_think=True))
  assert verify_math("<think>\\boxed{4}</think>\\boxed{5}", "5",
                     config=think) == 1.0
  assert verify_math("<think>\\boxed{5}</think>\\boxed{4}", "5",
                     config=think) == 0.0
  assert verify_math("<think>\\boxed{5} and the thinking was cut", "5",
                     config=think) == 0.0
  tag = RewardsConfig(format=FormatConfig(require=("answer_tag",),
                                          unmet_reward=-1.0))
  assert verify_math("<answer>\\boxed{5}</answer>", "5", config=tag) == 1.0
  assert verify_math("\\boxed{5}", "5", config=tag) == -1.0


def test_normalize_answer():
  assert normalize_answer(r"\dfrac{1}{2}.") == r"\frac{1}{2}"
  assert normalize_answer(r"90^\circ") == "90"
  assert normalize_answer(r"\text{(C)}") == "(C)"
  assert normalize_answer(r"\left( 3, \frac{\pi}{2} \right)") == (
      r"(3,\frac{\pi}{2})")


def test_hostile_inputs_return_quickly_in_process():
  """Inputs that need no sympy work must not reach it (the pool bounds the
  rest, see test_pool)."""
  start = time.monotonic()
  megabyte = "x" * (1 << 20) + "\\boxed{5}"
  assert verify_math(megabyte, "5") == 1.0
  huge_box = "\\boxed{" + "1" * 5000 + "}"
  assert verify_math(huge_box, "5") == 0.0  # over max_answer_chars
  assert verify_math("bad \udcff\udcfe bytes \\boxed{5}", "5") == 1.0
  assert verify_math("\ud800 \\boxed{\ud800}", "5") == 0.0
  assert time.monotonic() - start < 5.0
