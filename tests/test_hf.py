"""Hugging Face interchange: import/export round trips against transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from brorl_jax import hf  # noqa: E402
from brorl_jax.model import attention as attn_lib  # noqa: E402
from brorl_jax.model.transformer import Policy, positions_from_valid  # noqa


def _make_hf_model(tmp_path, *, tied, kv_heads, name="hf", positions=256):
  torch.manual_seed(0)
  config = transformers.Qwen2Config(
      vocab_size=300, hidden_size=64, intermediate_size=96,
      num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=kv_heads, tie_word_embeddings=tied,
      rope_theta=50_000.0, rms_norm_eps=1e-5,
      max_position_embeddings=positions)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():  # non-zero biases and norm scales
    for n, p in model.named_parameters():
      if n.endswith("bias") or "norm" in n:
        p.add_(torch.randn_like(p) * 0.1)
  path = tmp_path / name
  model.save_pretrained(path)
  return model, path


def _our_logits(cfg, params, tokens, valid=None):
  policy = Policy.create(cfg)
  valid = jnp.ones(tokens.shape, bool) if valid is None else valid

  @jax.jit
  def fwd(params):
    model = policy.bind(params)
    hidden, _ = model(tokens, positions_from_valid(valid),
                      attn_lib.FullAttention(valid, cfg.attention_backend))
    return model.logits(hidden)
  return np.asarray(fwd(params))


@pytest.mark.parametrize("tied,kv_heads", [(False, 2), (True, 4),
                                           (True, 1), (False, 4)])
def test_import_export_round_trip(tmp_path, tied, kv_heads):
  model, path = _make_hf_model(tmp_path, tied=tied, kv_heads=kv_heads)
  tokens = np.random.default_rng(0).integers(0, 300, (2, 11))
  with torch.no_grad():
    ref = model(torch.from_numpy(tokens)).logits.numpy()

  # Import: our logits match transformers'.
  cfg = hf.import_hf(path, tmp_path / "init")
  assert cfg.tie_embeddings == tied and cfg.num_kv_heads == kv_heads
  from brorl_jax import checkpointing
  cfg2, params, _ = checkpointing.load_policy_params(tmp_path / "init")
  assert cfg2 == cfg
  ours = _our_logits(cfg, params, jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

  # Export: transformers loads it; logits and every tensor are unchanged.
  hf.export_hf(tmp_path / "init", tmp_path / "out")
  back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
  with torch.no_grad():
    again = back(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(again, ref, rtol=1e-5, atol=1e-5)
  original = model.state_dict()
  exported = back.state_dict()
  assert set(original) == set(exported)
  for name, tensor in original.items():
    assert torch.equal(tensor, exported[name]), name
  assert (tmp_path / "out" / "generation_config.json").exists()


def test_2k_prompt_logits_match_transformers(tmp_path):
  # The default backend (blockwise on CPU: 4 key blocks at 2048), with a
  # left-padded second row, against transformers on the unpadded tokens.
  model, path = _make_hf_model(tmp_path, tied=False, kv_heads=2,
                               positions=4096)
  tokens = np.random.default_rng(3).integers(0, 300, (2, 2048))
  tokens[1, :700] = 0
  valid = np.ones(tokens.shape, bool)
  valid[1, :700] = False
  cfg = hf.import_hf(path, tmp_path / "init")
  assert cfg.attention_backend == "auto"
  from brorl_jax import checkpointing
  _, params, _ = checkpointing.load_policy_params(tmp_path / "init")
  ours = _our_logits(cfg, params, jnp.asarray(tokens, jnp.int32),
                     jnp.asarray(valid))
  with torch.no_grad():
    ref0 = model(torch.from_numpy(tokens[:1])).logits.numpy()[0]
    ref1 = model(torch.from_numpy(tokens[1:, 700:])).logits.numpy()[0]
  np.testing.assert_allclose(ours[0], ref0, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours[1, 700:], ref1, rtol=1e-4, atol=1e-4)


def test_sharded_export_and_bf16(tmp_path):
  model, path = _make_hf_model(tmp_path, tied=False, kv_heads=2)
  cfg = hf.import_hf(path, tmp_path / "init")
  from brorl_jax import checkpointing
  _, params, _ = checkpointing.load_policy_params(tmp_path / "init")
  hf.save_hf(params, cfg, tmp_path / "sharded", max_shard_bytes=60_000)
  index = json.loads((tmp_path / "sharded" /
                      "model.safetensors.index.json").read_text())
  files = set(index["weight_map"].values())
  assert len(files) > 2 and all("-of-" in f for f in files)
  back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "sharded")
  for name, tensor in model.state_dict().items():
    assert torch.equal(tensor, back.state_dict()[name]), name
  hf.save_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
  cfg_json = json.loads((tmp_path / "bf16" / "config.json").read_text())
  assert cfg_json["torch_dtype"] == "bfloat16"
  back16 = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "bf16")
  assert back16.model.embed_tokens.weight.dtype == torch.bfloat16
  # Re-import the bf16 export: it is the bf16 rounding of the original.
  cfg16 = hf.import_hf(tmp_path / "bf16", tmp_path / "init16")
  assert cfg16.param_dtype == "bfloat16"


def test_import_sharded_onto_mesh(tmp_path, capsys):
  from brorl_jax.model.sharding import TRAIN_RULES, MeshRules, make_mesh
  _, path = _make_hf_model(tmp_path, tied=False, kv_heads=2)
  cfg = hf.config_from_hf(json.loads((path / "config.json").read_text()))
  mesh_rules = MeshRules(make_mesh((1, 4, 2)), TRAIN_RULES)
  params = hf.load_hf_params(path, cfg,
                             Policy.create(cfg).shardings(mesh_rules),
                             progress="lines")
  lines = capsys.readouterr().out.splitlines()
  total = len(jax.tree.leaves(params))
  assert lines[-1] == f"hf import {total}/{total} tensors"
  assert 1 < len(lines) <= 10
  q = params["layer_0"]["attn"]["q_proj"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8


def _rewrite(path, fn):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(path / "model.safetensors")
  fn(tensors)
  save_file(tensors, path / "model.safetensors")


def test_bad_checkpoints_name_the_tensor(tmp_path):
  _, path = _make_hf_model(tmp_path, tied=False, kv_heads=2)
  cfg = hf.config_from_hf(json.loads((path / "config.json").read_text()))

  _rewrite(path, lambda t: t.update(
      {"model.layers.0.mlp.up_proj.weight": np.zeros((95, 64), np.float32)}))
  with pytest.raises(hf.CheckpointFormatError,
                     match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(95, 64\)"
                     r".*expected \(64, 96\)"):
    hf.load_hf_params(path, cfg)

  _rewrite(path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
  with pytest.raises(hf.CheckpointFormatError,
                     match=r"'model\.layers\.0\.mlp\.up_proj\.weight'.*missing"):
    hf.load_hf_params(path, cfg)

  _rewrite(path, lambda t: t.update(
      {"model.layers.0.mlp.up_proj.weight": np.zeros((96, 64), np.float32),
       "model.layers.7.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}))
  with pytest.raises(hf.CheckpointFormatError,
                     match=r"unexpected tensor 'model\.layers\.7"):
    hf.load_hf_params(path, cfg)

  with pytest.raises(hf.CheckpointFormatError, match="GPT2LMHeadModel"):
    hf.config_from_hf({"architectures": ["GPT2LMHeadModel"]})


def test_cli_import_export(tmp_path, capsys):
  _, path = _make_hf_model(tmp_path, tied=True, kv_heads=2)
  hf.run(["import", "--hf_dir", str(path), "--out", str(tmp_path / "w")])
  hf.run(["export", "--workdir", str(tmp_path / "w"), "--out",
          str(tmp_path / "o")])
  assert (tmp_path / "o" / "model.safetensors").exists()
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "model_config.json").write_text(
      (tmp_path / "w" / "model_config.json").read_text())
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    hf.run(["export", "--workdir", str(tmp_path / "empty"), "--out",
            str(tmp_path / "o2")])
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "neither checkpoints/ nor params/" in err


_KILLED_EXPORT = """
import os, signal, sys
from safetensors import numpy as st
from brorl_jax import hf
calls, save = [0], hf.save_file
def save_then_die(*a, **k):
  calls[0] += 1
  if calls[0] == int(sys.argv[3]):
    os.kill(os.getpid(), signal.SIGKILL)
  return save(*a, **k)
hf.save_file = save_then_die
hf.copy_tokenizer_files = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
from brorl_jax import checkpointing
cfg, params, tok = checkpointing.load_policy_params(sys.argv[1])
hf.save_hf(params, cfg, sys.argv[2], max_shard_bytes=60_000,
           tokenizer_dir=tok)
"""


def test_a_killed_export_leaves_nothing_import_accepts(tmp_path, capsys):
  import pathlib
  import subprocess
  import sys
  from brorl_jax.integrity import atomic
  root = pathlib.Path(__file__).resolve().parents[1]
  _, path = _make_hf_model(tmp_path, tied=True, kv_heads=2)
  hf.import_hf(path, tmp_path / "w")
  out = tmp_path / "o"

  def killed_export(at_shard):
    run = subprocess.run(
        [sys.executable, "-c", _KILLED_EXPORT, str(tmp_path / "w"), str(out),
         str(at_shard)], cwd=root, capture_output=True, text=True,
        timeout=600)
    assert run.returncode == -9, run.stderr[-2000:]

  # Killed before the tokenizer copy (every shard written): no export.
  killed_export(at_shard=10_000)
  assert not out.exists()
  partial = tmp_path / ".o.partial"
  assert (partial / "config.json").exists()     # the rest was written
  with pytest.raises(SystemExit):
    hf.run(["import", "--hf_dir", str(partial), "--out", str(tmp_path / "x")])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err == (f"error: {partial} is an incomplete export: it was not "
                 f"finished ({atomic.MARKER} says so); export it again "
                 "(python -m brorl_jax.hf export)")
  # A complete export, then a re-export killed mid-shards: the earlier one
  # stays whole (no stray shard) and is what import reads.
  hf.run(["export", "--workdir", str(tmp_path / "w"), "--out", str(out)])
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  assert atomic.MARKER in before and atomic.incomplete(out) is None
  killed_export(at_shard=2)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  hf.import_hf(out, tmp_path / "again")
  # Damage that a later copy makes (a shard lost) is named.
  (out / "model.safetensors").unlink()
  with pytest.raises(hf.CheckpointFormatError,
                     match="1 of its .* files are missing: model.safetensors"):
    hf.import_hf(out, tmp_path / "again2")
  # A torn model_config.json: one line naming it.
  (tmp_path / "w" / "model_config.json").write_text('{"vocab')
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    hf.run(["export", "--workdir", str(tmp_path / "w"), "--out",
            str(tmp_path / "o3")])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {tmp_path / 'w' / 'model_config.json'} is "
                        "damaged (JSONDecodeError") and "\n" not in err
