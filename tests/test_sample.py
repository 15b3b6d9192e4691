"""The sample CLI, from a model directory and from an exported HF directory."""

import json

import numpy as np
import pytest

from brorl_jax import checkpointing, hf, sample
from brorl_jax.data import tokenizer as tokenizer_lib
from brorl_jax.data import tokenizer_loader
from brorl_jax.model.sharding import SAMPLE_RULES, MeshRules, make_mesh

LINES = [f"What is {a} + {b}? {a} + {b} = {a + b}. \\boxed{{{a + b}}}"
         for a in range(20) for b in range(20)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_cfg, tiny_params):
  d = tmp_path_factory.mktemp("model")
  tok = tokenizer_lib.train_sentencepiece(LINES, 300, d / "tokenizer")
  assert tok.vocab_size <= tiny_cfg.vocab_size
  checkpointing.save_params(d / "params", tiny_params)
  checkpointing.save_model_config(tiny_cfg, d)
  return d


def test_sample_json_from_model_dir(model_dir, tmp_path):
  out = tmp_path / "s.json"
  sample.run(["--workdir", str(model_dir), "--prompt", "What is 3 + 4?",
              "--prompt", "What is 1 + 1?", "--chat", "--n", "3",
              "--max_new_tokens", "6", "--json", str(out)])
  result = json.loads(out.read_text())
  assert len(result["completions"]) == 2
  assert all(len(c) == 3 for c in result["completions"])
  tok = tokenizer_loader.load_tokenizer(model_dir / "tokenizer")
  for p in range(2):
    for g in range(3):
      ids = result["tokens"][p][g]
      assert len(ids) == result["lengths"][p][g] <= 6
      assert len(result["logprobs"][p][g]) == len(ids)
      assert all(lp <= 0 for lp in result["logprobs"][p][g])
      assert tok.decode(ids) == result["completions"][p][g]
  assert result["rendered"][0].startswith("<|im_start|>user")


def test_greedy_from_hf_dir_matches_model_dir(model_dir, tmp_path, tiny_cfg,
                                              tiny_params):
  hf.save_hf(tiny_params, tiny_cfg, tmp_path / "hf",
             tokenizer_dir=model_dir / "tokenizer")
  args = ["--prompt", "What is 2 + 2?", "--greedy", "--n", "2",
          "--max-new-tokens", "5"]
  sample.run(["--workdir", str(model_dir), *args, "--json",
              str(tmp_path / "a.json")])
  sample.run(["--hf-dir", str(tmp_path / "hf"), *args, "--json",
              str(tmp_path / "b.json")])
  a = json.loads((tmp_path / "a.json").read_text())
  b = json.loads((tmp_path / "b.json").read_text())
  assert a["tokens"] == b["tokens"]
  assert a["tokens"][0][0] == a["tokens"][0][1]  # greedy: rollouts agree
  np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)
  # The prefill's backend follows --attention-backend from either source.
  rules = MeshRules(make_mesh((-1, 1, 1)), SAMPLE_RULES)
  for workdir, hf_dir in ((str(model_dir), None), (None, str(tmp_path / "hf"))):
    policy, _, _ = sample.load_policy(workdir, hf_dir, None, rules,
                                      "reference")
    assert policy.cfg.attention_backend == "reference"


def test_missing_model_is_a_clear_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    sample.run(["--workdir", str(tmp_path), "--prompt", "x"])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "model_config.json" in err
