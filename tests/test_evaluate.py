"""Evaluation: the evaluator against an independent sample-decode-verify
pass, and the CLI end to end (pass@k itself: tests/loop/test_evaluator.py)."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from brorl_jax import checkpointing, evaluate, hf, rewards
from brorl_jax import run_config
from brorl_jax import warmstart
from brorl_jax.loop import evaluator as evaluator_lib
from brorl_jax.loop import experiment
from brorl_jax.config import ConfigError
from brorl_jax.model.sharding import reshard
from brorl_jax.rl.train_state import TrainState

CONFIG = {
    "seed": 0,
    "model": {"preset": "tiny", "dtype": "float32", "remat": False},
    # Difficulty 1 has 300 problems; its 14 held-out ones (tasks.is_heldout)
    # are the whole held-out set.
    "data": {"synthetic": {"task": "arithmetic", "train": 200, "eval": 14,
                           "difficulty": [1]},
             "instruction": ""},
    "rollout": {"prompts_per_step": 8, "n": 4, "max_prompt_len": 64,
                "max_new_tokens": 24},
    "rewards": {"num_workers": 1},
    "eval": {"n": 4, "k": (1, 2, 4), "max_prompts": None},
    "init": {"tokenizer_vocab_size": 350},
}


# ---- the evaluator on a tiny warm-started policy -----------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny arithmetic run, its pool, random and warm-started params."""
  cfg = run_config.load(ml_collections.ConfigDict(CONFIG))
  exp = experiment.build(cfg, tmp_path_factory.mktemp("eval_run"))
  params = exp.initial_params()
  warm, _ = warmstart.run_warmstart(exp, params, warmstart.WarmstartConfig(
      steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=20))
  sampling = exp.param_shardings(sampling=True)
  with exp.reward_pool() as pool:
    yield {"exp": exp, "pool": pool, "random": reshard(params, sampling),
           "warm": reshard(warm, sampling), "warm_train": warm}


def _independent_greedy(exp, params):
  """Greedy samples decoded and verified in this process, per prompt."""
  sampler = exp.sampler(dataclasses.replace(exp.cfg.eval_sampler(), n=1,
                                            greedy=True))
  correct = []
  for batch in exp.pipeline().eval_batches():
    out = sampler.generate(params, batch.tokens, batch.lengths,
                           jax.random.key(12345))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i, record in enumerate(batch.records):
      if not batch.valid[i]:
        continue
      text = exp.tokenizer.decode(tokens[i, 0, :lengths[i, 0]])
      reward = rewards.score(rewards.VerifyItem(
          completion=text, answer=record.answer, verifier=record.verifier,
          meta=record.meta), exp.cfg.rewards)
      correct.append(reward >= exp.cfg.rewards.correct_threshold)
  return np.asarray(correct)


def test_greedy_pass1_equals_independent_scoring(run, capsys):
  exp, pool = run["exp"], run["pool"]
  want = _independent_greedy(exp, run["warm"])
  assert len(want) == 14 and 0 < want.mean() < 1, want.mean()
  evaluator = evaluator_lib.Evaluator(exp, pool, greedy=True)
  assert evaluator.n == 1 and evaluator.ks == (1,)
  result = evaluator.run(run["warm"], 3, jax.random.key(0))
  np.testing.assert_array_equal(result.correct, want.astype(int))
  metrics = result.flat()
  assert metrics["eval/pass@1"] == pytest.approx(want.mean())
  assert metrics["eval/arithmetic/pass@1"] == metrics["eval/pass@1"]
  assert metrics["eval/num_prompts"] == 14
  # Batches of 12 end in 4 filler rows, which must not count.
  capsys.readouterr()
  by_12 = evaluator_lib.Evaluator(exp, pool, greedy=True, batch_size=12,
                             progress="lines").run(
      run["warm"], 3, jax.random.key(0))
  np.testing.assert_array_equal(by_12.correct, result.correct)
  # Progress lines: problems done (fillers excluded), running pass@1.
  lines = capsys.readouterr().out.splitlines()
  assert lines == [f"eval 12/14 problems  pass@1 {want[:12].mean():.4g}",
                   f"eval 14/14 problems  pass@1 {want.mean():.4g}"]


def test_sampled_evaluation(run):
  exp, pool = run["exp"], run["pool"]
  evaluator = evaluator_lib.Evaluator(exp, pool)
  assert evaluator.n == 4 and evaluator.ks == (1, 2, 4)
  assert evaluator.sampler.cfg.temperature == 0.6   # eval's, not rollout's
  key = evaluator_lib.eval_key(0)
  result = evaluator.run(run["warm"], 0, key)
  m = result.flat()
  assert m["eval/num_prompts"] == 14
  # Rewards are 0/1 here, so the mean reward is the fraction correct.
  assert m["eval/pass@1"] == pytest.approx(m["eval/reward_mean"])
  assert m["eval/pass@1"] == pytest.approx(np.mean(result.correct / 4))
  assert 0 < m["eval/pass@1"] <= m["eval/pass@2"] <= m["eval/pass@4"] <= 1
  assert m["eval/pass@4"] == pytest.approx(np.mean(result.correct > 0))
  assert 0 < m["eval/response_len_mean"] <= 24
  assert 0 <= m["eval/truncated_frac"] <= 1
  # The same key gives the same samples; a prefix of prompts, a prefix of
  # the outcomes.
  again = evaluator_lib.Evaluator(exp, pool, max_prompts=10).run(run["warm"], 0,
                                                            key)
  np.testing.assert_array_equal(again.correct, result.correct[:10])
  # Draws are keyed by (problem, sample): other batch sizes (filler rows
  # included) give the same outcomes, so evaluations compare across configs.
  for size in (4, 12):
    other = evaluator_lib.Evaluator(exp, pool, batch_size=size).run(
        run["warm"], 0, key)
    np.testing.assert_array_equal(other.correct, result.correct)
  # A random policy solves nothing.
  assert evaluator.evaluate(run["random"], 0, key)["eval/pass@4"] == 0.0
  with pytest.raises(ConfigError, match="'eval.k'"):
    evaluator_lib.Evaluator(exp, pool, ks=(1, 8))


# ---- command line ------------------------------------------------------------


def _config_file(tmp_path):
  path = tmp_path / "tiny_config.py"
  # A typed None, so that `--config.eval.max_prompts=8` parses as an int.
  path.write_text(
      "import ml_collections\n\n\ndef get_config():\n"
      f"  c = ml_collections.ConfigDict({CONFIG!r})\n"
      "  c.eval.max_prompts = ml_collections.FieldReference(None, int)\n"
      "  return c\n")
  return str(path)


def test_cli_end_to_end(run, tmp_path, capsys):
  exp = run["exp"]
  # A training workdir: tokenizer, model config, checkpoints at steps 3, 7.
  workdir = tmp_path / "w"
  shutil.copytree(exp.workdir / "tokenizer", workdir / "tokenizer")
  checkpointing.save_model_config(exp.model_cfg, workdir)
  opt = optax.sgd(0.1)
  ckpt = checkpointing.TrainCheckpointer(workdir / "checkpoints", keep=3,
                                         async_save=False)
  for step, params in ((3, exp.initial_params()), (7, run["warm_train"])):
    state = TrainState.create(params, opt, with_reference=False)
    ckpt.save(step, state.replace(step=jnp.int32(step)), None, {})
  ckpt.close()
  config = _config_file(tmp_path)
  out = tmp_path / "out" / "eval.json"
  report = evaluate.main(["evaluate", f"--config={config}",
                          f"--workdir={workdir}", "--n", "4", "--k", "1,4",
                          "--max_prompts", "16", "--json", str(out)])
  printed = capsys.readouterr().out
  assert json.loads(out.read_text()) == report
  assert report["step"] == 7 and report["n"] == 4
  assert set(report["pass@k"]) == {"1", "4"}
  assert report["per_task"]["arithmetic"]["n_prompts"] == 14
  # The same policy, settings and key in-process give the same numbers.
  want = evaluator_lib.Evaluator(
      exp, run["pool"], ks=(1, 4), max_prompts=16).run(
          run["warm"], 7, evaluator_lib.eval_key(0)).report()
  assert report["pass@1"] == pytest.approx(want["pass@1"])
  assert report["pass@k"] == pytest.approx(want["pass@k"])
  assert report["pass@1"] > 0
  assert "step 7" in printed and "pass@4" in printed
  assert any(line.split()[:2] == ["arithmetic", "14"]
             for line in printed.splitlines())
  # An earlier step, greedy; `--config.*` overrides reach the config.
  report = evaluate.main(["evaluate", f"--config={config}",
                          f"--workdir={workdir}", "--step", "3", "--greedy",
                          "--config.eval.max_prompts=8"])
  assert report["step"] == 3 and report["n"] == 1 and report["greedy"]
  assert report["pass@1"] == 0.0 and report["per_task"]["arithmetic"][
      "n_prompts"] == 8
  # Reading does not prune the checkpoints.
  reader = checkpointing.TrainCheckpointer(workdir / "checkpoints", keep=3)
  assert reader.all_steps() == [3, 7]
  reader.close()
  # An HF export of the warm policy evaluates like the checkpoint.
  hf_dir = tmp_path / "hf"
  hf.save_hf(run["warm_train"], exp.model_cfg, hf_dir,
             tokenizer_dir=workdir / "tokenizer")
  greedy_hf = evaluate.main(["evaluate", f"--config={config}",
                             f"--hf-dir={hf_dir}", "--greedy"])
  greedy_ckpt = evaluate.main(["evaluate", f"--config={config}",
                               f"--workdir={workdir}", "--greedy"])
  assert greedy_hf["step"] is None and greedy_ckpt["step"] == 7
  assert greedy_hf["pass@1"] == greedy_ckpt["pass@1"] > 0


def test_cli_errors_name_the_fix(tmp_path):
  config = _config_file(tmp_path)
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": str(root)}
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = subprocess.run(
      [sys.executable, "-m", "brorl_jax.evaluate", f"--config={config}",
       f"--workdir={empty}"], capture_output=True, text=True, env=env,
      timeout=120)
  assert proc.returncode != 0
  assert "lacks model_config.json, tokenizer" in proc.stderr
  proc = subprocess.run(
      [sys.executable, "-m", "brorl_jax.evaluate", f"--config={config}"],
      capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode != 0 and "--workdir" in proc.stderr
