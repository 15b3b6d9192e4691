"""`evaluate --suite`: the shipped benchmarks through the run's pipeline,
sampler and math verifier, end to end on a tiny model."""

import json

import ml_collections
import optax
import pytest

from brorl_jax import checkpointing, evaluate, run_config
from brorl_jax.config import ConfigError
from brorl_jax.loop import experiment, suite
from brorl_jax.rl.train_state import TrainState

BENCHES = [str(b.path) for b in suite.resolve("math")]
CONFIG = {
    "seed": 0,
    "model": {"preset": "tiny", "dtype": "float32", "remat": False},
    # The tokenizer is trained on the benchmarks' prompts.
    "data": {"eval_files": tuple(BENCHES)},
    "rollout": {"prompts_per_step": 8, "n": 2, "max_prompt_len": 384,
                "max_new_tokens": 6},
    "rewards": {"num_workers": 1},
    "eval": {"n": 2, "k": (1, 2), "max_prompts": None},
    "init": {"tokenizer_vocab_size": 400},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  cfg = run_config.load(ml_collections.ConfigDict(CONFIG))
  path = tmp_path_factory.mktemp("suite_run")
  exp = experiment.build(cfg, path)
  state = TrainState.create(exp.initial_params(), optax.sgd(0.1),
                            with_reference=False)
  ckpt = checkpointing.TrainCheckpointer(path / "checkpoints", keep=1,
                                         async_save=False)
  ckpt.save(2, state, None, {})
  ckpt.close()
  config = path / "config.py"
  config.write_text("import ml_collections\n\n\ndef get_config():\n"
                    f"  c = ml_collections.ConfigDict({CONFIG!r})\n"
                    "  c.eval.max_prompts = ml_collections.FieldReference("
                    "None, int)\n  return c\n")
  return path, str(config)


@pytest.fixture(scope="module")
def cli_run(workdir, tmp_path_factory):
  path, config = workdir
  out = tmp_path_factory.mktemp("suite_out") / "suite.json"
  report = evaluate.main(["evaluate", f"--config={config}",
                          f"--workdir={path}", "--suite", "math", "--n", "2",
                          "--k", "1,2", "--max_prompts", "2", "--json",
                          str(out)])
  return report, out


def test_suite_reports_every_benchmark(cli_run, capsys):
  report, out = cli_run
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report["step"] == 2 and report["n"] == 2
  assert list(report["benchmarks"]) == ["math500", "aime24", "amc23",
                                        "gsm8k"]
  for name, b in report["benchmarks"].items():
    assert b["problems"] == 2, (name, report["too_long"])
    assert set(b["pass@k"]) == set(b["maj@k"]) == {"1", "2"}
    assert b["accuracy"] == pytest.approx(b["pass@k"]["1"])
    assert 0 <= b["maj@k"]["2"] <= 1


def test_unknown_benchmark_is_named(workdir):
  path, config = workdir
  with pytest.raises(ConfigError, match="--suite: unknown benchmark 'gsm'"):
    evaluate.main(["evaluate", f"--config={config}", f"--workdir={path}",
                   "--suite", "gsm"])


def test_loop_metrics_match_the_command_line(workdir, cli_run):
  path, _ = workdir
  report, _ = cli_run
  overrides = {**CONFIG, "eval": {**CONFIG["eval"], "max_prompts": 2,
                                  "suite": "math"}}
  cfg = run_config.load(ml_collections.ConfigDict(overrides))
  exp = experiment.build(cfg, path)
  _, params, _ = checkpointing.load_policy_params(
      path, 2, exp.param_shardings(sampling=True))
  with exp.reward_pool() as pool:
    evaluator = suite.SuiteEvaluator(exp, pool, cfg.eval.suite)
    metrics = evaluator.loop_metrics(params, 2, cfg.seed)
    assert pool.stats()["items"] == 0          # counters taken by the suite
  # The loop's key is the command line's: the same samples, the same numbers.
  for name, want in report["benchmarks"].items():
    assert metrics[f"suite/{name}/problems"] == 2
    assert metrics[f"suite/{name}/accuracy"] == want["accuracy"]
    for k in ("1", "2"):
      assert metrics[f"suite/{name}/maj@{k}"] == want["maj@k"][k]
      assert metrics[f"suite/{name}/pass@{k}"] == want["pass@k"][k]
  assert metrics["time/suite_s"] > 0
