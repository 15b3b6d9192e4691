"""Final-answer extraction and format requirements."""

import pytest

from brorl_jax.rewards import formatting
from brorl_jax.rewards.config import FormatConfig


@pytest.mark.parametrize("text, expected", [
    (r"\boxed{5}", "5"),
    (r"a \boxed{\frac{1}{2}} b", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\fbox{7}", "7"),
    (r"\boxed{6} then \fbox{7}", "7"),
    (r"$\boxed 5$", "5"),
    (r"\boxed{{a}{b}}", "{a}{b}"),
    (r"\boxed{}", ""),
    (r"\boxed{5", None),          # unclosed
    (r"\boxed{1} \boxed{2", None),  # the last box is cut off
    ("no box", None),
])
def test_last_boxed(text, expected):
  assert formatting.last_boxed(text) == expected


def test_last_boxed_is_linear_on_a_deep_box():
  text = "\\boxed{" + "{" * 100_000 + "}" * 100_000 + "}"
  assert len(formatting.last_boxed(text)) == 200_000


def test_tags_think_and_pattern():
  assert formatting.last_tag("<answer> 4 </answer> x <answer>5</answer>") == "5"
  assert formatting.last_tag("<answer>5") is None
  assert formatting.after_think("a</think>b</think> c") == " c"
  assert formatting.after_think("still thinking") is None
  assert formatting.last_match("#### 12\n#### 13", r"####\s*(\d+)") == "13"
  assert formatting.last_match("x", None) is None
  assert formatting.final_answer(r"\boxed{1} <answer>2</answer>") == "1"
  assert formatting.final_answer("<answer>2</answer>") == "2"
  assert formatting.final_answer("#### 3 \\boxed{1}", r"####\s*(\d+)") == "3"


@pytest.mark.parametrize("config, text, expected", [
    (FormatConfig(), "anything", "anything"),
    (FormatConfig(after_think=True), "<think>r</think>ans", "ans"),
    (FormatConfig(after_think=True), "<think>cut off", None),
    (FormatConfig(require=("answer_tag",)), "<answer>1</answer>",
     "<answer>1</answer>"),
    (FormatConfig(require=("answer_tag",)), r"\boxed{1}", None),
    (FormatConfig(require=("boxed",)), r"\boxed{1}", r"\boxed{1}"),
    (FormatConfig(require=("boxed",)), "1", None),
    # The box must be after </think> when both are required.
    (FormatConfig(require=("boxed",), after_think=True),
     r"<think>\boxed{1}</think> 1", None),
])
def test_apply_format(config, text, expected):
  assert formatting.apply_format(text, config) == expected
