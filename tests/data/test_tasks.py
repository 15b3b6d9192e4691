"""Synthetic tasks: determinism, correct answers and solutions, the CLI."""

import fractions
import json
import operator
import re
import subprocess
import sys

import pytest

from brorl_jax.data import records
from brorl_jax.data import tasks
from brorl_jax.data import tokenizer as tokenizer_lib

STEP = re.compile(r"^(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)$")


def _check_steps(solution):
  """Every `a op b = c` step is right; returns the boxed final answer."""
  *steps, final = solution.split(". ")
  for step in steps:
    a, op, b, c = STEP.match(step).groups()
    a, b = fractions.Fraction(a), fractions.Fraction(b)
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul,
           "/": operator.truediv}
    assert ops[op](a, b) == int(c), step
  assert final.startswith("\\boxed{") and final.endswith("}")
  return final[len("\\boxed{"):-1]


def test_deterministic_and_prefix_stable():
  for task in tasks.TASKS:
    first = tasks.generate(task, 20, seed=3, difficulty=(1, 2))
    assert tasks.generate(task, 5, seed=3, difficulty=(1, 2)) == first[:5]
    assert tasks.generate(task, 20, seed=4, difficulty=(1, 2)) != first
    assert len({r["meta"]["id"] for r in first}) == 20


@pytest.mark.parametrize("level", sorted(tasks.ARITHMETIC_LEVELS))
def test_arithmetic(level):
  operands, digits = tasks.ARITHMETIC_LEVELS[level]
  for row in tasks.generate("arithmetic", 200, seed=0, difficulty=[level]):
    expression = row["prompt"].removeprefix("What is ").removesuffix("?")
    numbers = [int(x) for x in re.findall(r"\d+", expression)]
    assert len(numbers) == operands and max(numbers) < 10**digits
    assert set(re.findall(r"[^\d\s]", expression)) <= set("+-*")
    assert int(row["answer"]) == eval(expression)  # pylint: disable=eval-used
    assert _check_steps(row["meta"]["solution"]) == row["answer"]
    assert (row["verifier"], row["task"]) == ("math", "arithmetic")
    assert row["meta"]["difficulty"] == level


@pytest.mark.parametrize("level", sorted(tasks.COUNTDOWN_LEVELS))
def test_countdown(level):
  count, largest, max_target = tasks.COUNTDOWN_LEVELS[level]
  for row in tasks.generate("countdown", 200, seed=0, difficulty=[level]):
    meta = row["meta"]
    assert len(meta["numbers"]) == count and max(meta["numbers"]) <= largest
    assert 1 <= meta["target"] <= max_target
    assert _check_steps(meta["solution"]) == row["answer"]
    assert tasks.countdown_score(meta["solution"], row["answer"], **meta) == 1
    assert row["prompt"].startswith(
        "Use " + ", ".join(map(str, meta["numbers"])))


SCORES = [  # (completion, numbers 8 3 4 -> target 20 unless stated, score)
    ("so \\boxed{8 * 3 - 4}", 1.0),
    ("\\boxed{(8 - 3) * 4}", 1.0),  # another solution
    ("\\boxed{8*3-4 = 20}", 1.0),
    ("\\boxed{8 \\times 3 - 4}", 1.0),
    ("\\boxed{4 * (8 - 3)}. Check: \\boxed{8 * 3 - 4}", 1.0),  # last box
    ("\\boxed{\\left(8 - 3\\right) \\cdot 4}", 1.0),
    ("\\boxed{8 * 3 + 4}", 0.0),  # 28
    ("\\boxed{20}", 0.0),  # numbers unused
    ("\\boxed{8 * 3 - 4 + 0}", 0.0),  # 0 not given
    ("\\boxed{8 * 3 - 4 - 4 + 4}", 0.0),  # 4 used three times
    ("\\boxed{(8 - 3) * 4 / (4 - 4)}", 0.0),  # division by zero
    ("\\boxed{-4 + 8 * 3}", 0.0),  # unary minus
    ("\\boxed{83 - 4}", 0.0),  # concatenation
    ("\\boxed{8.0 * 3 - 4}", 0.0),
    ("\\boxed{8 * 3 - 4", 0.0),  # unclosed box
    ("8 * 3 - 4", 0.0),  # no box
    ("\\boxed{" + "(" * 100 + "8 * 3 - 4" + ")" * 100 + "}", 0.0),  # long
]


@pytest.mark.parametrize("completion,score", SCORES)
def test_countdown_score(completion, score):
  assert tasks.countdown_score(completion, "8 * 3 - 4", numbers=[8, 3, 4],
                               target=20, difficulty=2, solution="") == score


def test_countdown_score_fractions():
  # Exact rational arithmetic: (1 + 1/3) * 3 = 4.
  assert tasks.countdown_score("\\boxed{(1 + 1 / 3) * 3}", "",
                               numbers=[3, 1, 3, 1], target=4) == 1.0


def test_last_boxed_nested():
  assert tasks.last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
  assert tasks.last_boxed("none") is None


def test_prompts_fit_a_small_demo_vocab(qwen2_tokenizer):
  rows = (tasks.generate("arithmetic", 300, 1, range(1, 7))
          + tasks.generate("countdown", 300, 1, range(1, 6)))
  qwen = max(len(qwen2_tokenizer.encode(r["prompt"])) for r in rows)
  assert qwen <= 40
  tok = tokenizer_lib.train_sentencepiece(
      [r["prompt"] + "\n" + r["meta"]["solution"] for r in rows], 400)
  longest = max(len(tok.encode(tok.apply_chat_template(
      [{"role": "user", "content": r["prompt"]}]))) for r in rows)
  assert longest <= 64


def test_cli(tmp_path):
  out = tmp_path / "c.jsonl"
  tasks.run(["--task", "countdown", "--n", "25", "--seed", "2",
             "--difficulty", "1-3", "--out", str(out)])
  result = records.read_records(out)
  assert len(result.records) == 25
  assert {r.meta["difficulty"] for r in result.records} == {1, 2, 3}
  assert {(r.task, r.verifier) for r in result.records} == {("countdown",
                                                             "countdown")}
  assert [json.loads(x) for x in out.read_text().splitlines()] == (
      tasks.generate("countdown", 25, 2, [1, 2, 3]))
  with pytest.raises(SystemExit):
    tasks.run(["--task", "arithmetic", "--n", "1", "--difficulty", "9",
               "--out", str(out)])


def test_module_entry_point_imports_stdlib_only(tmp_path):
  out = tmp_path / "a.jsonl"
  subprocess.run([sys.executable, "-m", "brorl_jax.data.tasks", "--task",
                  "arithmetic", "--n", "3", "--seed", "0", "--out", str(out)],
                 check=True, capture_output=True)
  assert len(out.read_text().splitlines()) == 3
  code = ("import sys, brorl_jax.data.tasks; "
          "print(sorted({'jax', 'grain', 'numpy'} & set(sys.modules)))")
  loaded = subprocess.run([sys.executable, "-c", code], check=True,
                          capture_output=True, text=True).stdout.strip()
  assert loaded == "[]"
