"""The benchmark suite's registry, files, answer votes, pass@k and maj@k."""

import hashlib
import json
import math
import pathlib

import numpy as np
import pytest

from brorl_jax import config as config_lib
from brorl_jax.config import ConfigError
from brorl_jax.data import prompts, records, tokenizer_loader
from brorl_jax.loop import suite
from brorl_jax.rewards.config import RewardsConfig

SHA256 = {  # from the files' provenance README
    "math500":
        "69643c3a24d2b2b352e3ac5a750280a507982eb85288509ea095c464729da77e",
    "gsm8k":
        "9aabe2e1d82dcdac3ef1696c3389c399f714d228304cadbda6f2102b1478b626",
    "aime24": "2dddea7f1b96aa3e7ae4d0d284d466ccd06e5d4ff1311eb5c72172f0174565be",
    "amc23": "5502ad5445bd15b7c843ed955ea7e1a0085a3bc3c0c6748bc75131104736df6c",
}


def test_shipped_files_are_the_recorded_ones():
  for name, bench in suite.BENCHMARKS.items():
    data = bench.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256[name]
    result = records.read_records(suite.file_specs([bench])[0])
    assert len(result.records) == bench.problems
    assert {r.task for r in result.records} == {name}
    assert {r.verifier for r in result.records} == {"math"}
  assert "Where each file came from" in (suite.FILES / "README.md").read_text()


def test_resolve_names_suites_and_benchmarks():
  names = lambda spec: [b.name for b in suite.resolve(spec)]  # noqa: E731
  assert names("math") == ["math500", "aime24", "amc23", "gsm8k"]
  assert names("aime24, math500,aime24") == ["aime24", "math500"]
  assert names(("gsm8k", "math")) == ["gsm8k", "math500", "aime24", "amc23"]
  with pytest.raises(ConfigError, match="--suite: unknown benchmark 'aime'"):
    suite.resolve("aime")
  with pytest.raises(ConfigError, match="config key 'eval.suite'"):
    suite.resolve(",", key="eval.suite")


def test_answer_keys_vote_together_when_the_verifier_would_match():
  cfg = RewardsConfig()
  key = lambda text: suite.answer_key(text, cfg)  # noqa: E731
  assert key("so \\boxed{\\dfrac{1}{2}}.") == key("\\boxed{ \\frac{1}{2} }")
  assert key("\\boxed{\\left( 3, 4 \\right)}") == key("\\boxed{(3,4)}")
  assert key("\\boxed{3}") != key("\\boxed{4}")
  assert key("no final answer") is None
  assert suite.answer_id(None) == 0
  assert suite.answer_id("1") == suite.answer_id("1") > 0


def _maj_reference(ids, correct, k):
  """maj@k written out: votes per block, ties averaged, then blocks."""
  n = len(ids)
  scores = []
  for start in range(0, n - n % k, k):
    votes = {}
    for a, c in zip(ids[start:start + k], correct[start:start + k]):
      if a:
        votes.setdefault(a, []).append(c)
    if not votes:
      scores.append(0.0)
      continue
    top = max(len(v) for v in votes.values())
    scores.append(np.mean([np.mean(v) for v in votes.values()
                           if len(v) == top]))
  return np.mean(scores)


def test_maj_at_k_hand_cases_and_reference():
  # Answers 7 (correct) and 5 (wrong); 0 = no answer.
  ids = np.array([[7, 5, 5, 7, 7, 0],     # blocks of 3: [7,5,5] [7,7,0]
                  [5, 5, 7, 0, 0, 0],     # [5,5,7] [0,0,0]
                  [7, 5, 0, 0, 7, 5]])    # ties: [7,5,0] [0,7,5]
  correct = ids == 7
  np.testing.assert_allclose(suite.maj_at_k(ids, correct, 3),
                             [0.5, 0.0, 0.5])
  np.testing.assert_allclose(suite.maj_at_k(ids, correct, 6),
                             [1.0, 0.0, 0.5])
  # maj@1 is the accuracy of the samples that answered.
  np.testing.assert_allclose(suite.maj_at_k(ids, correct, 1),
                             correct.mean(-1))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 4, (50, 8))
  correct = ids == 1
  for k in (1, 2, 3, 4, 8):
    np.testing.assert_allclose(
        suite.maj_at_k(ids, correct, k),
        [_maj_reference(a, c, k) for a, c in zip(ids, correct)])
  with pytest.raises(ValueError, match="1 <= k <= n"):
    suite.maj_at_k(ids, correct, 9)


def test_result_table_report_and_metrics():
  n = 4
  result = suite.SuiteResult(
      benchmarks=("aime24", "gsm8k"), ks=(1, 2, 4), n=n,
      tasks=["aime24", "gsm8k", "gsm8k"],
      correct=np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool),
      answers=np.array([[3, 2, 2, 4], [9, 9, 8, 8], [5, 5, 5, 5]]))
  s = result.per_benchmark()
  assert s["aime24"]["problems"] == 1 and s["gsm8k"]["problems"] == 2
  assert s["gsm8k"]["accuracy"] == 0.75
  # pass@2 of c=2 of n=4: 1 - C(2,2)/C(4,2) = 5/6; c=4: 1.
  assert s["gsm8k"]["pass@k"][2] == pytest.approx((5 / 6 + 1) / 2)
  assert s["aime24"]["pass@k"][4] == 1.0
  assert s["aime24"]["pass@k"][1] == 0.25
  # maj@4 of aime24: answer 2 (wrong) wins; gsm8k: a 9/8 tie -> 0.5, then 1.
  assert s["aime24"]["maj@k"][4] == 0.0
  assert s["gsm8k"]["maj@k"][4] == pytest.approx(0.75)
  report = result.report()
  json.dumps(report)
  assert report["benchmarks"]["gsm8k"]["maj@k"]["4"] == pytest.approx(0.75)
  flat = result.flat()
  assert flat["suite/gsm8k/maj@4"] == pytest.approx(0.75)
  assert flat["suite/aime24/pass@1"] == 0.25
  lines = result.table().splitlines()
  assert lines[0].split() == ["benchmark", "problems", "accuracy", "pass@1",
                              "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"]
  assert lines[3].split()[:3] == ["gsm8k", "2", "0.7500"]


def test_max_prompts_per_file():
  spec = suite.file_specs([suite.BENCHMARKS["aime24"]], max_prompts=3)[0]
  assert spec.max_prompts == 3 and spec.columns is not None
  # A data section with a mapping leaves the suite's own entries alone.
  cfg = config_lib.from_mapping(prompts.DataConfig, {
      "eval_files": [spec], "prompt_key": "question"}, "data")
  assert cfg.eval_files[0].columns.prompt == "prompt"


def test_pipeline_takes_the_first_prompts_that_fit():
  qwen2 = tokenizer_loader.load_tokenizer(
      pathlib.Path(__file__).parents[1] / "fixtures" / "qwen2_tokenizer")
  benches = suite.resolve("aime24,amc23")
  cfg = prompts.DataConfig(eval_files=suite.file_specs(benches,
                                                       max_prompts=3))
  pipe = prompts.PromptPipeline(cfg, qwen2, max_prompt_len=1024,
                                prompts_per_step=4)
  stats = {s.task: s for s in pipe.file_stats("eval")}
  assert stats["aime24"].kept == 3 and stats["amc23"].kept == 3
  # Prompts left out by the cap are not "too long".
  assert stats["aime24"].too_long == 0 and stats["amc23"].too_long == 0
  ids = [r.meta["id"] for b in pipe.eval_batches() for r, ok in
         zip(b.records, b.valid) if ok]
  amc = [json.loads(line)["meta"]["id"] for line in
         suite.BENCHMARKS["amc23"].path.read_text().splitlines()[:3]]
  assert ids[3:] == amc and len(ids) == 6
