"""Model configuration and presets of the decoder (Qwen2, Qwen3, Llama 3.x).

One decoder covers the three families with flags: q/k/v biases (Qwen2),
per-head q/k RMSNorm (Qwen3), Llama 3's RoPE frequency scaling, an explicit
head dim (Qwen3: 128 for any width), tied or untied embeddings.

Dimension letters used in einsum strings and shape comments everywhere in
brorl_jax (one legend, after gemma's):

  B  batch rows (= P * G during RL)     S  cache / key length
  P  prompts                            D  model (embedding) width
  G  rollout group size (per prompt)    N  query heads
  T  tokens (sequence positions)        K  key/value heads
  H  head dim                           Q  query heads per kv head (N = K * Q)
  F  MLP hidden width                   V  vocabulary

(gemma uses G for the GQA group inside attention; we reserve G for the rollout
group and call the queries-per-kv-head axis Q.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from brorl_jax.config import check, check_choice, unknown_key_error

DTYPES = ("float32", "bfloat16", "float16")
# How training/prefill attention is computed (model/attention_kernels.py);
# "auto": blockwise on CPU, cuDNN on GPU, splash on TPU.
ATTENTION_BACKENDS = ("auto", "reference", "blockwise", "splash", "cudnn",
                      "pallas_gpu")
# RoPE frequency schemes: "default" (inv_freq = theta^(-2i/H)) and Llama 3.1's
# "llama3" (low frequencies divided by `rope_factor`, a smooth band between).
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_position_embeddings")
# The Pallas kernels' blocks (model/pallas_attention.py runs them; the
# update's length buckets round to them through attention_kernels, which
# defers importing the kernels). Splash: 512 (ENV.md §12's measured AOT
# compile), multiples of 128. The GPU kernel's default forward block (its
# backward blocks are 32).
SPLASH_BLOCK = 512
GPU_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the decoder.

  Attributes:
    vocab_size: V, rows of the embedding (HF `vocab_size`; may exceed the
      tokenizer's ids: Qwen2 pads 151,665 ids to 151,936 rows).
    embed_dim: D, HF `hidden_size`.
    num_layers: HF `num_hidden_layers`.
    num_heads: N, query heads.
    num_kv_heads: K, key/value heads (GQA when K < N).
    head_dim: H (HF `head_dim`; Qwen3 uses 128 whatever D / N is).
    mlp_dim: F, HF `intermediate_size` (SwiGLU).
    rope_theta: RoPE base.
    rms_norm_eps: RMSNorm epsilon.
    tie_embeddings: share the input embedding with the output projection.
    qkv_bias: q/k/v projections carry a bias (Qwen2: True; Qwen3, Llama:
      False).
    qk_norm: an RMSNorm over H on every query and key head, after the
      projection and before RoPE (Qwen3's q_norm / k_norm; one [H] scale
      shared by the heads). Exclusive with `qkv_bias` (no HF architecture has
      both).
    rope_type: one of `ROPE_TYPES` (HF `rope_parameters.rope_type`).
    rope_factor / rope_low_freq_factor / rope_high_freq_factor /
      rope_original_max_position_embeddings: the "llama3" scaling's
      parameters (HF `factor`, `low_freq_factor`, `high_freq_factor`,
      `original_max_position_embeddings`; Llama 3.1: 8, 1, 4, 8192); None
      with "default".
    max_position_embeddings: longest position the checkpoint supports.
    param_dtype: storage dtype of the parameters.
    dtype: compute dtype of matmuls (bf16 on accelerators, f32 in CPU tests).
      Softmax, norms and log-probs are always computed in f32.
    remat: rematerialize each decoder block in the backward pass.
    attention_backend: how the softmax products are computed, one of
      `ATTENTION_BACKENDS` (training/prefill: model/attention_kernels.py;
      the decode's suffix: rollout/suffix_attention.py); "auto" picks by
      platform (cpu: blockwise, gpu: cudnn, tpu: splash). A run choice like
      `dtype`: not part of the checkpoint.
    bos_id / eos_id: the checkpoint's config.json token ids (informational;
      the tokenizer decides what is prepended and where sampling stops);
      eos_id may be a tuple (Llama 3.1 Instruct lists three).
  """

  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = True
  qk_norm: bool = False
  rope_type: str = "default"
  rope_factor: float | None = None
  rope_low_freq_factor: float | None = None
  rope_high_freq_factor: float | None = None
  rope_original_max_position_embeddings: int | None = None
  max_position_embeddings: int = 32_768
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  attention_backend: str = "auto"
  bos_id: int | None = None
  eos_id: int | tuple[int, ...] | None = None

  def __post_init__(self):
    if isinstance(self.eos_id, list):  # from model_config.json
      object.__setattr__(self, "eos_id", tuple(self.eos_id))
    for key in ("vocab_size", "embed_dim", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "mlp_dim",
                "max_position_embeddings"):
      value = getattr(self, key)
      check(isinstance(value, int) and value > 0, f"model.{key}",
            f"must be a positive integer, got {value!r}")
    check(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
          f"must divide model.num_heads={self.num_heads}, "
          f"got {self.num_kv_heads}")
    check(self.rope_theta > 0, "model.rope_theta", "must be > 0")
    check(self.rms_norm_eps > 0, "model.rms_norm_eps", "must be > 0")
    check_choice(self.param_dtype, "model.param_dtype", DTYPES)
    check_choice(self.dtype, "model.dtype", DTYPES)
    check_choice(self.attention_backend, "model.attention_backend",
                 ATTENTION_BACKENDS)
    check(not (self.qk_norm and self.qkv_bias), "model.qkv_bias",
          "must be False with model.qk_norm=True (Qwen3 has q/k norms and no "
          "biases; no Hugging Face architecture has both)")
    check_choice(self.rope_type, "model.rope_type", ROPE_TYPES)
    if self.rope_type == "default":
      for key in _LLAMA3_KEYS:
        check(getattr(self, key) is None, f"model.{key}",
              "is only used with model.rope_type='llama3' (None here)")
    else:
      for key in _LLAMA3_KEYS:
        check(getattr(self, key) is not None, f"model.{key}",
              "is required with model.rope_type='llama3'")
      check(self.rope_factor > 0, "model.rope_factor",
            f"must be > 0, got {self.rope_factor}")
      check(0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
            "model.rope_low_freq_factor",
            "must be > 0 and below model.rope_high_freq_factor, got "
            f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}")
      check(isinstance(self.rope_original_max_position_embeddings, int)
            and self.rope_original_max_position_embeddings > 0,
            "model.rope_original_max_position_embeddings",
            "must be a positive integer, got "
            f"{self.rope_original_max_position_embeddings!r}")

  def num_params(self) -> int:
    """Number of parameters (embedding counted once when tied)."""
    d, h = self.embed_dim, self.head_dim
    attn = d * h * (self.num_heads + 2 * self.num_kv_heads)
    attn += self.num_heads * h * d
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    if self.qk_norm:
      attn += 2 * h
    mlp = 3 * d * self.mlp_dim
    per_layer = attn + mlp + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + embed + d

  def replace(self, **kwargs: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)


_QWEN2_1P5B = dict(
    vocab_size=151_936, embed_dim=1536, num_layers=28, num_heads=12,
    num_kv_heads=2, head_dim=128, mlp_dim=8960, rms_norm_eps=1e-6,
    qkv_bias=True)

_QWEN3 = dict(
    vocab_size=151_936, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0,
    rms_norm_eps=1e-6, qkv_bias=False, qk_norm=True,
    max_position_embeddings=40_960, bos_id=151_643, eos_id=151_645)

_LLAMA3 = dict(
    vocab_size=128_256, num_kv_heads=8, rope_theta=500_000.0,
    rms_norm_eps=1e-5, qkv_bias=False, max_position_embeddings=131_072,
    rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
    rope_original_max_position_embeddings=8192, bos_id=128_000,
    eos_id=128_001)

PRESETS: dict[str, dict[str, Any]] = {
    # Tests: the real classes at toy size (GQA ratio 2, untied, biases).
    "tiny": dict(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, mlp_dim=128, rope_theta=10_000.0,
                 max_position_embeddings=2048),
    # The CPU demo: small enough to train in minutes on 2 cores.
    "demo": dict(vocab_size=512, embed_dim=128, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=32, mlp_dim=384, rope_theta=10_000.0,
                 tie_embeddings=True, max_position_embeddings=2048),
    # DeepSeek-R1-Distill-Qwen-1.5B (and Nemotron-Research-Reasoning-Qwen-1.5B)
    # config.json: untied, rope_theta 1e4, 128k positions, bos = eos = 151643
    # (its generation_config.json uses bos 151646).
    "qwen2_1p5b": dict(_QWEN2_1P5B, rope_theta=10_000.0, tie_embeddings=False,
                       max_position_embeddings=131_072, bos_id=151_643,
                       eos_id=151_643),
    # Qwen2.5-1.5B(-Instruct): the same shape, tied, rope_theta 1e6.
    "qwen2p5_1p5b": dict(_QWEN2_1P5B, rope_theta=1_000_000.0,
                         tie_embeddings=True, max_position_embeddings=32_768,
                         bos_id=151_643, eos_id=151_645),
    "qwen2p5_0p5b": dict(vocab_size=151_936, embed_dim=896, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64,
                         mlp_dim=4864, rope_theta=1_000_000.0,
                         tie_embeddings=True, max_position_embeddings=32_768,
                         bos_id=151_643, eos_id=151_645),
    "qwen2p5_7b": dict(vocab_size=152_064, embed_dim=3584, num_layers=28,
                       num_heads=28, num_kv_heads=4, head_dim=128,
                       mlp_dim=18_944, rope_theta=1_000_000.0,
                       tie_embeddings=False, max_position_embeddings=32_768,
                       bos_id=151_643, eos_id=151_645),
    # Qwen3 dense (Qwen/Qwen3-{0.6B,1.7B,4B,8B} config.json): q/k norms, no
    # biases, head_dim 128 at every width, rope_theta 1e6, 40,960 positions,
    # eos 151645 (the post-trained models; the -Base ones end with 151643).
    "qwen3_0p6b": dict(_QWEN3, embed_dim=1024, num_layers=28, num_heads=16,
                       mlp_dim=3072, tie_embeddings=True),
    "qwen3_1p7b": dict(_QWEN3, embed_dim=2048, num_layers=28, num_heads=16,
                       mlp_dim=6144, tie_embeddings=True),
    "qwen3_4b": dict(_QWEN3, embed_dim=2560, num_layers=36, num_heads=32,
                     mlp_dim=9728, tie_embeddings=True),
    "qwen3_8b": dict(_QWEN3, embed_dim=4096, num_layers=36, num_heads=32,
                     mlp_dim=12_288, tie_embeddings=False),
    # Llama 3.x base models (meta-llama/Llama-3.2-1B, -3.2-3B, -3.1-8B
    # config.json): no biases, rope_theta 5e5 with the "llama3" scaling
    # (factor 32 for 3.2, 8 for 3.1), 128k positions, eps 1e-5, bos 128000,
    # eos 128001 (the Instruct models list 128001, 128008, 128009).
    "llama3_2_1b": dict(_LLAMA3, embed_dim=2048, num_layers=16, num_heads=32,
                        head_dim=64, mlp_dim=8192, rope_factor=32.0,
                        tie_embeddings=True),
    "llama3_2_3b": dict(_LLAMA3, embed_dim=3072, num_layers=28, num_heads=24,
                        head_dim=128, mlp_dim=8192, rope_factor=32.0,
                        tie_embeddings=True),
    "llama3_1_8b": dict(_LLAMA3, embed_dim=4096, num_layers=32, num_heads=32,
                        head_dim=128, mlp_dim=14_336, rope_factor=8.0,
                        tie_embeddings=False),
}


def model_config(preset: str | None = None,
                 overrides: Mapping[str, Any] | None = None) -> ModelConfig:
  """Builds a `ModelConfig` from a preset name and overrides.

  Args:
    preset: one of `PRESETS`, or None to take every field from `overrides`.
    overrides: field values that replace the preset's.

  Returns:
    The validated config.
  """
  fields = {}
  if preset is not None:
    check_choice(preset, "model.preset", PRESETS)
    fields.update(PRESETS[preset])
  # None keeps the preset's value: configs/base.py lists every field as a
  # typed None so that each can be overridden on the command line.
  fields.update({k: v for k, v in dict(overrides or {}).items()
                 if v is not None})
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise unknown_key_error(f"model.{unknown[0]}", known | {"preset"})
  missing = sorted(f.name for f in dataclasses.fields(ModelConfig)
                   if f.default is dataclasses.MISSING and f.name not in fields)
  check(not missing, f"model.{missing[0]}" if missing else "model",
        "required (or set model.preset to one of "
        f"{', '.join(PRESETS)})")
  return ModelConfig(**fields)
