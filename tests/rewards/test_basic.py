"""The numeric, choice and exact verifiers."""

import time

import pytest

from brorl_jax.rewards import registry

from brorl_jax.rewards.basic import (parse_number, verify_choice,
                                     verify_exact, verify_numeric)
from brorl_jax.rewards.config import (ChoiceConfig, ExactConfig,
                                      NumericConfig, RewardsConfig)


@pytest.mark.parametrize("text, value", [
    ("18", 18.0), ("-3", -3.0), ("\u22123", -3.0), ("1,234.5", 1234.5),
    ("0.5", 0.5), (".5", 0.5), ("1.5e-3", 1.5e-3), (r"\frac{1}{2}", 0.5),
    (r"-\dfrac{3}{4}", -0.75), ("3/4", 0.75), (r"1.5 \times 10^{3}", 1500.0),
    (r"\$18.90", 18.9), (r"50\%", 50.0), (r"18 \text{ dollars}", 18.0),
    ("x = 5", 5.0), (r"90^\circ", 90.0), ("1 2", None), ("abc", None),
    (r"\frac{1}{0}", None), ("", None),
])
def test_parse_number(text, value):
  assert parse_number(text) == value


@pytest.mark.parametrize("gold, completion, expected", [
    ("18", "so she makes $18 every day.", 1.0),   # last number
    ("18", "18 eggs, 3 left", 0.0),                # last number is 3
    ("0.5", r"\boxed{\frac{1}{2}}", 1.0),
    ("1234", r"\boxed{1,234}", 1.0),
    ("3", r"\boxed{3.1}", 0.0),
    ("3", r"\boxed{3.0000000001}", 1.0),          # within rel_tol 1e-6
    ("3", "no digits here", 0.0),
    ("-2", "<answer>-2</answer>", 1.0),
    ("1e6", "1000000", 1.0),
])
def test_numeric(gold, completion, expected):
  assert verify_numeric(completion, gold) == expected


def test_numeric_options_and_bad_gold():
  loose = RewardsConfig(numeric=NumericConfig(rel_tol=0.01))
  assert verify_numeric(r"\boxed{3.02}", "3", config=loose) == 1.0
  assert verify_numeric(r"\boxed{3.02}", "3") == 0.0
  strict = RewardsConfig(numeric=NumericConfig(last_number_fallback=False))
  assert verify_numeric("it is 18", "18", config=strict) == 0.0
  with pytest.raises(ValueError, match="'x' is not a number"):
    verify_numeric("1", "x")


@pytest.mark.parametrize("gold, completion, expected", [
    ("C", r"\boxed{C}", 1.0),
    ("(C)", "<answer>(c)</answer>", 1.0),
    ("C", r"\boxed{\text{(C)}}", 1.0),
    ("B", "So the answer is (B).", 1.0),
    ("B", "Answer: **B**", 1.0),
    ("B", r"\boxed{D}", 0.0),
    ("B", "I pick B", 0.0),
    ("B", "The answer is B, no wait, the answer is C.", 0.0),
    ("A", r"\boxed{A) 42}", 1.0),
    ("E", r"\boxed{Everything}", 0.0),
])
def test_choice(gold, completion, expected):
  assert verify_choice(completion, gold) == expected


def test_choice_letters_and_bad_gold():
  ae = RewardsConfig(choice=ChoiceConfig(letters="ABCDE"))
  assert verify_choice(r"\boxed{F}", "A", config=ae) == 0.0
  with pytest.raises(ValueError, match="not one of the letters"):
    verify_choice(r"\boxed{A}", "F", config=ae)


@pytest.mark.parametrize("gold, completion, config, expected", [
    ("Paris", "<answer> Paris </answer>", None, 1.0),
    ("Paris", "paris", None, 0.0),
    ("Paris", "paris", RewardsConfig(exact=ExactConfig(case_sensitive=False)),
     1.0),
    ("a b", "a   b", None, 1.0),
    ("a b", r"reasoning... \boxed{a b}", None, 1.0),
    ("42", "The answer: 42", RewardsConfig(
        exact=ExactConfig(answer_pattern=r"answer:\s*(\S+)")), 1.0),
])
def test_exact(gold, completion, config, expected):
  assert verify_exact(completion, gold, config=config) == expected


# Answers that took the old parser seconds (quadratic backtracking after a
# long digit run; 5.8 s for the first), and 10k digits / 20k characters.
HOSTILE = ["1" * 10_000 + " apples", "1" * 10_000 + "/" + "2" * 10_000,
           "1" * 10_000 + ".5x", "1" * 10_000, "1+" * 10_000,
           "9" * 5_000 + r" \times 10^{5}"]


@pytest.mark.parametrize("answer", HOSTILE, ids=lambda a: a[:3] + a[-3:])
def test_long_answers_are_bounded_for_every_verifier(answer):
  meta = {"countdown": {"numbers": [1, 2, 3], "target": 6}}
  for name in ("numeric", "math", "exact", "choice", "countdown"):
    item = registry.VerifyItem(f"\\boxed{{{answer}}}", "B" if name == "choice"
                               else "69", name, None, meta.get(name, {}))
    start = time.perf_counter()
    assert registry.score(item, RewardsConfig()) == 0.0
    assert time.perf_counter() - start < 1.0, name  # the timeout is 10 s


def test_numeric_length_cap_and_non_finite_gold():
  padded = "0" * 999 + "69"  # 1001 characters
  assert verify_numeric(f"\\boxed{{{padded[2:]}}}", "69") == 1.0
  assert verify_numeric(f"\\boxed{{{padded}}}", "69") == 0.0  # > 1000
  longer = RewardsConfig(numeric=NumericConfig(max_answer_chars=2000))
  assert verify_numeric(f"\\boxed{{{padded}}}", "69", config=longer) == 1.0
  for gold in ("1e999", "9" * 400, "nan", "inf"):
    with pytest.raises(ValueError, match="is not a (finite )?number"):
      verify_numeric(r"\boxed{1e999}", gold)
