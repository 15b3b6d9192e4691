"""Post-update (realized) mass-balance diagnostics, on device.

After the update, the same prompts' first-token distribution (a prefill-only
forward) gives the realized change of the sampled-correct and
sampled-incorrect first-token mass and of the entropy; re-scoring a subset of
the step's rollouts before and after the update gives the sequence-level
picture (mean Delta log pi of correct and incorrect rollouts, the share of
correct rollouts whose likelihood rose, the worst drop among them). These
are the LLM-scale counterparts of the simulator's Figure 3 metrics.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from brorl_jax.model.sharding import MeshRules, activation_rules, constrain
from brorl_jax.model.transformer import Policy
from brorl_jax.rl import mass_balance
from brorl_jax.rl.batch import RolloutBatch, Rows, make_rows
from brorl_jax.rl.logprobs import response_logprobs


def subset_rows(batch: RolloutBatch, rows: jax.Array) -> Rows:
  """The rows (flat P * G indices) `rows` [S] of a batch."""
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), make_rows(batch))


def sequence_logp(policy: Policy, params: Any, rows: Rows, *,
                  temperature: float, vocab_chunk: int, seq_chunk: int
                  ) -> jax.Array:
  """[S] total log-prob of each row's response under `params`."""
  logp, _ = response_logprobs(policy, params, rows.inputs, rows.valid,
                              rows.targets, temperature=temperature,
                              vocab_chunk=vocab_chunk, seq_chunk=seq_chunk,
                              with_entropy=False)
  in_response = jnp.arange(rows.targets.shape[1])[None] < \
      _lengths(rows)[:, None]
  return jnp.where(in_response, logp, 0.0).sum(-1)


def make_rescore_fn(policy: Policy, *, temperature: float, vocab_chunk: int,
                    seq_chunk: int, mesh_rules: MeshRules | None = None):
  """`(params, batch, rows [S]) -> [S]` sequence log-probs of the picked
  rows, laid out like the update: the picked rows split over the data axes
  (each device scores its share, not all S rows) under the train layout's
  activation rules. Un-jitted; `jit_rescore` jits it."""

  def rescore(params, rb: RolloutBatch, rows: jax.Array) -> jax.Array:
    with activation_rules(mesh_rules):
      sub = jax.tree.map(lambda x: constrain(
          x, ("batch",) + (None,) * (x.ndim - 1)), subset_rows(rb, rows))
      return sequence_logp(policy, params, sub, temperature=temperature,
                           vocab_chunk=vocab_chunk, seq_chunk=seq_chunk)
  return rescore


def jit_rescore(policy: Policy, *, mesh_rules: MeshRules | None = None,
                **kw):
  """The jitted re-scoring; its output [S] is replicated (it is small and
  compared on every process). The train loop and the dry run share it."""
  out = mesh_rules.replicated() if mesh_rules is not None else None
  return jax.jit(make_rescore_fn(policy, mesh_rules=mesh_rules, **kw),
                 out_shardings=out)


def _lengths(rows: Rows) -> jax.Array:
  """Response lengths of rows (the loss mask may be off for dropped
  groups; the valid mask of the inputs still holds the length)."""
  t = rows.targets.shape[1]
  # inputs = prompt ++ response[:-1]: the last t - 1 input slots are the
  # response's first t - 1 tokens; the final token is always a target.
  return rows.valid[:, -(t - 1):].sum(-1) + 1 if t > 1 else \
      jnp.ones(rows.valid.shape[:1], jnp.int32)


def realized(probs_before: jax.Array, probs_after: jax.Array,
             correct_mask: jax.Array, incorrect_mask: jax.Array,
             group_mask: jax.Array, logp_before: jax.Array,
             logp_after: jax.Array, row_correct: jax.Array,
             row_valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """All realized-change metrics as scalars (means over trained prompts);
  `row_valid` ([k] bool, default all) marks the re-scored rows that exist."""
  change = mass_balance.realized_first_token_change(
      probs_before, probs_after, correct_mask, incorrect_mask)
  denom = jnp.maximum(group_mask.sum(), 1)
  out = {k: jnp.where(group_mask, v, 0.0).sum() / denom
         for k, v in change.items()}
  if row_valid is None:
    row_valid = jnp.ones(row_correct.shape, bool)
  out.update(mass_balance.sequence_logp_change(
      logp_before, logp_after, row_correct, row_valid))
  return out


class StepDiagnostics:
  """The train loop's bookkeeping of the realized diagnostics of one step.

  `before` re-scores a random subset of the step's rollouts under the
  pre-update parameters; `after` re-scores them, and the kept prompts' first
  token, under the updated ones and returns the `mass/*` metrics;
  `after_update` first re-scores that first token with the sampler's prefill.
  """

  def __init__(self, policy: Policy, *, temperature: float, vocab_chunk: int,
               seq_chunk: int, rescore_rollouts: int,
               correct_threshold: float,
               mesh_rules: MeshRules | None = None):
    # Sharded like the update (`mesh_rules`: the train layout), so a pod
    # splits the re-scored rows instead of every device scoring all of them.
    self._seq = jit_rescore(policy, mesh_rules=mesh_rules,
                            temperature=temperature, vocab_chunk=vocab_chunk,
                            seq_chunk=seq_chunk)
    self._realized = jax.jit(realized)
    self.rescore_rollouts = rescore_rollouts
    self.correct_threshold = correct_threshold

  def before(self, params: Any, rb: RolloutBatch, key: jax.Array):
    """(rows [k], their sequence log-probs [k]) before the update, or None
    when no rollout is re-scored."""
    rows_total = rb.tokens.shape[0] * rb.tokens.shape[1]
    k = min(self.rescore_rollouts, rows_total)
    if k == 0:
      return None
    rows = jax.random.choice(key, rows_total, (k,), replace=False)
    return rows, self._seq(params, rb, rows)

  def after(self, params: Any, first_probs_after: jax.Array, before,
            prepared: Any) -> dict[str, jax.Array]:
    """The `mass/*` metrics of the realized change (device scalars).

    Args:
      params: the updated parameters (training layout).
      first_probs_after: [P, V] the kept prompts' first-token distribution
        under the updated policy.
      before: what `before` returned.
      prepared: the step's `batch.Prepared` (the kept groups' pre-update
        first-token distribution, rewards, masks and rows).
    """
    if before is None:
      return {}
    rows, logp_before = before
    logp_after = self._seq(params, prepared.batch, rows)
    row_correct = jnp.take(prepared.rewards.reshape(-1), rows) >= \
        self.correct_threshold
    # Padding rows of unequal groups (adaptive allocation) count nowhere.
    row_valid = jnp.take(prepared.valid.reshape(-1), rows)
    out = self._realized(prepared.first_probs, first_probs_after,
                         prepared.correct_mask, prepared.incorrect_mask,
                         prepared.group_mask, logp_before, logp_after,
                         row_correct, row_valid)
    return {f"mass/{k}": v for k, v in out.items()}

  def after_update(self, sampler: Any, params: Any, sample_params: Any,
                   before, prepared: Any) -> dict[str, jax.Array]:
    """`after`, with the kept prompts' first token re-scored by the sampler's
    prefill under the updated parameters.

    Args:
      sampler: the run's `rollout.Sampler` (`prefill`, `first_probs`).
      params: the updated parameters (training layout).
      sample_params: the sampler's copy of `params` (its layout and dtype).
      before, prepared: as `after`.
    """
    if before is None:
      return {}
    batch = prepared.batch
    pre = sampler.prefill(sample_params, batch.prompt_tokens,
                          batch.prompt_lengths)
    return self.after(params, sampler.first_probs(pre), before, prepared)
