"""`brorl-compare` / `python -m brorl_jax.compare`: absl flags, `--config.*`
overrides passed on, bad input as one `error:` line with exit status 2."""

import pathlib
import tomllib

import pytest

from brorl_jax import compare

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "compare_cpu.py")


def test_console_script_and_help(capsys):
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())[
      "project"]["scripts"]
  assert scripts["brorl-compare"] == "brorl_jax.compare:run"
  with pytest.raises(SystemExit) as e:
    compare.run(["brorl-compare", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert "--arms" in out and "--seeds" in out and "brorl-compare" in out


@pytest.mark.parametrize("args, message", [
    ([], "usage error: --config is required"),
    (["--config", CONFIG, "--workdir", "W"], "usage error: --arms is required"),
    (["--config", CONFIG, "--workdir", "W", "--arms", "prorl", "--seeds",
      "a"], "usage error: --seeds must be integers"),
    (["--config", CONFIG, "--workdir", "W", "--arms", "nope"],
     "usage error: --arms: configs/compare_cpu.py:<arm>: arm must be one "
     "of"),
    (["--config", CONFIG, "--workdir", "W", "--arms", "prorl",
      "--config.rollout.nn=3"],
     "error: config key 'rollout.nn': unknown key; closest known keys: "
     "rollout.n"),
    (["--config", CONFIG, "--workdir", "W", "--arms", "prorl", "--arm=x"],
     "error: Unknown command line flag 'arm'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args,
                                          message):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as e:
    compare.run(["brorl-compare", *args])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.splitlines()[0].startswith(message), err
  assert not (tmp_path / "W").exists()                 # nothing ran
