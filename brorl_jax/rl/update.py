"""The jitted policy update: mini-batches x micro-batches of PPO-clip.

One RL step's rollouts ([P, G] groups) are R = P * G rows. They are laid
out in slots of c rollouts of one prompt (`slots`), shuffled in slots and
split into `num_minibatches` optimizer updates (PPO style); each mini-batch
is accumulated over micro-batches of `micro_batch_size` rows (U slots) in a
`lax.scan`, so memory is bound by one micro-batch. A micro-batch computes
each of its U prompts once, its rollouts attending to it
(`logprobs.prefixed_logprobs`): the policy's forward and backward, and the
KL reference's forward. With `shared_prefix` off every row is `prompt ++
response` (the same micro-batches, each prompt computed c times).

Every micro-batch loss is normalized by its mini-batch's token (or
sequence) count, so the accumulated gradient equals the full mini-batch
gradient. With `length_buckets` > 1 each micro-batch runs at the smallest
compiled length holding its longest row, and its prompts at the smallest
compiled width holding its longest (`buckets`). A mini-batch whose loss,
gradient or updated parameters are not finite leaves parameters and
optimizer state untouched and is counted in `state.skipped` (and
`optim/skipped_params` when only the result was not finite: a step too
large); `optim/param_norm_ratio` is the largest applied |new| / |old| of the
parameter norm (the host warns past `optim.param_norm_jump`). The guard is
a norm of the new parameters per mini-batch, carried to the next, so the
step's parameter norm costs no extra pass and no host sync.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from brorl_jax.config import check
from brorl_jax.model import prefixed_attention
from brorl_jax.model.attention_kernels import resolve_attention_backend
from brorl_jax.model.sharding import (MeshRules, activation_rules,
                                      active_platform, constrain)
from brorl_jax.model.transformer import Policy
from brorl_jax.rl import buckets, losses
from brorl_jax.rl import slots as slots_lib
from brorl_jax.rl.batch import RolloutBatch, make_rows
from brorl_jax.rl.logprobs import prefixed_logprobs, response_logprobs
from brorl_jax.rl.train_state import TrainState

SECTION = "algo"
log = logging.getLogger(__name__)


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
    shared_prefix: compute each prompt once per slot of c rollouts of it
      (`rl/slots.py`; c = gcd(micro_batch_size, rollout.n)), the rollouts
      attending to it; False: every rollout as its own row `prompt ++
      response` (the prompt computed c times; the baseline of `bench step`).
      Where c = 1 (a group size prime to the micro-batch) a slot shares
      nothing and the update takes the repeated rows.
    prompt_buckets: with `shared_prefix`, at most this many compiled prompt
      widths (halving `max_prompt_len`); each micro-batch runs its prompts
      at the smallest holding its longest real prompt. 1 = no cut.
  """

  num_minibatches: int = 1
  micro_batch_size: int = 8
  shuffle: bool = True
  vocab_chunk: int = 8192
  seq_chunk: int = 512
  length_buckets: int = 4
  shared_prefix: bool = True
  prompt_buckets: int = 2

  def __post_init__(self):
    check(self.num_minibatches >= 1, f"{SECTION}.num_minibatches",
          "must be >= 1")
    check(self.micro_batch_size >= 1, f"{SECTION}.micro_batch_size",
          "must be >= 1")
    check(self.vocab_chunk >= 1 and self.seq_chunk >= 1,
          f"{SECTION}.vocab_chunk", "chunk sizes must be >= 1")
    check(self.length_buckets >= 1, f"{SECTION}.length_buckets",
          "must be >= 1 (1 = no trimming)")
    check(self.prompt_buckets >= 1, f"{SECTION}.prompt_buckets",
          "must be >= 1 (1 = every prompt at max_prompt_len)")

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
OPTIM_KEYS = ("grad_norm", "update_norm", "param_norm", "skipped",
              "skipped_params", "skipped_trailing", "param_norm_ratio")
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
    elif key in ("num_tokens", "num_sequences", "skipped", "skipped_params"):
      out[key] = value.sum()
    elif key == "param_norm_ratio":
      out[key] = value.max()
    elif key == "param_norm":
      out[key] = value[-1]
    else:
      out[key] = value.mean()
  # The first mini-batch runs with the sampler's parameters: its log-prob
  # gap is the sampler/trainer mismatch of the same tokens.
  # Skipped mini-batches at the end of the step (the host adds them up
  # across steps: `optim.max_consecutive_skips`).
  out["skipped_trailing"] = jnp.cumprod(stacked["skipped"][::-1]).sum()
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
  chunks = dict(temperature=temperature, vocab_chunk=cfg.vocab_chunk,
                seq_chunk=cfg.seq_chunk)

  def logprobs(params, micro, with_entropy=True):
    if isinstance(micro, slots_lib.Slots):
      return prefixed_logprobs(policy, params, micro,
                               with_entropy=with_entropy, **chunks)
    return response_logprobs(policy, params, micro.inputs, micro.valid,
                             micro.targets, with_entropy=with_entropy,
                             **chunks)

  def loss_fn(params, micro, normalizer, ref_params):
    logp, entropy = logprobs(params, micro)
    ref_logp = None
    if ref_params is not None:
      ref_logp, _ = logprobs(jax.lax.stop_gradient(ref_params), micro,
                             with_entropy=False)
    if isinstance(micro, slots_lib.Slots):   # rows slot-major, [U * c, ...]
      old_logp, advantages, loss_mask = (
          micro.flat(x) for x in (micro.old_logp, micro.advantages,
                                  micro.loss_mask))
    else:
      old_logp, advantages, loss_mask = (micro.old_logp, micro.advantages,
                                         micro.loss_mask)
    return losses.policy_loss(logp, old_logp, advantages, loss_mask, loss_cfg,
                              ref_logp=ref_logp, entropy=entropy,
                              normalizer=normalizer)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def minibatch_update(state: TrainState, norm: jax.Array,
                       micro_batch: Callable, counts: jax.Array,
                       order: jax.Array):
    """One optimizer step on the rows `order` ([K, U, c] indices) names;
    `micro_batch(index)` gives one micro-batch's `(branch, branches)`;
    `norm` is the norm of `state.params` (returned for the new ones)."""
    normalizer = losses.counts_normalizer(counts[order], loss_cfg.aggregation)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                         state.params)

    def compute(acc, micro):
      (loss, aux), grads = grad_fn(state.params, micro, normalizer,
                                   state.ref_params)
      return (jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc,
                           grads), (loss, aux))

    def micro_step(acc, index: jax.Array):
      branch, cuts = micro_batch(index)

      def skip(acc):
        # Every row of this micro-batch is masked (dropped groups sorted to
        # the end): its gradient is exactly zero, so skip the work.
        out = jax.eval_shape(lambda a: compute(a, cuts[-1]()), acc)[1]
        return acc, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), out)

      # Branch 0 skips; branch 1 + i runs the micro-batch at cut i.
      branches = [skip] + [lambda acc, f=f: compute(acc, f()) for f in cuts]
      return jax.lax.switch(branch, branches, acc)

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
    # The result guard: finite loss and gradient can still give non-finite
    # parameters (a learning rate of 1e39, an optimizer overflow). Such an
    # update is not applied; the run's parameters stay finite, so no
    # checkpoint can hold non-finite ones from training.
    new_norm = optax.tree.norm(params)
    result_ok = jnp.isfinite(new_norm)
    apply = apply & result_ok
    bad = ~(ok & result_ok)
    new = state.replace(
        params=_tree_where(apply, params, state.params),
        opt_state=_tree_where(apply, opt_state, state.opt_state),
        updates=state.updates + apply.astype(jnp.int32),
        skipped=state.skipped + bad.astype(jnp.int32))
    norm_after = jnp.where(apply, new_norm, norm)
    metrics.update(loss=loss, grad_norm=grad_norm,
                   update_norm=jnp.where(apply, optax.tree.norm(updates), 0.0),
                   skipped=bad.astype(jnp.int32),
                   skipped_params=(ok & ~result_ok).astype(jnp.int32),
                   param_norm=norm_after,
                   param_norm_ratio=jnp.where(
                       apply & (norm > 0), new_norm / jnp.maximum(norm, 1e-30),
                       1.0))
    return (new, norm_after), metrics

  def update(state: TrainState, batch: RolloutBatch, rng: jax.Array):
    with activation_rules(mesh_rules):
      p, g, t = batch.tokens.shape
      lp = batch.prompt_tokens.shape[1]
      cfg.check_rows(p * g)
      m = cfg.num_minibatches
      c = slots_lib.slot_rows(cfg.micro_batch_size, g)
      u = cfg.micro_batch_size // c
      backend = resolve_attention_backend(policy.cfg.attention_backend,
                                          active_platform())
      # A slot of one rollout shares nothing: repeated rows are cheaper.
      shared = cfg.shared_prefix and c > 1
      if shared and backend in prefixed_attention.FULL_ROW_BACKENDS:
        log.info("algo.shared_prefix with attention backend %r: its kernel "
                 "takes one length for queries and keys, so the attention "
                 "product runs on full prompt ++ response rows (the "
                 "projections, MLP and norms still compute each prompt "
                 "once; model/prefixed_attention.py)", backend)
      # Response buckets; the shared prefix's rows hold responses only.
      targets = buckets.bucket_targets(1 if shared else lp, t,
                                       cfg.length_buckets, backend)
      need = slots_lib.need(batch)                           # [P, G]
      # Within each mini-batch, slots that train come first, longest first
      # when there are buckets: slots of groups dropped by dynamic sampling
      # then fill whole micro-batches at the end, which `micro_step` skips.
      order = slots_lib.slot_order(need, rng, m, c, shuffle=cfg.shuffle,
                                   by_length=cfg.length_buckets > 1)
      order = order.reshape(m, -1, u, c)                     # [M, K, U, c]
      # A response's counted tokens are its first `need` ones.
      need = counts = need.reshape(-1)                       # [R]
      if shared:
        widths = buckets.prompt_widths(lp, cfg.prompt_buckets, backend)

        def micro_batch(index):                              # [U, c]
          full = slots_lib.gather(batch, index)
          branch = buckets.slots_branch_index(need[index], full.prompt_lengths,
                                              widths, targets)
          return branch, [lambda w=w, r=r: slots_lib.cut(full, w, r)
                          for w in widths for r in targets]
      else:
        rows = make_rows(batch)

        def micro_batch(index):                              # [U, c]
          # This micro-batch's rows, gathered from the step's row-sharded
          # rows here: reordering all of them up front made XLA hold a full
          # copy of the step's rows on every device (`s32[65536,17407]` for
          # BroRL).
          micro = jax.tree.map(lambda x: constrain(
              jnp.take(x, index.reshape(-1), axis=0),
              ("batch",) + (None,) * (x.ndim - 1)), rows)
          return (buckets.branch_index(micro.loss_mask, targets),
                  [lambda r=r: buckets.cut(micro, r) for r in targets])

      (state, _), stacked = jax.lax.scan(
          lambda carry, o: minibatch_update(*carry, micro_batch, counts, o),
          (state, optax.tree.norm(state.params)), order)
      metrics = _combine_minibatches(stacked)
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
