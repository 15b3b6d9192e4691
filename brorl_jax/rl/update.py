"""The jitted policy update: mini-batches x micro-batches of PPO-clip.

One RL step's rollouts ([P, G] groups) become R = P * G rows of
`prompt ++ response`. Rows are shuffled and split into `num_minibatches`
optimizer updates (PPO style); each mini-batch is accumulated over
micro-batches of `micro_batch_size` rows in a `lax.scan`, so memory is bound
by one micro-batch. Every micro-batch loss is normalized by its mini-batch's
token (or sequence) count, so the accumulated gradient equals the full
mini-batch gradient. A mini-batch whose loss or gradient is not finite
leaves parameters and optimizer state untouched and is counted in
`state.skipped`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from brorl_jax.config import check
from brorl_jax.model import attention as attn_lib
from brorl_jax.model.sharding import MeshRules, activation_rules, constrain
from brorl_jax.model.transformer import Policy, positions_from_valid
from brorl_jax.rl import losses
from brorl_jax.rl.logprobs import token_logprobs
from brorl_jax.rl.train_state import TrainState

SECTION = "algo"


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """How one step's rollouts are turned into optimizer updates (`algo`).

  Attributes:
    num_minibatches: optimizer updates per RL step (PPO mini-batches); BroRL
      keeps this number when N grows, so each mini-batch grows with N.
    micro_batch_size: rows (rollouts) per gradient micro-batch; bounds the
      activation memory. Must divide the rows of a mini-batch.
    shuffle: shuffle rows before splitting them into mini-batches.
    vocab_chunk: vocabulary tile of the chunked log-prob computation.
    seq_chunk: sequence tile of the chunked log-prob computation.
  """

  num_minibatches: int = 1
  micro_batch_size: int = 8
  shuffle: bool = True
  vocab_chunk: int = 8192
  seq_chunk: int = 512

  def __post_init__(self):
    check(self.num_minibatches >= 1, f"{SECTION}.num_minibatches",
          "must be >= 1")
    check(self.micro_batch_size >= 1, f"{SECTION}.micro_batch_size",
          "must be >= 1")
    check(self.vocab_chunk >= 1 and self.seq_chunk >= 1,
          f"{SECTION}.vocab_chunk", "chunk sizes must be >= 1")

  def check_rows(self, rows: int) -> None:
    """Raises ConfigError unless `rows` split evenly."""
    check(rows % self.num_minibatches == 0, f"{SECTION}.num_minibatches",
          f"must divide the {rows} rollouts of a step "
          "(rollout.prompts_per_step * rollout.n)")
    per = rows // self.num_minibatches
    check(per % self.micro_batch_size == 0, f"{SECTION}.micro_batch_size",
          f"must divide the {per} rollouts of a mini-batch")


@struct.dataclass
class RolloutBatch:
  """One RL step's training data, on device.

  Attributes:
    prompt_tokens: [P, Lp] int32, left-padded.
    prompt_lengths: [P] int32.
    tokens: [P, G, T] int32 responses.
    logprobs: [P, G, T] f32 the sampler's log-probs (PPO's old log-probs).
    lengths: [P, G] int32 response lengths.
    advantages: [P, G] f32.
    mask: [P, G] bool, rollouts that enter the loss (valid, in a kept group).
  """

  prompt_tokens: jax.Array
  prompt_lengths: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  advantages: jax.Array
  mask: jax.Array


@struct.dataclass
class Rows:
  """Flattened `prompt ++ response` rows ([R, ...] or [M, K, mb, ...]).

  Attributes:
    inputs: [..., Lp + T - 1] int32 model inputs.
    valid: [..., Lp + T - 1] bool, real tokens (left padding False).
    targets: [..., T] int32 response tokens.
    loss_mask: [..., T] bool, response tokens that count.
    old_logp: [..., T] f32.
    advantages: [...] f32.
  """

  inputs: jax.Array
  valid: jax.Array
  targets: jax.Array
  loss_mask: jax.Array
  old_logp: jax.Array
  advantages: jax.Array


def make_rows(batch: RolloutBatch) -> Rows:
  """[P, G] groups -> R = P * G rows (the prompt repeated per rollout)."""
  p, g, t = batch.tokens.shape
  lp = batch.prompt_tokens.shape[1]
  prompt = jnp.repeat(batch.prompt_tokens, g, axis=0)            # [R, Lp]
  prompt_len = jnp.repeat(batch.prompt_lengths, g, axis=0)
  prompt_valid = jnp.arange(lp)[None] >= (lp - prompt_len)[:, None]
  response = batch.tokens.reshape(p * g, t)
  resp_valid = jnp.arange(t)[None] < batch.lengths.reshape(p * g)[:, None]
  # The last response token is only a target, never an input.
  return Rows(
      inputs=jnp.concatenate([prompt, response[:, :-1]], axis=1),
      valid=jnp.concatenate([prompt_valid, resp_valid[:, :-1]], axis=1),
      targets=response,
      loss_mask=resp_valid & batch.mask.reshape(p * g)[:, None],
      old_logp=batch.logprobs.reshape(p * g, t),
      advantages=batch.advantages.reshape(p * g).astype(jnp.float32))


def response_logprobs(policy: Policy, params: Any, inputs: jax.Array,
                      valid: jax.Array, targets: jax.Array, *,
                      temperature: float, vocab_chunk: int, seq_chunk: int,
                      with_entropy: bool = True):
  """Log-probs (and entropies) of the response tokens of `prompt ++ response`
  rows under softmax(logits / temperature), chunked over the vocabulary.

  Returns:
    (logp [B, T] f32, entropy [B, T] f32 or None).
  """
  model = policy.bind(params)
  hidden, _ = model(inputs, positions_from_valid(valid),
                    attn_lib.FullAttention(
                        valid, backend=policy.cfg.attention_backend))
  t = targets.shape[1]
  hidden = hidden[:, -t:]                     # positions predicting responses
  return token_logprobs(hidden, model.unembed_matrix(), targets, temperature,
                        vocab_chunk=vocab_chunk, seq_chunk=seq_chunk,
                        return_entropy=with_entropy)


def _tree_where(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _combine_minibatches(stacked: dict[str, jax.Array]) -> dict[str, Any]:
  """Mini-batch metrics [M] -> step metrics."""
  out = {}
  for key, value in stacked.items():
    if key in losses.MAX_KEYS:
      out[key] = value.max()
    elif key in losses.MIN_KEYS:
      out[key] = value.min()
    elif key in ("num_tokens", "num_sequences", "skipped"):
      out[key] = value.sum()
    else:
      out[key] = value.mean()
  # The first mini-batch runs with the sampler's parameters: its log-prob
  # gap is the sampler/trainer mismatch of the same tokens.
  out["logp_diff_mean"] = stacked["logp_diff_mean"][0]
  out["logp_diff_max"] = stacked["logp_diff_max"][0]
  return out


def make_update_fn(policy: Policy, cfg: UpdateConfig,
                   loss_cfg: losses.LossConfig,
                   optimizer: optax.GradientTransformation, *,
                   temperature: float, mesh_rules: MeshRules | None = None
                   ) -> Callable[[TrainState, RolloutBatch, jax.Array],
                                 tuple[TrainState, dict]]:
  """The (un-jitted) update: `(state, batch, rng) -> (state, metrics)`."""

  def loss_fn(params, micro: Rows, normalizer, ref_params):
    logp, entropy = response_logprobs(
        policy, params, micro.inputs, micro.valid, micro.targets,
        temperature=temperature, vocab_chunk=cfg.vocab_chunk,
        seq_chunk=cfg.seq_chunk)
    ref_logp = None
    if ref_params is not None:
      ref_logp, _ = response_logprobs(
          policy, jax.lax.stop_gradient(ref_params), micro.inputs,
          micro.valid, micro.targets, temperature=temperature,
          vocab_chunk=cfg.vocab_chunk, seq_chunk=cfg.seq_chunk,
          with_entropy=False)
    return losses.policy_loss(logp, micro.old_logp, micro.advantages,
                              micro.loss_mask, loss_cfg, ref_logp=ref_logp,
                              entropy=entropy, normalizer=normalizer)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def minibatch_update(state: TrainState, mini: Rows):
    normalizer = losses.loss_normalizer(mini.loss_mask, loss_cfg.aggregation)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                         state.params)

    def micro_step(acc, micro: Rows):
      micro = jax.tree.map(lambda x: constrain(
          x, ("batch",) + (None,) * (x.ndim - 1)), micro)

      def compute(acc):
        (loss, aux), grads = grad_fn(state.params, micro, normalizer,
                                     state.ref_params)
        return (jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc,
                             grads), (loss, aux))

      def skip(acc):
        # Every row of this micro-batch is masked (dropped groups sorted to
        # the end): its gradient is exactly zero, so skip the work.
        out = jax.eval_shape(compute, acc)[1]
        return acc, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out)

      return jax.lax.cond(micro.loss_mask.any(), compute, skip, acc)

    grads, (micro_losses, micro_aux) = jax.lax.scan(micro_step, zeros, mini)
    loss = micro_losses.sum()
    metrics = losses.reduce_aux(micro_aux)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A mini-batch without a single trained token (every group dropped by
    # dynamic sampling) is not an optimizer step: no weight decay, no count.
    apply = ok & (normalizer > 0)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(
        params=_tree_where(apply, params, state.params),
        opt_state=_tree_where(apply, opt_state, state.opt_state),
        updates=state.updates + apply.astype(jnp.int32),
        skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics.update(loss=loss, grad_norm=grad_norm,
                   update_norm=jnp.where(apply, optax.tree.norm(updates), 0.0),
                   skipped=(~ok).astype(jnp.int32))
    return new, metrics

  def update(state: TrainState, batch: RolloutBatch, rng: jax.Array):
    with activation_rules(mesh_rules):
      rows = make_rows(batch)
      r = rows.targets.shape[0]
      cfg.check_rows(r)
      if cfg.shuffle:
        perm = jax.random.permutation(rng, r)
        rows = jax.tree.map(lambda x: jnp.take(x, perm, axis=0), rows)
      m = cfg.num_minibatches
      k = r // m // cfg.micro_batch_size
      # Within each mini-batch, rows that train come first (stable order):
      # rows of groups dropped by dynamic sampling then fill whole
      # micro-batches at the end, which `micro_step` skips.
      rows = jax.tree.map(lambda x: x.reshape(m, r // m, *x.shape[1:]), rows)
      order = jnp.argsort(~rows.loss_mask.any(-1), axis=1, stable=True)
      rows = jax.tree.map(lambda x: jnp.take_along_axis(
          x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1), rows)
      rows = jax.tree.map(
          lambda x: x.reshape(m, k, cfg.micro_batch_size, *x.shape[2:]), rows)
      state, stacked = jax.lax.scan(minibatch_update, state, rows)
      metrics = _combine_minibatches(stacked)
      metrics["param_norm"] = optax.tree.norm(state.params)
      return state.replace(step=state.step + 1), metrics

  return update
