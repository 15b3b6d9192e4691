"""The offline scoring CLI: python -m brorl_jax.rewards."""

import json
import os
import subprocess
import sys

import pytest

from brorl_jax.rewards import __main__ as cli
from tests.rewards.sandbox_marks import needs_sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
LINES = [
    {"completion": "so \\boxed{\\frac{1}{2}}", "answer": "0.5",
     "verifier": "math", "meta": {"id": "a"}},
    {"completion": "\\boxed{3}", "answer": "0.5", "verifier": "math"},
    {"completion": "it is 18", "answer": 18, "verifier": "numeric"},
    {"completion": "```python\nprint(int(input()) + 1)\n```",
     "verifier": "code",
     "tests": {"inputs": ["1", "2"], "outputs": ["2", "4"]}},
    {"completion": "1", "answer": "x", "verifier": "numeric"},
]


def _write(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else
              json.dumps(line).encode() + b"\n")


@needs_sandbox
def test_scores_a_file_end_to_end(tmp_path):
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write(src, LINES + [b"\n"])
  out = subprocess.run(
      [sys.executable, "-m", "brorl_jax.rewards", "--input", str(src),
       "--output", str(dst), "--workers", "2", "--timeout", "20"],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode == 0, out.stderr
  scored = [json.loads(line) for line in dst.read_text().splitlines()]
  assert [s["reward"] for s in scored] == [1.0, 0.0, 1.0, 0.5, 0.0]
  assert [s["status"] for s in scored] == ["ok"] * 4 + ["error"]
  assert "'x' is not a number" in scored[4]["error"]
  assert scored[0]["meta"] == {"id": "a"}  # input fields are kept
  assert scored[2]["answer"] == "18"
  assert all(s["seconds"] >= 0 for s in scored)
  assert "math" in out.stdout and "5 scored, 0 timeouts, 1 errors" in out.stdout


@needs_sandbox
@pytest.mark.parametrize("timeout, budget, sleeper_reward", [
    ("2", "1", 0.0), ("5", "4", 1.0)])
def test_timeout_flag_derives_the_code_budget(tmp_path, capsys, timeout,
                                              budget, sleeper_reward):
  # A program that sleeps 1.2 s fails its test inside a 1 s budget and
  # passes inside 4 s; either way the verifier, not the pool, decides.
  sleeper = {"completion": "```python\nimport time\ntime.sleep(1.2)\n"
                           "print(int(input()) + 1)\n```",
             "verifier": "code", "tests": {"inputs": ["1"], "outputs": ["2"]}}
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write(src, [LINES[3], sleeper])
  assert cli.main(["--input", str(src), "--output", str(dst), "--workers",
                   "1", "--timeout", timeout]) == 0
  scored = [json.loads(line) for line in dst.read_text().splitlines()]
  assert [s["reward"] for s in scored] == [0.5, sleeper_reward]
  assert [s["status"] for s in scored] == ["ok", "ok"]
  assert (f"budgets: {timeout} s per item (rewards.timeout_s), {budget} s "
          "for a program's tests") in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [
    (b"{not json\n", "invalid JSON"),
    (b"\xff\xfe{}\n", "invalid UTF-8"),
    (b"[1, 2]\n", "expected a JSON object"),
    (json.dumps({"answer": "1", "verifier": "math"}).encode() + b"\n",
     "'completion' must be a string"),
    (json.dumps({"completion": "1", "verifier": "math"}).encode() + b"\n",
     "'answer' must be a string"),
    (json.dumps({"completion": "1", "answer": "1", "verifier": "mth"}).encode()
     + b"\n", "unknown verifier 'mth'"),
    (json.dumps({"completion": "1", "answer": "1", "verifier": "math",
                 "meta": [1]}).encode() + b"\n", "'meta' must be an object"),
    (b'{"completion": "1\\ud800", "answer": "1", "verifier": "math"}\n',
     "field 'completion' is not valid UTF-8 text"),
    (b'{"completion": "1", "answer": NaN, "verifier": "numeric"}\n',
     "field 'answer' must be a finite number"),
])
def test_bad_line_names_file_and_line(tmp_path, capsys, bad, message):
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write(src, LINES[:2] + [bad])
  assert cli.main(["--input", str(src), "--output", str(dst)]) == 2
  err = capsys.readouterr().err
  assert f"{src}:3: " in err and message in err
  assert not dst.exists()


def test_skip_bad_lines_counts_them(tmp_path, capsys):
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write(src, [b"{oops\n"] + LINES[:2] + [b"\xff\n"])
  assert cli.main(["--input", str(src), "--output", str(dst), "--workers",
                   "1", "--skip_bad_lines"]) == 0
  captured = capsys.readouterr()
  assert len(dst.read_text().splitlines()) == 2
  assert "2 bad lines skipped" in captured.out
  assert f"{src}:1:" in captured.err and f"{src}:4:" in captured.err


def test_set_options_and_bad_options(tmp_path, capsys):
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write(src, [{"completion": "3 + 15\n#### 18", "answer": "18",
                "verifier": "math"}])
  assert cli.main(["--input", str(src), "--output", str(dst), "--workers",
                   "1", "--set", r"math.answer_pattern=####\s*(.+)"]) == 0
  assert json.loads(dst.read_text())["reward"] == 1.0
  assert cli.main(["--input", str(src), "--output", str(dst),
                   "--set", "math.nope=1"]) == 2
  assert "'rewards.math.nope'" in capsys.readouterr().err


def test_an_integral_float_answer_reads_as_an_integer(tmp_path):
  # `69.0` in a JSON row is 69 (pandas writes integers so); `exact` compares
  # strings, so it once scored `\\boxed{69}` 0 against "69.0".
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  _write(src, [{"completion": "\\boxed{69}", "answer": 69.0,
                "verifier": v} for v in ("exact", "numeric", "math")])
  assert cli.main(["--input", str(src), "--output", str(dst), "--workers",
                   "1"]) == 0
  scored = [json.loads(line) for line in dst.read_text().splitlines()]
  assert [(s["answer"], s["reward"]) for s in scored] == [("69", 1.0)] * 3
