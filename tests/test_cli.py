"""Entry-point plumbing: configs by path from any directory, one-line errors.

The console scripts (`brorl-train`, ...) call the same `run` functions these
tests call; an editable install makes `brorl_jax` importable from anywhere,
but not the repository's `configs` package, which the shipped configs import.
"""

import os
import pathlib
import subprocess
import sys

import pytest

from brorl_jax import cli, evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/demo_cpu.py"

# `brorl-train ARGS` as the console script runs it, with `brorl_jax` from this
# checkout but the checkout itself off sys.path (as under an installed
# package): only the config loader can make `configs` importable.
_CONSOLE_SCRIPT = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import brorl_jax.train
sys.path.remove({str(ROOT)!r})
sys.argv[0] = "brorl-train"
brorl_jax.train.run()
"""


def test_brorl_train_print_config_from_another_directory(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run(
      [sys.executable, "-c", _CONSOLE_SCRIPT, "--config", str(DEMO),
       "--config.rollout.n=8", "--config.rewards.timeout_s=3",
       "--print_config"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  # Resolved: overrides applied, the preset expanded, derived values filled.
  assert "rollout.n = 8" in lines
  assert "model.preset = 'demo'" in lines and "model.embed_dim = 128" in lines
  assert "rewards.code.time_budget_s = 2.0" in lines
  assert list(tmp_path.iterdir()) == []  # nothing built, nothing written


def test_config_roots(tmp_path):
  # A checkout: the project root holds `configs/`.
  (tmp_path / "proj/configs").mkdir(parents=True)
  (tmp_path / "proj/pyproject.toml").write_text("")
  (tmp_path / "proj/configs/__init__.py").write_text("")
  (tmp_path / "proj/configs/a.py").write_text("")
  assert cli.config_roots(tmp_path / "proj/configs/a.py") == [
      tmp_path / "proj"]
  # A `configs` package copied elsewhere: the directory above the package.
  (tmp_path / "exp/configs").mkdir(parents=True)
  (tmp_path / "exp/configs/__init__.py").write_text("")
  (tmp_path / "exp/configs/b.py").write_text("")
  roots = cli.config_roots(tmp_path / "exp/configs/b.py")
  assert roots[-1] == tmp_path / "exp"
  assert cli.config_roots(tmp_path / "missing.py") == []


@pytest.mark.parametrize("override, message", [
    ("--config.rollout.nn=3",
     "error: config key 'rollout.nn': unknown key; closest known keys: "
     "rollout.n"),
    ("--config.rewards.cod.allow_unsandboxed=True",
     "error: config key 'rewards.cod': unknown key; closest known keys: "
     "rewards.code"),
    ("--config.rollout.n.x=3",
     "error: config key 'rollout.n.x': 'rollout.n' is a value, not a section"),
    ("--config.rollout.n=0",
     "error: config key 'rollout.n': must be an integer >= 1, got 0"),
])
def test_bad_overrides_are_one_line_errors(capsys, override, message):
  with pytest.raises(SystemExit) as exit_:
    evaluate.run(["brorl-evaluate", f"--config={DEMO}", override,
                  "--print_config"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err.strip() == message


def test_evaluate_print_config_applies_its_flags(capsys):
  evaluate.run(["brorl-evaluate", f"--config={DEMO}", "--n", "4",
                "--max_prompts", "5", "--config.eval.temperature=0.6",
                "--print_config"])
  lines = capsys.readouterr().out.splitlines()
  assert {"eval.n = 4", "eval.k = (1,)", "eval.max_prompts = 5",
          "eval.temperature = 0.6"} <= set(lines)
  evaluate.run(["brorl-evaluate", f"--config={DEMO}", "--max-prompts", "6",
                "--print_config"])  # the dashed alias
  assert "eval.max_prompts = 6" in capsys.readouterr().out.splitlines()
