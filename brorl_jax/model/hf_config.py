"""config.json <-> `ModelConfig` for the Hugging Face architectures we run.

`Qwen2ForCausalLM`, `Qwen3ForCausalLM` and `LlamaForCausalLM` are one
decoder with flags (model/config.py): q/k/v biases (Qwen2), per-head q/k
norms (Qwen3), Llama 3's RoPE scaling, an explicit head dim, tied or untied
embeddings. Import reads each field as transformers (v5) does, its config
class's default where config.json leaves it out, and refuses in one line
naming the field what the decoder cannot represent (sliding windows, other
RoPE types, attention/MLP biases beyond Qwen2's, MoE, quantized weights,
other activations). Export writes the architecture the flags describe: a
Llama stays a Llama, with its RoPE scaling and its list of eos ids.

No file is read or written here (hf.py does the I/O).
"""

from __future__ import annotations

from typing import Any

from brorl_jax.model.config import ROPE_TYPES, ModelConfig


class CheckpointFormatError(ValueError):
  """A Hugging Face checkpoint that does not match the expected layout."""


# HF architecture -> its family (also its config.json model_type).
ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# The config classes' defaults (transformers 5: Qwen2Config, Qwen3Config,
# LlamaConfig) for the fields config.json may leave out. head_dim None means
# hidden_size // num_attention_heads; num_key_value_heads None means
# num_attention_heads.
_QWEN_DEFAULTS = dict(
    vocab_size=151_936, hidden_size=4096, intermediate_size=22_016,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    head_dim=None, max_position_embeddings=32_768, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
_DEFAULTS = {
    "qwen2": _QWEN_DEFAULTS,
    "qwen3": dict(_QWEN_DEFAULTS, head_dim=128),
    "llama": dict(
        vocab_size=32_000, hidden_size=4096, intermediate_size=11_008,
        num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, head_dim=None,
        max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}
_DEFAULT_THETA = 10_000.0
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor")
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts",
               "moe_intermediate_size")


def _refuse(field: str, value: Any, why: str) -> CheckpointFormatError:
  return CheckpointFormatError(
      f"config.json {field}={value!r} is not supported: {why}")


def architecture_of(cfg: ModelConfig) -> str:
  """The HF architecture that represents `cfg` exactly: q/k norms are
  Qwen3's, q/k/v biases Qwen2's, neither Llama's."""
  if cfg.qk_norm:
    return "Qwen3ForCausalLM"
  return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


def _rope_fields(hf_config: dict[str, Any], max_positions: int
                 ) -> dict[str, Any]:
  """ModelConfig's rope_* fields from `rope_parameters` (v5) or
  `rope_scaling` and a top-level `rope_theta` (v4)."""
  key = "rope_parameters" if hf_config.get("rope_parameters") else \
      "rope_scaling"
  rope = dict(hf_config.get(key) or {})
  if any(isinstance(v, dict) for v in rope.values()):
    raise _refuse(key, rope, "RoPE per layer type (one RoPE for all layers "
                  "is implemented)")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise _refuse(f"{key}.rope_type", kind,
                  f"the implemented RoPE types are {', '.join(ROPE_TYPES)}")
  partial = rope.get("partial_rotary_factor",
                     hf_config.get("partial_rotary_factor"))
  if partial not in (None, 1, 1.0):
    raise _refuse("partial_rotary_factor", partial,
                  "RoPE over the whole head is implemented")
  theta = rope.get("rope_theta") or hf_config.get("rope_theta") or \
      _DEFAULT_THETA
  out = dict(rope_theta=float(theta), rope_type=kind)
  if kind == "llama3":
    for name in _LLAMA3_FIELDS:
      if rope.get(name) is None:
        raise CheckpointFormatError(
            f"config.json {key}.{name} is missing: rope_type 'llama3' needs "
            f"{', '.join(_LLAMA3_FIELDS)}")
    # transformers: a top-level original_max_position_embeddings wins, then
    # the RoPE dict's, then max_position_embeddings.
    original = hf_config.get("original_max_position_embeddings") or \
        rope.get("original_max_position_embeddings") or max_positions
    out.update(rope_factor=float(rope["factor"]),
               rope_low_freq_factor=float(rope["low_freq_factor"]),
               rope_high_freq_factor=float(rope["high_freq_factor"]),
               rope_original_max_position_embeddings=int(original))
  return out


def _check_representable(hf_config: dict[str, Any], family: str) -> None:
  """Raises on the first field whose value the decoder cannot run."""
  act = hf_config.get("hidden_act", "silu")
  if act != "silu":
    raise _refuse("hidden_act", act, "the MLP is SwiGLU (silu)")
  if hf_config.get("use_sliding_window"):
    raise _refuse("use_sliding_window", True,
                  "sliding-window attention is not implemented (Qwen2/Qwen3 "
                  "checkpoints ship it off)")
  layer_types = hf_config.get("layer_types") or ()
  other = sorted(set(layer_types) - {"full_attention"})
  if other:
    raise _refuse("layer_types", other[0],
                  "every layer must be 'full_attention'")
  if family != "qwen2" and hf_config.get("attention_bias"):
    raise _refuse("attention_bias", True,
                  "q/k/v/o biases are not implemented (Qwen2's q/k/v biases "
                  "are)")
  if hf_config.get("mlp_bias"):
    raise _refuse("mlp_bias", True, "the MLP has no biases")
  for name in _MOE_FIELDS:
    if hf_config.get(name):
      raise _refuse(name, hf_config[name],
                    "mixture-of-experts layers are not implemented")
  if hf_config.get("quantization_config"):
    raise _refuse("quantization_config",
                  hf_config["quantization_config"].get("quant_method", "?"),
                  "import unquantized (bf16/f32) weights")


def _eos(value: Any) -> int | tuple[int, ...] | None:
  if isinstance(value, (list, tuple)):
    return int(value[0]) if len(value) == 1 else tuple(int(v) for v in value)
  return value


def config_from_hf(hf_config: dict[str, Any], *, param_dtype: str = "float32",
                   dtype: str = "float32") -> ModelConfig:
  """A `ModelConfig` from a Hugging Face config.json dict.

  Raises:
    CheckpointFormatError: naming the field, for an architecture or a
      setting the decoder cannot represent.
  """
  archs = hf_config.get("architectures") or [hf_config.get("model_type", "?")]
  if archs[0] not in ARCHITECTURES:
    raise CheckpointFormatError(
        f"unsupported architecture {archs[0]!r} in config.json; supported: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  family = ARCHITECTURES[archs[0]]
  _check_representable(hf_config, family)
  # A field left out takes the class default; an explicit null stays null
  # (eos_token_id), except where transformers derives it (head_dim, kv heads).
  get = {**_DEFAULTS[family], **hf_config}.get
  d, n = get("hidden_size"), get("num_attention_heads")
  max_positions = get("max_position_embeddings")
  return ModelConfig(
      vocab_size=get("vocab_size"), embed_dim=d,
      num_layers=get("num_hidden_layers"), num_heads=n,
      num_kv_heads=get("num_key_value_heads") or n,
      head_dim=get("head_dim") or d // n,
      mlp_dim=get("intermediate_size"),
      rms_norm_eps=float(get("rms_norm_eps")),
      tie_embeddings=bool(get("tie_word_embeddings")),
      qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
      **_rope_fields(hf_config, max_positions),
      max_position_embeddings=max_positions,
      param_dtype=param_dtype, dtype=dtype,
      bos_id=get("bos_token_id"), eos_id=_eos(get("eos_token_id")))


def _rope_json(cfg: ModelConfig) -> dict[str, Any]:
  rope = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
  if cfg.rope_type == "llama3":
    rope.update(factor=cfg.rope_factor,
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=(
                    cfg.rope_original_max_position_embeddings))
  return rope


def _eos_json(eos: int | tuple[int, ...] | None) -> int | list[int] | None:
  return list(eos) if isinstance(eos, tuple) else eos


def config_to_hf(cfg: ModelConfig, torch_dtype: str) -> dict[str, Any]:
  """A config.json that transformers (v4 and v5) and vLLM load as
  `architecture_of(cfg)`.

  RoPE is written both ways: `rope_parameters` (v5) and `rope_theta` /
  `rope_scaling` (v4 readers, vLLM).
  """
  arch = architecture_of(cfg)
  family = ARCHITECTURES[arch]
  rope = _rope_json(cfg)
  out = {
      "architectures": [arch], "model_type": family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "hidden_act": "silu", "max_position_embeddings":
          cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
      "rope_parameters": rope,
      "rope_scaling": None if cfg.rope_type == "default" else rope,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_dropout": 0.0, "initializer_range": 0.02,
      "use_cache": True, "bos_token_id": cfg.bos_id,
      "eos_token_id": _eos_json(cfg.eos_id), "torch_dtype": torch_dtype,
      "dtype": torch_dtype,
  }
  if family in ("qwen2", "qwen3"):
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=cfg.num_layers)
  if family in ("qwen3", "llama"):
    out["attention_bias"] = False
  if family == "llama":
    out.update(mlp_bias=False, pretraining_tp=1)
  return out


def generation_config(cfg: ModelConfig, stop_ids: tuple[int, ...] = ()
                      ) -> dict[str, Any]:
  """generation_config.json: the config's eos ids, then `stop_ids`."""
  eos = list(cfg.eos_id) if isinstance(cfg.eos_id, tuple) else (
      [cfg.eos_id] if cfg.eos_id is not None else [])
  eos += [i for i in stop_ids if i not in eos]
  return {"bos_token_id": cfg.bos_id,
          "eos_token_id": eos[0] if len(eos) == 1 else eos,
          "do_sample": True, "temperature": 0.6, "top_p": 0.95}
