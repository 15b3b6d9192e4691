"""From scored rollouts to the update's batch (pure, jitted once per run).

  sampled groups [P_over, G] --(dynamic sampling, oversampling: keep the
  first P informative groups)--> [P, G] --(shaping, advantages)-->
  `Prepared`: the RolloutBatch + the step's group statistics + pre-update
  mass-balance terms.

Shapes never depend on how many groups survive: dropped or missing groups
are masked, so nothing recompiles.

Unequal groups (adaptive allocation, `rl/allocation.py`) use the same
representation end to end: the padded `[P, G_max]` arrays with a `valid`
mask, G_max = `rollout.n`. A prompt's group is its valid rollouts; invalid
ones count in no statistic, baseline, normalizer or mass-balance term (the
update's loss mask is `valid & kept group`). With every rollout valid this
is the fixed-N path exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from brorl_jax.rl import advantages as adv_lib
from brorl_jax.rl import mass_balance
from brorl_jax.rl.shaping import ShapingConfig, shape_rewards
from brorl_jax.rollout.sampler import Rollouts


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


@dataclasses.dataclass(frozen=True)
class BatchConfig:
  """Static settings of `prepare` (all from validated sections).

  Attributes:
    num_groups: P, groups per update.
    max_new_tokens: T.
    correct_threshold: `rewards.correct_threshold`.
    advantage: the advantage settings.
    shaping: the reward-shaping settings.
    mask_truncated: `algo.loss.mask_truncated`: rollouts that did not stop
      (cut at `max_new_tokens`) leave the loss mask; they still count in
      the advantages' baselines.
  """

  num_groups: int
  max_new_tokens: int
  correct_threshold: float
  advantage: adv_lib.AdvantageConfig
  shaping: ShapingConfig
  mask_truncated: bool = False


@struct.dataclass
class Prepared:
  """What `prepare` hands the update and the diagnostics.

  Attributes:
    batch: the update's RolloutBatch, [P, G].
    stats: the step's scalar metrics (rewards, groups, advantages, decode
      slots, the pre-update mass balance).
    selected: [P] int32, the kept groups' indices among the P_over sampled.
    The kept groups' inputs of the post-update diagnostics (their prompts
    are `batch.prompt_tokens` / `batch.prompt_lengths`):
    first_probs: [P, V] f32 the sampler's pre-update first-token
      distribution.
    rewards: [P, G] f32 the verifier's rewards.
    correct_mask / incorrect_mask: the first-token masks
      (`mass_balance.first_token_masks`).
    group_mask: [P] bool, groups that enter the update.
    valid: [P, G] bool, the rollouts that exist.
  """

  batch: RolloutBatch
  stats: dict
  selected: jax.Array
  first_probs: jax.Array
  rewards: jax.Array
  correct_mask: jax.Array
  incorrect_mask: jax.Array
  group_mask: jax.Array
  valid: jax.Array


def prepare(cfg: BatchConfig, prompt_tokens, prompt_lengths,
            rollouts: Rollouts, rewards, step, valid=None) -> Prepared:
  """Selects groups, shapes rewards, computes advantages and diagnostics.

  Args:
    cfg: static settings.
    prompt_tokens: [P_over, Lp]; prompt_lengths: [P_over].
    rollouts: the sampler's rollouts of the P_over prompts, whole.
    rewards: [P_over, G] the verifier's rewards.
    step: int32, the RL step (cosine-penalty cycle).
    valid: [P_over, G] bool, rollouts that exist (unequal groups); None:
      all of them.

  Returns:
    The batch, its statistics, and what the diagnostics need: nothing of
    the step's rollouts goes back to the loop for them.
  """
  tokens, logprobs, lengths, stopped, first_probs = (
      rollouts.tokens, rollouts.logprobs, rollouts.lengths, rollouts.stopped,
      rollouts.first_probs)
  thr = cfg.correct_threshold
  if valid is None:
    valid = jnp.ones(rewards.shape, bool)                   # [P_over, G]
  num_correct, num_valid = adv_lib.group_counts(rewards, valid, thr)
  informative = (num_correct > 0) & (num_correct < num_valid)
  if cfg.advantage.dynamic_sampling:
    idx, prompt_ok = adv_lib.select_groups(informative, cfg.num_groups)
  else:
    idx = jnp.arange(cfg.num_groups)
    prompt_ok = jnp.ones((cfg.num_groups,), bool)
  take = lambda x: jnp.take(x, idx, axis=0)  # noqa: E731
  sel_rewards, sel_lengths, sel_stopped, sel_valid = (
      take(rewards), take(lengths), take(stopped), take(valid))
  shaped = None
  if cfg.shaping.enabled:
    shaped = shape_rewards(sel_rewards, sel_lengths, sel_stopped,
                           cfg.max_new_tokens, cfg.shaping, step=step)
  adv, group_mask = adv_lib.compute_advantages(
      sel_rewards, sel_valid, prompt_ok, cfg.advantage, correct_threshold=thr,
      shaped_rewards=shaped)
  mask = group_mask[:, None] & sel_valid
  if cfg.mask_truncated:
    # DAPO's overlong filtering: a truncated rollout keeps its reward in the
    # baseline above but trains no token (nor counts in the normalizer).
    truncated_masked = mask & ~sel_stopped                  # [P, G]
    mask = mask & sel_stopped
  batch = RolloutBatch(
      prompt_tokens=take(prompt_tokens), prompt_lengths=take(prompt_lengths),
      tokens=take(tokens), logprobs=take(logprobs), lengths=sel_lengths,
      advantages=adv, mask=mask)

  # Pre-update mass balance at the first response position, over the
  # groups that enter the update (the others receive no gradient).
  sel_probs = take(first_probs)
  correct_mask, incorrect_mask = mass_balance.first_token_masks(
      batch.tokens[:, :, 0], sel_rewards, mask, sel_probs.shape[-1], thr)
  terms = mass_balance.terms_from_masks(sel_probs, correct_mask,
                                        incorrect_mask)
  mass = mass_balance.summarize(terms, group_mask)

  correct = adv_lib.is_correct(rewards, thr) & valid
  num_rows = jnp.maximum(valid.sum(), 1)
  vmean = lambda x: jnp.where(valid, x, 0).sum() / num_rows  # noqa: E731
  sizes = valid.sum(-1)                                     # [P_over]
  reward_mean = vmean(rewards)
  slot_frac = rollouts.finished_slots / jnp.maximum(rollouts.total_slots, 1)
  stats = {
      "reward/mean": reward_mean,
      "reward/std": jnp.sqrt(vmean(jnp.square(rewards - reward_mean))),
      "reward/pass_rate": correct.sum() / num_rows,
      "group/all_correct_frac": (num_correct == num_valid).mean(),
      "group/all_wrong_frac": (num_correct == 0).mean(),
      "group/mixed_frac": informative.mean(),
      "group/trained": group_mask.sum(),
      # Share of the step's rollouts in groups with mixed rewards (equals
      # mixed_frac when groups are equal).
      "rollout/mixed_share": jnp.where(informative, sizes, 0).sum() /
          num_rows,
      "rollout/n_min": sizes.min(), "rollout/n_mean": sizes.mean(),
      "rollout/n_max": sizes.max(),
      "rollout/dynamic_sampling_pass_rate": mask.sum() / num_rows,
      "rollout/response_len_mean": vmean(lengths),
      "rollout/response_len_max": jnp.where(valid, lengths, 0).max(),
      "rollout/truncated_frac": 1.0 - vmean(stopped),
      "rollout/generated_tokens": jnp.where(valid, lengths, 0).sum(),
      # Share of decode slot-steps spent on rows already done, and its
      # complement, the share that produced a token.
      "rollout/finished_slot_frac": slot_frac,
      "rollout/slot_utilization": 1 - slot_frac,
      "advantage/mean": jnp.where(mask, adv, 0).sum() / jnp.maximum(
          mask.sum(), 1),
      "advantage/abs_mean": jnp.where(mask, jnp.abs(adv), 0).sum() /
          jnp.maximum(mask.sum(), 1),
  }
  if cfg.mask_truncated:
    stats["rollout/truncated_masked"] = truncated_masked.sum()
  if shaped is not None:
    stats["reward/shaped_mean"] = jnp.where(mask, shaped, 0).sum() / \
        jnp.maximum(mask.sum(), 1)
  stats.update({f"mass/{k}": v for k, v in mass.items()})
  return Prepared(batch=batch, stats=stats, selected=idx,
                  first_probs=sel_probs, rewards=sel_rewards,
                  correct_mask=correct_mask, incorrect_mask=incorrect_mask,
                  group_mask=group_mask, valid=sel_valid)
