"""config.json <-> ModelConfig: presets, defaults, refusals (no weights)."""

import json

import pytest

from brorl_jax import hf
from brorl_jax.model import hf_config
from brorl_jax.model.config import PRESETS, model_config

NEW_PRESETS = ("qwen3_0p6b", "qwen3_1p7b", "qwen3_4b", "qwen3_8b",
               "llama3_2_1b", "llama3_2_3b", "llama3_1_8b")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_json_round_trip(preset):
  cfg = model_config(preset)
  back = hf.config_from_hf(json.loads(json.dumps(
      hf.config_to_hf(cfg, "float32"))))
  assert back == cfg


def test_presets_match_the_published_sizes():
  # Meta's exact counts; Qwen's model cards give total and non-embedding
  # parameters to their precision (0.6 / 0.44, 1.7 / 1.4, 4.0 / 3.6,
  # 8.2 / 6.95 B).
  assert model_config("llama3_2_1b").num_params() == 1_235_814_400
  assert model_config("llama3_2_3b").num_params() == 3_212_749_824
  assert model_config("llama3_1_8b").num_params() == 8_030_261_248
  for preset, total, non_embedding in (("qwen3_0p6b", 0.6, 0.44),
                                       ("qwen3_1p7b", 1.7, 1.4),
                                       ("qwen3_4b", 4.0, 3.6),
                                       ("qwen3_8b", 8.2, 6.95)):
    c = model_config(preset)
    embed = c.vocab_size * c.embed_dim * (1 if c.tie_embeddings else 2)
    digits = len(str(non_embedding).split(".")[1])
    assert round(c.num_params() / 1e9, 1) == total, preset
    assert round((c.num_params() - embed) / 1e9, digits) == non_embedding


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_transformers_builds_the_preset_with_our_parameter_count(preset,
                                                                 tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = model_config(preset)
  (tmp_path / "config.json").write_text(json.dumps(
      hf.config_to_hf(cfg, "bfloat16")))
  hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
  with torch.device("meta"):  # shapes only
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
  assert type(model).__name__ == hf.architecture_of(cfg)
  assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
  assert hf_cfg.head_dim == cfg.head_dim
  assert hf_cfg.rope_parameters["rope_type"] == cfg.rope_type


def _llama(**changes):
  c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
       "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
       "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
       "max_position_embeddings": 1024, "tie_word_embeddings": True,
       "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                           "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64},
       "bos_token_id": 2, "eos_token_id": [3, 7]}
  c.update(changes)
  return c


def _qwen3(**changes):
  c = dict(_llama(), architectures=["Qwen3ForCausalLM"], model_type="qwen3",
           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  c.update(changes)
  return c


def test_fields_read_as_transformers_reads_them():
  cfg = hf.config_from_hf(_llama())
  assert (cfg.head_dim, cfg.qkv_bias, cfg.qk_norm) == (16, False, False)
  assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == (
      "llama3", 32.0, 500_000.0)
  assert cfg.rope_original_max_position_embeddings == 64
  assert cfg.eos_id == (3, 7)
  assert hf.config_to_hf(cfg, "float32")["eos_token_id"] == [3, 7]
  # transformers v4's spelling of the same config.
  v4 = _llama(rope_theta=500000.0, rope_scaling=dict(
      _llama()["rope_parameters"], rope_theta=None))
  del v4["rope_parameters"]
  assert hf.config_from_hf(v4) == cfg
  # original_max_position_embeddings: top level, then the RoPE dict, then
  # max_position_embeddings (transformers' standardize_rope_params).
  rope = dict(_llama()["rope_parameters"])
  del rope["original_max_position_embeddings"]
  assert hf.config_from_hf(_llama(rope_parameters=rope)) \
      .rope_original_max_position_embeddings == 1024
  assert hf.config_from_hf(_llama(original_max_position_embeddings=128)) \
      .rope_original_max_position_embeddings == 128
  # Qwen3Config's head_dim defaults to 128, LlamaConfig's to D / N.
  q = _qwen3()
  assert "head_dim" not in q and hf.config_from_hf(q).qk_norm
  assert hf.config_from_hf(q).head_dim == 128
  assert hf.config_from_hf(_llama(head_dim=32)).head_dim == 32
  assert hf.architecture_of(hf.config_from_hf(q)) == "Qwen3ForCausalLM"


@pytest.mark.parametrize("config,field", [
    (_llama(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
     "rope_parameters.rope_type='yarn'"),
    (dict(_llama(rope_scaling={"type": "linear", "factor": 2.0}),
          rope_parameters=None), "rope_scaling.rope_type='linear'"),
    (_llama(rope_parameters={"rope_type": "llama3", "factor": 8.0,
                             "high_freq_factor": 4.0}),
     "rope_parameters.low_freq_factor is missing"),
    (_llama(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (_qwen3(use_sliding_window=True, sliding_window=4096),
     "use_sliding_window=True"),
    (_qwen3(layer_types=["full_attention", "sliding_attention"]),
     "layer_types='sliding_attention'"),
    (_qwen3(attention_bias=True), "attention_bias=True"),
    (_llama(attention_bias=True), "attention_bias=True"),
    (_llama(mlp_bias=True), "mlp_bias=True"),
    (_qwen3(num_experts=8), "num_experts=8"),
    (_llama(hidden_act="gelu"), "hidden_act='gelu'"),
    (_llama(quantization_config={"quant_method": "gptq"}),
     "quantization_config='gptq'"),
    (_qwen3(architectures=["Qwen3MoeForCausalLM"]),
     "unsupported architecture 'Qwen3MoeForCausalLM'"),
])
def test_unrepresentable_configs_are_refused_naming_the_field(config, field):
  with pytest.raises(hf_config.CheckpointFormatError) as err:
    hf.config_from_hf(config)
  message = str(err.value)
  assert field in message and "\n" not in message, message


def test_cli_refusal_is_one_line_with_status_2(tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps(
      _llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0})))
  with pytest.raises(SystemExit) as exit_:
    hf.run(["import", "--hf_dir", str(tmp_path), "--out",
            str(tmp_path / "w")])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: config.json rope_parameters.rope_type=")
  assert len(err.splitlines()) == 1
