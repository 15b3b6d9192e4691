"""Reward plugins (`rewards.plugins`, `--plugins`): modules that register
verifiers, imported in the parent and in every worker; bad ones named in one
line before any work."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from brorl_jax import run_config
from brorl_jax.config import ConfigError
from brorl_jax.rewards import plugins, registry
from brorl_jax.rewards.config import RewardsConfig
from brorl_jax.rewards.pool import RewardPool
from brorl_jax.rewards.registry import VerifyItem
from configs import base

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

PLUGIN = textwrap.dedent('''\
    """A user's verifiers."""
    import os
    import time

    from brorl_jax.rewards import registry

    def verify_{tag}(completion, answer, **unused):
      return float(completion.strip().lower() == "yes " + answer)

    def worker_pid_{tag}(completion, answer, **unused):
      return float(os.getpid())

    def sleepy_{tag}(completion, answer, **unused):
      time.sleep(10_000)

    registry.register("yes_{tag}", verify_{tag})
    registry.register("pid_{tag}", worker_pid_{tag})
    registry.register("sleepy_{tag}", sleepy_{tag})
    ''')


def _load(**sections):
  """`run_config.load` of the base config with `sections` merged in."""
  config = base.get_config()
  for section, keys in sections.items():
    for key, value in keys.items():
      config[section][key] = value
  return run_config.load(config)


def _plugin(directory, tag):
  path = directory / f"plugin_{tag}.py"
  path.write_text(PLUGIN.format(tag=tag))
  return path


@pytest.fixture(autouse=True)
def _restore_registry():
  before = dict(registry.VERIFIERS)
  yield
  registry.VERIFIERS.clear()
  registry.VERIFIERS.update(before)


def test_module_plugin_scores_in_workers_with_the_pool_timeout(
    tmp_path, monkeypatch):
  _plugin(tmp_path, "mod")
  monkeypatch.syspath_prepend(str(tmp_path))
  cfg = _load(rewards={"plugins": ("plugin_mod",), "timeout_s": 2.0,
                       "kill_grace_s": 0.3})
  assert cfg.rewards.plugins == ("plugin_mod",)
  assert "yes_mod" in registry.VERIFIERS        # imported by `load`
  with RewardPool(cfg.rewards, num_workers=1) as pool:
    assert pool.wait_ready()
    results = pool.score([VerifyItem("yes 7", "7", "yes_mod"),
                          VerifyItem("no", "7", "yes_mod"),
                          VerifyItem("", "", "pid_mod"),
                          VerifyItem("", "", "sleepy_mod"),
                          VerifyItem("yes 1", "1", "yes_mod")])
  assert [r.reward for r in results[:2]] == [1.0, 0.0]
  assert results[2].status == "ok" and results[2].reward != os.getpid()
  # The plugin's verifier is bounded like a built-in one.
  assert results[3].status == "timeout" and results[3].reward == 0.0
  assert results[4].reward == 1.0 and results[4].status == "ok"


def test_file_plugin_is_imported_by_path_in_parent_and_workers(tmp_path):
  path = _plugin(tmp_path, "file")
  config = RewardsConfig(plugins=(str(path),), num_workers=1)
  plugins.load(config.plugins)
  plugins.load(config.plugins)                   # a second load: no-op
  # Workers import it by path too: the verifier table pickles
  # `plugin_file.verify_file` by module name.
  with RewardPool(config) as pool:
    results = pool.score([VerifyItem("yes 2", "2", "yes_file")])
  assert results[0].status == "ok" and results[0].reward == 1.0


def test_plugins_string_is_split():
  assert RewardsConfig(plugins="a, b").plugins == ("a", "b")
  # `--config.rewards.plugins=a,b` arrives as ("a,b",).
  assert RewardsConfig(plugins=("a,b", "c.py")).plugins == ("a", "b", "c.py")
  with pytest.raises(ConfigError, match="rewards.plugins"):
    RewardsConfig(plugins=(3,))


@pytest.mark.parametrize("source, message", [
    (None, "No module named 'no_such_plugin_xyz'"),
    ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("import no_such_dependency_xyz\n", "No module named"),
])
def test_a_plugin_that_fails_is_one_line_naming_it(tmp_path, monkeypatch,
                                                   source, message):
  name = "no_such_plugin_xyz"
  if source is not None:
    name = f"broken_plugin_{abs(hash(source)) % 1000}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ConfigError) as e:
    _load(rewards={"plugins": (name,)})
  text = str(e.value)
  assert "\n" not in text
  assert "rewards.plugins" in text and repr(name) in text and message in text


def test_unknown_verifier_of_a_file_spec_fails_at_load(tmp_path):
  with pytest.raises(ConfigError, match="unknown verifier 'nope'"):
    _load(data={"train_files": (
        {"path": str(tmp_path / "x.jsonl"), "verifier": "nope"},)})


def test_rewards_cli_scores_with_a_plugin_verifier(tmp_path):
  _plugin(tmp_path, "cli")
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("".join(json.dumps(x) + "\n" for x in [
      {"completion": "yes 3", "answer": "3", "verifier": "yes_cli"},
      {"completion": "yes 4", "answer": "3", "verifier": "yes_cli"},
      {"completion": "so \\boxed{3}", "answer": "3", "verifier": "math"}]))
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
      [sys.executable, "-m", "brorl_jax.rewards", "--plugins", "plugin_cli",
       "--input", str(src), "--output", str(dst), "--workers", "1"],
      capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
  assert out.returncode == 0, out.stderr
  scored = [json.loads(line) for line in dst.read_text().splitlines()]
  assert [s["reward"] for s in scored] == [1.0, 0.0, 1.0]
  assert "yes_cli" in out.stdout

  # Without the plugin the verifier is unknown; a bad plugin is one line.
  for args, message in [
      ([], "unknown verifier 'yes_cli'"),
      (["--plugins", "plugin_cli,missing_xyz"],
       "--plugins: plugin 'missing_xyz' failed to import")]:
    bad = subprocess.run(
        [sys.executable, "-m", "brorl_jax.rewards", *args, "--input",
         str(src), "--output", str(tmp_path / "o2.jsonl")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), bad.stderr
    assert message in lines[0]
