"""The jitted policy update: mini-batches x micro-batches of PPO-clip.

One RL step's rollouts ([P, G] groups) become R = P * G rows of
`prompt ++ response`. Rows are shuffled and split into `num_minibatches`
optimizer updates (PPO style); each mini-batch is accumulated over
micro-batches of `micro_batch_size` rows in a `lax.scan`, so memory is bound
by one micro-batch. Every micro-batch loss is normalized by its mini-batch's
token (or sequence) count, so the accumulated gradient equals the full
mini-batch gradient. With `length_buckets` > 1 each micro-batch runs at
the smallest compiled length holding its longest row (`buckets`). A
mini-batch whose loss or gradient is not finite leaves parameters and
optimizer state untouched and is counted in `state.skipped`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from brorl_jax.config import check
from brorl_jax.model.attention_kernels import resolve_attention_backend
from brorl_jax.model.sharding import (MeshRules, activation_rules,
                                      active_platform, constrain)
from brorl_jax.model.transformer import Policy
from brorl_jax.rl import buckets, losses
from brorl_jax.rl.batch import RolloutBatch, Rows, make_rows
from brorl_jax.rl.logprobs import response_logprobs
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
    length_buckets: at most this many compiled row lengths (halving the
      response from `max_new_tokens`); rows are sorted by length within a
      mini-batch and each micro-batch runs at the smallest that holds its
      longest row. 1 = every row at the maximum length.
  """

  num_minibatches: int = 1
  micro_batch_size: int = 8
  shuffle: bool = True
  vocab_chunk: int = 8192
  seq_chunk: int = 512
  length_buckets: int = 4

  def __post_init__(self):
    check(self.num_minibatches >= 1, f"{SECTION}.num_minibatches",
          "must be >= 1")
    check(self.micro_batch_size >= 1, f"{SECTION}.micro_batch_size",
          "must be >= 1")
    check(self.vocab_chunk >= 1 and self.seq_chunk >= 1,
          f"{SECTION}.vocab_chunk", "chunk sizes must be >= 1")
    check(self.length_buckets >= 1, f"{SECTION}.length_buckets",
          "must be >= 1 (1 = no trimming)")

  def check_rows(self, rows: int) -> None:
    """Raises ConfigError unless `rows` split evenly."""
    check(rows % self.num_minibatches == 0, f"{SECTION}.num_minibatches",
          f"must divide the {rows} rollouts of a step "
          "(rollout.prompts_per_step * rollout.n)")
    per = rows // self.num_minibatches
    check(per % self.micro_batch_size == 0, f"{SECTION}.micro_batch_size",
          f"must divide the {per} rollouts of a mini-batch")


def _tree_where(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


# The update's metrics outside the loss's namespace (`loss/...`): the
# optimizer's, and the sampler/trainer log-prob gap of the step's rollouts.
OPTIM_KEYS = ("grad_norm", "update_norm", "param_norm", "skipped")
ROLLOUT_KEYS = ("logp_diff_mean", "logp_diff_max")


def metric_name(key: str) -> str:
  """The logged name of one of the update's metrics: `optim/<key>`,
  `rollout/<key>` or `loss/<key>`."""
  if key in OPTIM_KEYS:
    return f"optim/{key}"
  if key in ROLLOUT_KEYS:
    return f"rollout/{key}"
  return f"loss/{key}"


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
  """The (un-jitted) update: `(state, batch, rng) -> (state, metrics)`,
  the metrics under their logged names (`metric_name`)."""

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

  def minibatch_update(state: TrainState, rows: Rows, counts: jax.Array,
                       order: jax.Array, targets: tuple[int, ...]):
    """One optimizer step on the rows `order` ([K, mb] indices) names."""
    normalizer = losses.counts_normalizer(counts[order], loss_cfg.aggregation)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                         state.params)

    def micro_step(acc, index: jax.Array):
      # This micro-batch's rows, gathered from the step's row-sharded rows
      # here: reordering all of them up front made XLA hold a full copy of
      # the step's rows on every device (`s32[65536,17407]` for BroRL).
      micro = jax.tree.map(lambda x: constrain(
          jnp.take(x, index, axis=0), ("batch",) + (None,) * (x.ndim - 1)),
                           rows)

      def compute(acc, r):
        (loss, aux), grads = grad_fn(state.params, buckets.cut(micro, r),
                                     normalizer, state.ref_params)
        return (jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc,
                             grads), (loss, aux))

      def skip(acc):
        # Every row of this micro-batch is masked (dropped groups sorted to
        # the end): its gradient is exactly zero, so skip the work.
        out = jax.eval_shape(lambda a: compute(a, targets[-1]), acc)[1]
        return acc, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out)

      # Branch 0 skips; branch 1 + i runs the rows cut to bucket i.
      branches = [skip] + [lambda acc, r=r: compute(acc, r) for r in targets]
      return jax.lax.switch(buckets.branch_index(micro.loss_mask, targets),
                            branches, acc)

    grads, (micro_losses, micro_aux) = jax.lax.scan(micro_step, zeros, order)
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
      perm = (jax.random.permutation(rng, r) if cfg.shuffle
              else jnp.arange(r))
      m = cfg.num_minibatches
      k = r // m // cfg.micro_batch_size
      t = rows.targets.shape[-1]
      targets = buckets.bucket_targets(
          rows.inputs.shape[-1] - t + 1, t, cfg.length_buckets,
          resolve_attention_backend(policy.cfg.attention_backend,
                                    active_platform()))
      # Within each mini-batch, rows that train come first (stable order),
      # longest first when there are buckets: rows of groups dropped by
      # dynamic sampling then fill whole micro-batches at the end, which
      # `micro_step` skips.
      order = buckets.row_order(rows.loss_mask, perm, m,
                                by_length=len(targets) > 1)
      counts = rows.loss_mask.sum(-1)                          # [R]
      state, stacked = jax.lax.scan(
          lambda s, o: minibatch_update(s, rows, counts, o, targets), state,
          order.reshape(m, k, cfg.micro_batch_size))
      metrics = _combine_minibatches(stacked)
      metrics["param_norm"] = optax.tree.norm(state.params)
      return (state.replace(step=state.step + 1),
              {metric_name(k): v for k, v in metrics.items()})

  return update


def batch_shardings(mesh_rules: MeshRules, batch: Any) -> Any:
  """The update's batch layout: rows (the leading axis) over `batch`."""
  return jax.tree.map(
      lambda x: mesh_rules.sharding(("batch",) + (None,) * (x.ndim - 1),
                                    x.shape), batch)


def compile_update(policy: Policy, cfg: UpdateConfig,
                   loss_cfg: losses.LossConfig,
                   optimizer: optax.GradientTransformation, *,
                   temperature: float, mesh_rules: MeshRules, state: Any,
                   batch: Any) -> jax.stages.Compiled:
  """AOT-compiles the update; the train loop and the dry run share it.

  Arguments as `lower_update`; returns the compiled `(state, batch, rng)
  -> (state, metrics)`.
  """
  return lower_update(policy, cfg, loss_cfg, optimizer,
                      temperature=temperature, mesh_rules=mesh_rules,
                      state=state, batch=batch).compile()


def lower_update(policy: Policy, cfg: UpdateConfig,
                 loss_cfg: losses.LossConfig,
                 optimizer: optax.GradientTransformation, *,
                 temperature: float, mesh_rules: MeshRules, state: Any,
                 batch: Any) -> jax.stages.Lowered:
  """The update lowered for abstract arguments (`compile_update` compiles
  it; the dry run compiles several programs side by side).

  Args:
    policy, cfg, loss_cfg, optimizer, temperature: as `make_update_fn`.
    mesh_rules: the training mesh (the rng and the metrics are replicated).
    state, batch: trees of `jax.ShapeDtypeStruct` carrying the shardings the
      compiled update takes (and returns, for the donated state). Abstract,
      because a concrete batch may sit in another layout, and jit refuses
      committed arguments whose sharding differs.

  Returns:
    The lowered `(state, batch, rng) -> (state, metrics)`.
  """
  fn = make_update_fn(policy, cfg, loss_cfg, optimizer,
                      temperature=temperature, mesh_rules=mesh_rules)
  rep = mesh_rules.replicated()
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  batch_sh = jax.tree.map(lambda x: x.sharding, batch)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
  jitted = jax.jit(fn, in_shardings=(state_sh, batch_sh, rep),
                   out_shardings=(state_sh, rep), donate_argnums=0)
  return jitted.lower(state, batch, key)
