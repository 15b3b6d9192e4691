"""Qwen3 and Llama 3.x checkpoints made by transformers: import, logits,
export, greedy decode and two RL steps, per family (Qwen2: tests/test_hf.py).

The four tiny checkpoints are the issue's: Qwen3 untied and tied with a head
dim of 32 where D / N is 16, Llama 3.1 with its "llama3" RoPE scaling
(untied) and Llama 3.2 (tied, scaled). Every norm scale is moved away from 1
so that a norm mapped to the wrong place shows.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from brorl_jax import checkpointing, cli, hf, sample  # noqa: E402
from brorl_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from brorl_jax.data import tokenizer_loader  # noqa: E402
from brorl_jax.model import attention as attn_lib  # noqa: E402
from brorl_jax.model.layers import Rope  # noqa: E402
from brorl_jax.model.transformer import Policy, positions_from_valid  # noqa

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.configs import tiny_rl  # noqa: E402

VOCAB = 320
# Llama 3.1's scaling at toy size: with head dim 16 and 64 original
# positions, one frequency is kept, one smoothed and six divided by 8.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0,
                   low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
FAMILIES = {
    "qwen3_untied": ("Qwen3", dict(head_dim=32, tie_word_embeddings=False,
                                   rope_theta=1_000_000.0)),
    "qwen3_tied": ("Qwen3", dict(head_dim=32, tie_word_embeddings=True,
                                 rope_theta=1_000_000.0)),
    "llama3_1": ("Llama", dict(tie_word_embeddings=False,
                               rope_parameters=LLAMA3_ROPE,
                               eos_token_id=[3, 7])),
    "llama3_2": ("Llama", dict(tie_word_embeddings=True,
                               rope_parameters=dict(LLAMA3_ROPE, factor=32.0),
                               bos_token_id=2, eos_token_id=3)),
}
LINES = [f"What is {a} + {b}? {a} + {b} = {a + b}. \\boxed{{{a + b}}}"
         for a in range(20) for b in range(20)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  tok = tokenizer_lib.train_sentencepiece(LINES, 300, d)
  assert tok.vocab_size <= VOCAB
  return d


def _make(family, directory, tokenizer_dir, **changes):
  arch, extra = FAMILIES[family]
  extra = {**extra, **changes}
  torch.manual_seed(0)
  config = getattr(transformers, f"{arch}Config")(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      rms_norm_eps=1e-5, max_position_embeddings=1024, **extra)
  model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
  with torch.no_grad():  # norm scales (q/k norms included) away from 1
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.3)
  path = directory / family
  model.save_pretrained(path)
  for f in tokenizer_dir.iterdir():
    (path / f.name).write_bytes(f.read_bytes())
  return model, path


def _logits(cfg, params, tokens, valid):
  policy = Policy.create(cfg)

  @jax.jit
  def fwd(params):
    model = policy.bind(params)
    hidden, _ = model(tokens, positions_from_valid(valid),
                      attn_lib.FullAttention(valid, cfg.attention_backend))
    return model.logits(hidden)
  return np.asarray(fwd(params))


def _hf_greedy(model, prompt, steps, eos):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps,
                         do_sample=False, eos_token_id=eos, pad_token_id=0,
                         attention_mask=torch.ones(1, len(prompt), dtype=int))
  return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_round_trip_logits_and_greedy_decode(family, tmp_path,
                                                    tokenizer_dir):
  model, path = _make(family, tmp_path, tokenizer_dir)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, VOCAB, (2, 40))
  with torch.no_grad():
    ref = model(torch.from_numpy(tokens)).logits.numpy()
    ref1 = model(torch.from_numpy(tokens[1:, 15:])).logits.numpy()[0]

  # `hf import`: the family's flags, and logits within 1e-5 of
  # transformers' (f32), the second row left-padded by 15.
  hf.run(["import", "--hf_dir", str(path), "--out", str(tmp_path / "init")])
  cfg = checkpointing.load_model_config(tmp_path / "init")
  assert (cfg.qk_norm, cfg.qkv_bias) == (family.startswith("qwen3"), False)
  assert cfg.head_dim == (32 if family.startswith("qwen3") else 16)
  assert cfg.rope_type == ("llama3" if family.startswith("llama") else
                           "default")
  _, params, _ = checkpointing.load_policy_params(tmp_path / "init")
  valid = np.ones(tokens.shape, bool)
  valid[1, :15] = False
  ours = _logits(cfg, params, jnp.asarray(tokens, jnp.int32),
                 jnp.asarray(valid))
  np.testing.assert_allclose(ours[0], ref[0], rtol=0, atol=1e-5)
  np.testing.assert_allclose(ours[1, 15:], ref1, rtol=0, atol=1e-5)

  # Export: the same architecture and config fields; transformers loads it
  # with every tensor bitwise equal and the same logits.
  hf.run(["export", "--workdir", str(tmp_path / "init"), "--out",
          str(tmp_path / "out")])
  original = json.loads((path / "config.json").read_text())
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  for key in ("architectures", "model_type", "head_dim", "rope_parameters",
              "tie_word_embeddings", "eos_token_id", "bos_token_id",
              "attention_bias", "rms_norm_eps", "num_key_value_heads"):
    assert exported[key] == original[key], key
  auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  back = auto.eval()
  assert type(back) is type(model)
  assert back.config.rope_parameters == model.config.rope_parameters
  sd, sd_back = model.state_dict(), back.state_dict()
  assert set(sd) == set(sd_back)
  for name, tensor in sd.items():
    assert torch.equal(tensor, sd_back[name]), name
  with torch.no_grad():
    again = back(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(again, ref, rtol=0, atol=1e-5)

  # `sample --hf_dir OUT --greedy` (prefill + shared-prefix decode, two
  # left-padded prompts of different lengths, 2 rollouts each) gives
  # transformers' greedy `generate` ids, with the same stop ids.
  prompts = ["What is 3 + 4?", "What is 12 + 17? 12 + 17 = 29. \\boxed{"]
  steps = 12
  sample.run(["--hf_dir", str(tmp_path / "out"), "--greedy", "--n", "2",
              "--max_new_tokens", str(steps), "--json",
              str(tmp_path / "s.json"), *(f"--prompt={p}" for p in prompts)])
  got = json.loads((tmp_path / "s.json").read_text())["tokens"]
  tok = tokenizer_loader.load_tokenizer(tmp_path / "out")
  ids = [tok.encode(p) for p in prompts]
  assert len(ids[0]) < len(ids[1])
  for i, p in enumerate(ids):
    want = _hf_greedy(model, p, steps, list(tok.stop_ids))
    assert got[i] == [want, want], i


def test_llama3_frequencies_equal_transformers():
  # All three bands of the scaling (kept, smoothed, divided), bitwise.
  config = transformers.LlamaConfig(
      hidden_size=64, num_attention_heads=4, rope_parameters=LLAMA3_ROPE,
      max_position_embeddings=1024)
  want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
      config).inv_freq.numpy()
  rope = Rope(500_000.0, "llama3", 8.0, 1.0, 4.0, 64)
  got = np.asarray(rope.inv_freq(16))
  np.testing.assert_array_equal(got, want)
  base = np.asarray(Rope(500_000.0).inv_freq(16))
  assert got[0] == base[0] and 1 < base[1] / got[1] < 8
  np.testing.assert_allclose(base[2:] / got[2:], 8.0, rtol=1e-6)


@pytest.mark.slow
def test_two_rl_steps_run_and_resume(tmp_path, tokenizer_dir):
  # One checkpoint with every flag the two families add (Qwen3's q/k norms
  # and head dim, Llama 3's RoPE scaling, tied): a cold compile of the loop's
  # programs costs ~1 CPU minute per model, so one model carries them all
  # through sampling, the update, the diagnostics, a checkpoint and a resume.
  # No refill (tiny_rl's other tests run it) and no eval: fewer programs.
  from brorl_jax import train
  _, path = _make("qwen3_tied", tmp_path, tokenizer_dir,
                  rope_parameters=dict(LLAMA3_ROPE, rope_theta=1_000_000.0))
  workdir = tmp_path / "run"

  def run(steps):
    c = tiny_rl.get_config()
    c.data.synthetic["eval"] = 0
    return train.train(cli.set_keys(c, {
        "total_steps": steps, "init.path": str(path), "checkpoint.every": 1,
        "rollout.refill": False, "algo.length_buckets": 1}), str(workdir))

  run(1)
  _, p1, _ = checkpointing.load_policy_params(workdir, 1)
  run(2)  # resumes from step 1
  cfg, p2, _ = checkpointing.load_policy_params(workdir, 2)
  imported = hf.config_from_hf(json.loads((path / "config.json").read_text()))
  assert cfg.qk_norm and cfg.rope_type == "llama3" and cfg.head_dim == 32
  assert cfg.replace(param_dtype="float32", dtype="float32", remat=False,
                     attention_backend="auto") == imported
  rows = [json.loads(x) for x in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2]
  assert all("mass/u2" in r for r in rows if "reward/mean" in r)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
  # The trained policy exports as Qwen3 with its RoPE scaling.
  hf.export_hf(workdir, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert type(back).__name__ == "Qwen3ForCausalLM"
  assert back.config.rope_parameters["rope_type"] == "llama3"
