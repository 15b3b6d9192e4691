"""Synthetic verifiable tasks for the CPU demo and tests, and their CLI.

  python -m brorl_jax.data.tasks --task arithmetic --n 10000 --seed 0 \\
      --out FILE.jsonl [--difficulty 1-3]

Each record (one JSONL row, `records.py` format):

  {"prompt": "What is 23 + 7 * 4 - 5?", "answer": "46", "verifier": "math",
   "task": "arithmetic",
   "meta": {"id": "arithmetic-0-17", "difficulty": 2, "operands": 3,
            "digits": 2, "solution": "7 * 4 = 28. 23 + 28 = 51. "
                                     "51 - 5 = 46. \\\\boxed{46}"}}

  {"prompt": "Use 8, 3, 4 to make 20 with + - * /, each number once.",
   "answer": "8 * 3 - 4", "verifier": "countdown", "task": "countdown",
   "meta": {"id": ..., "difficulty": 2, "numbers": [8, 3, 4], "target": 20,
            "solution": "8 * 3 = 24. 24 - 4 = 20. \\\\boxed{8 * 3 - 4}"}}

`meta.solution` is a short worked solution ending in the boxed final answer,
the form the verifiers extract (for the supervised warm start). Arithmetic
answers are integers checked by the `math` verifier. A countdown problem has
many solutions, so `answer` is only one of them; `countdown_score` (register
it as verifier `countdown`) checks any boxed expression against
`meta.numbers` and `meta.target`.

Record i depends only on (task, seed, i, difficulty range): a larger `--n`
extends a set without changing its first records. This module imports only
the standard library, so verifier worker processes can import it cheaply.
"""

from __future__ import annotations

import argparse
import collections
import fractions
import hashlib
import json
import logging
import os
import random
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

# difficulty level -> (operands, max digits per operand)
ARITHMETIC_LEVELS = {1: (2, 1), 2: (3, 1), 3: (3, 2), 4: (4, 2), 5: (5, 2),
                     6: (5, 3)}
# difficulty level -> (numbers, largest number, largest target)
COUNTDOWN_LEVELS = {1: (2, 10, 100), 2: (3, 10, 100), 3: (3, 25, 200),
                    4: (4, 25, 500), 5: (5, 50, 1000)}

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _value_text(v: fractions.Fraction) -> str:
  return str(v.numerator) if v.denominator == 1 else str(v)


def arithmetic(rng: random.Random, level: int) -> dict[str, Any]:
  """One `+ - *` expression problem (multiplication before +/-).

  Args:
    rng: the record's random generator.
    level: difficulty, a key of `ARITHMETIC_LEVELS`.

  Returns:
    The record fields (`prompt`, `answer`, `verifier`, `meta`).
  """
  n_operands, digits = ARITHMETIC_LEVELS[level]
  nums = [rng.randint(0, 10**rng.randint(1, digits) - 1)
          for _ in range(n_operands)]
  ops = [rng.choice("+-*") for _ in range(n_operands - 1)]
  expr = " ".join([str(nums[0])] + [f"{o} {x}" for o, x in zip(ops, nums[1:])])
  steps = []
  # Products first, left to right: collapse each run of `*` into a term.
  terms, signs = [nums[0]], []
  for op, x in zip(ops, nums[1:]):
    if op == "*":
      steps.append(f"{terms[-1]} * {x} = {terms[-1] * x}")
      terms[-1] *= x
    else:
      terms.append(x)
      signs.append(op)
  # Then sums and differences, left to right.
  value = terms[0]
  for op, x in zip(signs, terms[1:]):
    new = value + x if op == "+" else value - x
    steps.append(f"{value} {op} {x} = {new}")
    value = new
  steps.append(f"\\boxed{{{value}}}")
  return {"prompt": f"What is {expr}?", "answer": str(value),
          "verifier": "math",
          "meta": {"difficulty": level, "operands": n_operands,
                   "digits": digits, "solution": ". ".join(steps)}}


def countdown(rng: random.Random, level: int) -> dict[str, Any]:
  """One countdown problem: reach a target using each number exactly once.

  The generator combines the numbers with random operations, keeping every
  intermediate value a positive integer, and takes the result as target.

  Args:
    rng: the record's random generator.
    level: difficulty, a key of `COUNTDOWN_LEVELS`.

  Returns:
    The record fields (`prompt`, `answer`, `verifier`, `meta`).
  """
  count, largest, max_target = COUNTDOWN_LEVELS[level]
  numbers = [rng.randint(1, largest) for _ in range(count)]
  for attempt in range(200):
    # After many rejections fall back to sums, which always qualify.
    ops = "+-*/" if attempt < 199 else "+"
    items = [(fractions.Fraction(x), str(x), 3) for x in numbers]
    steps = []
    while len(items) > 1:
      a, b = rng.sample(range(len(items)), 2)
      (va, ea, pa), (vb, eb, pb) = items[a], items[b]
      op = rng.choice(ops)
      value = {"+": va + vb, "-": va - vb, "*": va * vb,
               "/": va / vb}[op]
      if value <= 0 or value.denominator != 1:
        break
      prec = _PRECEDENCE[op]
      ea = f"({ea})" if pa < prec else ea
      eb = f"({eb})" if pb < prec or (pb == prec and op in "-/") else eb
      steps.append(f"{_value_text(va)} {op} {_value_text(vb)} = "
                   f"{_value_text(value)}")
      items = [it for k, it in enumerate(items) if k not in (a, b)]
      items.append((value, f"{ea} {op} {eb}", prec))
    if len(items) == 1 and items[0][0] <= max_target:
      break
  target = int(items[0][0])
  expression = items[0][1]
  shown = ", ".join(map(str, numbers))
  return {"prompt": f"Use {shown} to make {target} with + - * /, each "
                    "number once.",
          "answer": expression, "verifier": "countdown",
          "meta": {"difficulty": level, "numbers": numbers, "target": target,
                   "solution": ". ".join(steps + [f"\\boxed{{{expression}}}"])}}


TASKS: dict[str, tuple[Callable[[random.Random, int], dict[str, Any]],
                       dict[int, tuple[int, ...]]]] = {
    "arithmetic": (arithmetic, ARITHMETIC_LEVELS),
    "countdown": (countdown, COUNTDOWN_LEVELS),
}


def generate(task: str, n: int, seed: int,
             difficulty: Sequence[int] = (1,)) -> list[dict[str, Any]]:
  """Generates `n` records of a task, deterministically.

  Args:
    task: a key of `TASKS`.
    n: number of records.
    seed: the set's seed.
    difficulty: levels to draw from uniformly, per record.

  Returns:
    JSON-ready rows.
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
  make, levels = TASKS[task]
  bad = [d for d in difficulty if d not in levels]
  if bad or not difficulty:
    raise ValueError(f"difficulty {bad or list(difficulty)} of {task}: "
                     f"levels are {sorted(levels)}")
  rows = []
  for i in range(n):
    # A string seed is hashed with SHA-512: stable across runs and Pythons.
    rng = random.Random(f"{task}/{seed}/{i}")
    level = rng.choice(list(difficulty))
    row = make(rng, level)
    rows.append({"prompt": row["prompt"], "answer": row["answer"],
                 "verifier": row["verifier"], "task": task,
                 "meta": {"id": f"{task}-{seed}-{i}", **row["meta"]}})
  return rows


HELDOUT_BUCKETS = 16  # 1/16 of the problem space is held out


def is_heldout(prompt: str) -> bool:
  """Whether a problem belongs to the held-out part of the problem space.

  The split is by a hash of the problem text, so every difficulty level is
  split alike and training and held-out problems never overlap. Held-out
  sets are drawn distinct (`_take`), so a level with a small problem space
  (arithmetic level 1: 300 problems) is under-represented in them next to
  training, where its problems repeat: mix such a level with larger ones
  only knowing that the two sets' mixes then differ.
  """
  digest = hashlib.sha256(prompt.encode("utf-8")).digest()
  return digest[0] % HELDOUT_BUCKETS == 0


def _take(task: str, n: int, seed: int, difficulty: Sequence[int],
          heldout: bool) -> list[dict[str, Any]]:
  """n problems from one side of the split; held-out ones are distinct.

  A small problem space (difficulty 1 has 300 problems, ~1/16 of them held
  out) may hold fewer distinct held-out problems than asked: then all of
  them are returned, with a warning.
  """
  rows, start, seen = [], 0, set()
  while len(rows) < n:
    batch = generate(task, start + 4 * (n - len(rows)) + 64, seed,
                     difficulty)[start:]
    start += len(batch)
    for r in batch:
      if is_heldout(r["prompt"]) != heldout or (heldout and
                                                 r["prompt"] in seen):
        continue
      seen.add(r["prompt"])
      rows.append(r)
    if start > 200 * n + 10_000:
      if heldout and rows:
        print(f"warning: only {len(rows)} distinct held-out {task} problems "
              f"exist at difficulty {list(difficulty)} ({n} asked)",
              file=sys.stderr)
        break
      raise ValueError(f"cannot find {n} {'held-out' if heldout else 'training'}"
                       f" {task} problems at difficulty {list(difficulty)}")
  return rows[:n]


def materialize(directory: str, *, task: str, train: int, eval: int,  # noqa
                seed: int = 0, difficulty: Sequence[int] = (1,)
                ) -> tuple[str, str | None]:
  """Writes a task's train and held-out JSONL files (once) into `directory`.

  Problems are split by `is_heldout` (a hash of the problem text): held-out
  problems never appear in training and follow the same distribution.

  Returns:
    (train path, eval path or None when `eval` is 0). Existing files with
    the same name are reused: the name encodes every argument.
  """
  levels = "-".join(str(d) for d in difficulty)
  stem = os.path.join(directory, f"{task}_s{seed}_d{levels}")
  paths = (f"{stem}_train{train}.jsonl", f"{stem}_eval{eval}.jsonl")
  result = paths if eval else (paths[0], None)
  if all(os.path.exists(p) for p in result if p):
    return result
  os.makedirs(directory, exist_ok=True)
  sets = [_take(task, train, seed, difficulty, heldout=False)]
  if eval:
    sets.append(_take(task, eval, seed + 1_000_003, difficulty, heldout=True))
  for path, rows in zip(paths, sets):
    mix = collections.Counter(r["meta"]["difficulty"] for r in rows)
    logging.info("%s: %d problems, by difficulty %s", path, len(rows),
                 dict(sorted(mix.items())))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)
  return result


# ---- countdown verifier ------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")
_SYMBOLS = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"),
            ("÷", "/"), ("\\left", ""), ("\\right", ""), ("−", "-"))
_MAX_EXPRESSION = 200


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (braces matched), or None."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  depth, i = 0, start + len("\\boxed")
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i + 1:j]
  return None


class _Parser:
  """Recursive descent over `+ - * / ( )` and non-negative integers."""

  def __init__(self, text: str):
    self.tokens, pos = [], 0
    while pos < len(text.rstrip()):
      m = _TOKEN.match(text, pos)
      if not m:
        raise ValueError(f"unexpected {text[pos:pos + 10]!r}")
      self.tokens.append(int(m.group(1)) if m.group(1) else m.group(2))
      pos = m.end()
    self.pos, self.numbers = 0, []

  def parse(self) -> fractions.Fraction:
    value = self._sum()
    if self.pos != len(self.tokens):
      raise ValueError("trailing tokens")
    return value

  def _peek(self):
    return self.tokens[self.pos] if self.pos < len(self.tokens) else None

  def _sum(self):
    value = self._product()
    while self._peek() in ("+", "-"):
      op = self.tokens[self.pos]
      self.pos += 1
      rhs = self._product()
      value = value + rhs if op == "+" else value - rhs
    return value

  def _product(self):
    value = self._atom()
    while self._peek() in ("*", "/"):
      op = self.tokens[self.pos]
      self.pos += 1
      rhs = self._atom()
      value = value * rhs if op == "*" else value / rhs  # may raise ZeroDiv
    return value

  def _atom(self):
    token = self._peek()
    self.pos += 1
    if isinstance(token, int):
      self.numbers.append(token)
      return fractions.Fraction(token)
    if token == "(":
      value = self._sum()
      if self._peek() != ")":
        raise ValueError("unbalanced parenthesis")
      self.pos += 1
      return value
    raise ValueError(f"unexpected {token!r}")  # unary minus is not allowed


def countdown_score(completion: str, answer: str, *,
                    numbers: Sequence[int], target: int,
                    **meta: Any) -> float:
  """Verifier `countdown`: 1.0 iff the last boxed expression is a solution.

  A solution uses each of `numbers` exactly once (no others, no unary minus,
  no concatenation), only `+ - * /` and parentheses (`\\times`, `\\cdot`,
  `\\div`, `×`, `÷` are read as operators), and evaluates exactly (rational
  arithmetic) to `target`. A trailing `= target` inside the box is allowed.

  Examples (numbers [8, 3, 4], target 20):
    "... \\boxed{8 * 3 - 4}" -> 1.0;  "\\boxed{(8 - 3) * 4}" -> 1.0;
    "\\boxed{8*3-4 = 20}" -> 1.0;  "\\boxed{20}" -> 0.0 (numbers unused);
    "\\boxed{8 * 3 - 4 + 0}" -> 0.0 (0 is not given); no box -> 0.0.

  Args:
    completion: the model's text.
    answer: the reference expression (unused: any solution counts).
    numbers: the given numbers (`meta.numbers`).
    target: the value to reach (`meta.target`).
    **meta: other record metadata, ignored.

  Returns:
    1.0 or 0.0.
  """
  del answer, meta
  boxed = last_boxed(completion)
  if boxed is None or len(boxed) > _MAX_EXPRESSION:
    return 0.0
  for symbol, replacement in _SYMBOLS:
    boxed = boxed.replace(symbol, replacement)
  boxed = boxed.split("=")[0]
  try:
    parser = _Parser(boxed)
    value = parser.parse()
  except (ValueError, ZeroDivisionError, RecursionError):
    return 0.0
  if sorted(parser.numbers) != sorted(int(x) for x in numbers):
    return 0.0
  return 1.0 if value == target else 0.0


# ---- CLI ---------------------------------------------------------------------

def _levels(text: str) -> list[int]:
  lo, _, hi = text.partition("-")
  return list(range(int(lo), int(hi or lo) + 1))


def run(argv: Sequence[str] | None = None) -> None:
  """Entry point of `python -m brorl_jax.data.tasks` / `brorl-tasks`."""
  parser = argparse.ArgumentParser(
      prog="python -m brorl_jax.data.tasks",
      description="Write synthetic verifiable prompts as JSONL records.")
  parser.add_argument("--task", required=True, choices=sorted(TASKS))
  parser.add_argument("--n", type=int, required=True, help="records")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--difficulty", default="1",
                      help="level or range of levels, e.g. 2 or 1-3 "
                           "(arithmetic 1-6, countdown 1-5)")
  parser.add_argument("--out", required=True, help="output .jsonl path")
  args = parser.parse_args(argv)
  try:
    rows = generate(args.task, args.n, args.seed, _levels(args.difficulty))
  except ValueError as e:
    parser.error(str(e))
  with open(args.out, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
  print(f"wrote {len(rows)} {args.task} records to {args.out}",
        file=sys.stderr)


if __name__ == "__main__":
  run()
