"""Model configuration and presets for the Qwen2-family decoder.

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
# The Pallas kernels' blocks (model/pallas_attention.py runs them; the
# update's length buckets round to them through attention_kernels, which
# defers importing the kernels). Splash: 512 (ENV.md §12's measured AOT
# compile), multiples of 128. The GPU kernel's default forward block (its
# backward blocks are 32).
SPLASH_BLOCK = 512
GPU_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Qwen2-architecture decoder.

  Attributes:
    vocab_size: V, rows of the embedding (HF `vocab_size`; may exceed the
      tokenizer's ids: Qwen2 pads 151,665 ids to 151,936 rows).
    embed_dim: D, HF `hidden_size`.
    num_layers: HF `num_hidden_layers`.
    num_heads: N, query heads.
    num_kv_heads: K, key/value heads (GQA when K < N).
    head_dim: H.
    mlp_dim: F, HF `intermediate_size` (SwiGLU).
    rope_theta: RoPE base.
    rms_norm_eps: RMSNorm epsilon.
    tie_embeddings: share the input embedding with the output projection.
    qkv_bias: q/k/v projections carry a bias (Qwen2: True; Llama: False).
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
      the tokenizer decides what is prepended and where sampling stops).
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
  max_position_embeddings: int = 32_768
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  attention_backend: str = "auto"
  bos_id: int | None = None
  eos_id: int | None = None

  def __post_init__(self):
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

  def num_params(self) -> int:
    """Number of parameters (embedding counted once when tied)."""
    d, h = self.embed_dim, self.head_dim
    attn = d * h * (self.num_heads + 2 * self.num_kv_heads)
    attn += self.num_heads * h * d
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
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
