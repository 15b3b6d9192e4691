"""The decoder (NNX) of Qwen2, Qwen3 and Llama 3.x, and its functional wrapper.

Modules are defined with NNX; at jit boundaries the parameters travel as a
plain nested dict of arrays (`params`), and `Policy.bind(params)` merges them
back into a module inside the traced function (STYLE.md §6). Parameter names
are stable and mapped to Hugging Face names in one table (`hf.py`):

  embedder/embedding                     [V, D]
  layer_{i}/attn_norm/scale              [D]
  layer_{i}/attn/{q,k,v}_proj            [D, N|K, H]   (+ {q,k,v}_bias [N|K, H])
  layer_{i}/attn/{q,k}_norm/scale        [H]           (qk_norm: Qwen3)
  layer_{i}/attn/o_proj                  [N, H, D]
  layer_{i}/mlp_norm/scale               [D]
  layer_{i}/mlp/{gate,up}_proj           [D, F];  down_proj [F, D]
  final_norm/scale                       [D]
  lm_head/kernel                         [D, V]        (untied only)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from brorl_jax.model import attention as attn_lib
from brorl_jax.model.config import ModelConfig
from brorl_jax.model.layers import MLP, Attention, RMSNorm, param
from brorl_jax.model.sharding import MeshRules, constrain, param_shardings

Params = dict[str, Any]


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps, cfg.param_dtype)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps, cfg.param_dtype)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, attention: Any,
               cache: Any) -> tuple[jax.Array, Any]:
    h, cache = self.attn(self.attn_norm(x), positions, attention, cache)
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ("batch", "length", "act_embed")), cache


class Transformer(nnx.Module):
  """Decoder: embedding, blocks, final norm, (un)tied output head."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedder = nnx.Dict(embedding=param(
        rngs, (cfg.vocab_size, cfg.embed_dim), cfg.param_dtype,
        ("vocab", "embed")))
    for i in range(cfg.num_layers):
      setattr(self, f"layer_{i}", Block(cfg, rngs))
    self.final_norm = RMSNorm(cfg.embed_dim, cfg.rms_norm_eps, cfg.param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Dict(kernel=param(
          rngs, (cfg.embed_dim, cfg.vocab_size), cfg.param_dtype,
          ("embed", "vocab")))

  @property
  def dtype(self):
    return jnp.dtype(self.cfg.dtype)

  def blocks(self) -> list[Block]:
    return [getattr(self, f"layer_{i}") for i in range(self.cfg.num_layers)]

  def embed(self, tokens: jax.Array) -> jax.Array:
    """[B, T] int32 -> [B, T, D] in the compute dtype."""
    table = self.embedder["embedding"][...]
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)
    return constrain(x, ("batch", "length", "act_embed"))

  def __call__(self, tokens: jax.Array, positions: jax.Array,
               attention: attn_lib.AttentionFn,
               caches: tuple[Any, ...] | None = None
               ) -> tuple[jax.Array, tuple[Any, ...]]:
    """Runs the decoder.

    Args:
      tokens: [B, T] int32.
      positions: [B, T] int32 RoPE positions (0 at each row's first real
        token; left padding gets any value, its keys are masked).
      attention: the attention strategy (mask and cache layout).
      caches: one cache per layer, in the strategy's format, or None.

    Returns:
      hidden: [B, T, D] final-normed hidden states (compute dtype); logits are
        `hidden @ unembed_matrix()`, taken in chunks by the callers that need
        log-probs (rl/logprobs.py).
      caches: the strategy's per-layer caches after this call.
    """
    x = self.embed(tokens)
    if caches is None:
      caches = (None,) * self.cfg.num_layers
    new_caches = []
    for block, cache in zip(self.blocks(), caches):
      if self.cfg.remat:
        x, cache = nnx.remat(Block.__call__)(block, x, positions, attention,
                                              cache)
      else:
        x, cache = block(x, positions, attention, cache)
      new_caches.append(cache)
    return self.final_norm(x), tuple(new_caches)

  def unembed_matrix(self, master: bool = False) -> jax.Array:
    """[D, V] output projection in the compute dtype (`master`: in the
    parameters' own dtype, for callers that cast it themselves)."""
    if self.cfg.tie_embeddings:
      w = self.embedder["embedding"][...].T
    else:
      w = self.lm_head["kernel"][...]
    return w if master else w.astype(self.dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, V] float32. Only for small T (decode, tests)."""
    return jnp.einsum("btd,dv->btv", hidden, self.unembed_matrix(),
                      preferred_element_type=jnp.float32)


def positions_from_valid(valid: jax.Array) -> jax.Array:
  """[B, T] bool (left padding False) -> [B, T] int32 positions from 0."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (static arg)
class Policy:
  """A model definition without its parameters.

  Attributes:
    cfg: the model config.
    graphdef: the NNX graph definition.
    abstract_state: the parameters' `nnx.State` of ShapeDtypeStructs.
    axes: a nested dict like `params`, of logical axis-name tuples.
  """

  cfg: ModelConfig
  graphdef: Any
  abstract_state: Any
  axes: Params

  @classmethod
  def create(cls, cfg: ModelConfig) -> "Policy":
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    axes = jax.tree.map(lambda v: v.get_metadata()["axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return cls(cfg, graphdef, state, nnx.to_pure_dict(axes))

  def abstract_params(self) -> Params:
    """The parameter tree of ShapeDtypeStructs (no shardings)."""
    return nnx.to_pure_dict(self.abstract_state)

  def shardings(self, mesh_rules: MeshRules) -> Params:
    """NamedShardings of the parameters under a layout."""
    return param_shardings(self.abstract_params(), self.axes, mesh_rules)

  def bind(self, params: Params) -> Transformer:
    """Merges a parameter tree into a module (call inside traced code)."""
    state = jax.tree.map(lambda x: x, self.abstract_state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def init(self, rng: jax.Array, mesh_rules: MeshRules | None = None
           ) -> Params:
    """Random parameters, created directly in their target sharding.

    Shapes first, shardings second, arrays last: the jitted initializer writes
    each parameter straight into its shards (no full copy on one device).
    """
    def init_fn(key):
      model = Transformer(self.cfg, nnx.Rngs(params=key))
      return nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if mesh_rules is None:
      return jax.jit(init_fn)(rng)
    return jax.jit(init_fn, out_shardings=self.shardings(mesh_rules))(rng)
