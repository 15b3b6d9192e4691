"""Advantages on an explicit `[P, G]` reward array, and dynamic sampling.

P prompts (groups), G rollouts per prompt. Everything here is pure `jnp` with
static shapes: rollouts that do not exist, padded prompts and groups dropped
by dynamic sampling are *masked*, never filtered, so a step never recompiles.
A masked rollout gets advantage 0 and takes no part in any statistic.

Estimators (r = reward, mean/std over the valid rollouts of the group unless
"batch" is said; std is the sample std, ddof=1):

  grpo                   A = (r - mean_group) / (std_group + eps)
  reinforce_pp_baseline  r~ = r - mean_group;
                         A = (r~ - mean_batch r~) / (std_batch r~ + eps)
                         (BroRL / ProRL v2, PAPER.md §4.2: batch = every
                         valid rollout of every kept group in the step)
  rloo                   A = r - mean of the *other* rollouts of the group
                           = n/(n-1) (r - mean_group)
  drgrpo                 A = r - mean_group (Dr. GRPO: no std division)

Correctness ("a rollout is correct") has one definition, `is_correct`:
reward >= `rewards.correct_threshold`. It is decided on the verifier reward;
reward shaping (`rl/shaping.py`) changes only the advantage signal, so pass
the verifier reward to `dynamic_sampling_mask` and the shaped reward to the
estimator (`compute_advantages(..., shaped_rewards=...)` does both).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from brorl_jax import config as config_lib

# Config section of `AdvantageConfig` (error messages name its keys).
SECTION = "algo.advantage"


def is_correct(rewards: jax.Array, correct_threshold: float) -> jax.Array:
  """The single definition of a correct rollout: reward >= threshold."""
  return rewards >= correct_threshold


def group_counts(rewards: jax.Array, valid: jax.Array,
                 correct_threshold: float) -> tuple[jax.Array, jax.Array]:
  """Counts correct and valid rollouts per group.

  Args:
    rewards: [P, G] verifier rewards.
    valid: [P, G] bool, rollouts that exist.
    correct_threshold: `rewards.correct_threshold`.

  Returns:
    (num_correct [P] int32, num_valid [P] int32).
  """
  correct = is_correct(rewards, correct_threshold) & valid  # [P, G]
  return (correct.sum(-1, dtype=jnp.int32), valid.sum(-1, dtype=jnp.int32))


def dynamic_sampling_mask(rewards: jax.Array, valid: jax.Array,
                          correct_threshold: float) -> jax.Array:
  """Groups that are neither all-correct nor all-wrong (DAPO / BroRL B').

  B' = {groups : 0 < #correct < #valid}. A group with fewer than two valid
  rollouts is always dropped (it cannot be mixed), and so is a group with
  none (a padded prompt).

  Args:
    rewards: [P, G] verifier rewards (not shaped: shaping must not change
      which rollouts count as correct).
    valid: [P, G] bool, rollouts that exist.
    correct_threshold: `rewards.correct_threshold`.

  Returns:
    [P] bool, True for the groups to keep.
  """
  num_correct, num_valid = group_counts(rewards, valid, correct_threshold)
  return (num_correct > 0) & (num_correct < num_valid)


def select_groups(keep: jax.Array,
                  num_groups: int) -> tuple[jax.Array, jax.Array]:
  """Picks the first `num_groups` kept groups of an oversampled batch.

  With oversampling the loop samples P_over >= P prompts and trains on the
  first P groups that dynamic sampling kept (ProRL v2's batch multiplier).
  When fewer than P survive, the rest of the P slots are filled with dropped
  groups, marked invalid, so the shape stays [P].

  Args:
    keep: [P_over] bool, the dynamic-sampling mask of the oversampled batch.
    num_groups: P (static), at most P_over.

  Returns:
    (indices [P] int32 into the P_over groups, in their original order, kept
    ones first; valid [P] bool, False for the padding slots).
  """
  if num_groups > keep.shape[0]:
    raise ValueError(f"select_groups: num_groups={num_groups} exceeds the "
                     f"{keep.shape[0]} sampled groups; sample more prompts.")
  # A stable sort on "dropped" puts kept groups first, each part in order.
  order = jnp.argsort(~keep, stable=True)[:num_groups].astype(jnp.int32)
  return order, keep[order]


def _masked_sum(x: jax.Array, mask: jax.Array, axis=None, keepdims=False):
  # `where`, not `x * mask`: rewards of missing rollouts may be NaN.
  return jnp.where(mask, x, 0.0).sum(axis=axis, keepdims=keepdims)


def _group_mean(rewards, mask):
  n = mask.sum(-1, keepdims=True)  # [P, 1]
  return _masked_sum(rewards, mask, -1, True) / jnp.maximum(n, 1), n


def _sample_std(x, mask, mean, n, axis=None):
  sq = _masked_sum(jnp.square(x - mean), mask, axis, axis is not None)
  return jnp.sqrt(sq / jnp.maximum(n - 1, 1))


def grpo(rewards: jax.Array, mask: jax.Array, eps: float) -> jax.Array:
  """GRPO: (r - group mean) / (group sample std + eps). Shapes [P, G]."""
  mean, n = _group_mean(rewards, mask)
  std = _sample_std(rewards, mask, mean, n, axis=-1)
  return jnp.where(mask, (rewards - mean) / (std + eps), 0.0)


def reinforce_pp_baseline(rewards: jax.Array, mask: jax.Array,
                          eps: float) -> jax.Array:
  """REINFORCE++-baseline: group-mean baseline, then batch normalization.

  The batch mean and sample std are over all rollouts in `mask` (one value
  per rollout, not per token), i.e. the global batch of kept groups.
  """
  mean, _ = _group_mean(rewards, mask)
  centered = rewards - mean  # [P, G]
  n = mask.sum()
  batch_mean = _masked_sum(centered, mask) / jnp.maximum(n, 1)
  batch_std = _sample_std(centered, mask, batch_mean, n)
  return jnp.where(mask, (centered - batch_mean) / (batch_std + eps), 0.0)


def rloo(rewards: jax.Array, mask: jax.Array, eps: float) -> jax.Array:
  """RLOO: r minus the mean of the group's other rollouts. Shapes [P, G]."""
  del eps  # No division by a statistic that can vanish.
  total = _masked_sum(rewards, mask, -1, True)  # [P, 1]
  n = mask.sum(-1, keepdims=True)
  baseline = (total - rewards) / jnp.maximum(n - 1, 1)
  # A lone rollout has no leave-one-out baseline: its advantage is 0.
  return jnp.where(mask & (n > 1), rewards - baseline, 0.0)


def drgrpo(rewards: jax.Array, mask: jax.Array, eps: float) -> jax.Array:
  """Dr. GRPO: r - group mean, no std normalization. Shapes [P, G]."""
  del eps
  mean, _ = _group_mean(rewards, mask)
  return jnp.where(mask, rewards - mean, 0.0)


Estimator = Callable[[jax.Array, jax.Array, float], jax.Array]

ESTIMATORS: dict[str, Estimator] = {
    "grpo": grpo,
    "reinforce_pp_baseline": reinforce_pp_baseline,
    "rloo": rloo,
    "drgrpo": drgrpo,
}


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  """How rewards become advantages (config section `algo.advantage`).

  Attributes:
    estimator: one of `ESTIMATORS`; BroRL and ProRL v2 use
      "reinforce_pp_baseline" (group-mean baseline, global-batch
      normalization), ProRL v1 "grpo".
    eps: added to the std before dividing (grpo, reinforce_pp_baseline), so
      a batch or group with zero spread gives advantage 0, not NaN.
    dynamic_sampling: drop groups whose valid rollouts are all correct or
      all wrong (DAPO; BroRL's B'); their advantages are 0 and they are
      excluded from the batch statistics.
    oversample_factor: the loop samples ceil(P * factor) prompts and keeps
      the first P groups that dynamic sampling kept (ProRL v2's batch
      multiplier, 1.5 in NeMo RL's recipe). 1.0 samples exactly P prompts.
  """
  estimator: str = "reinforce_pp_baseline"
  eps: float = 1e-6
  dynamic_sampling: bool = True
  oversample_factor: float = 1.0

  def __post_init__(self):
    config_lib.check_choice(self.estimator, f"{SECTION}.estimator",
                            sorted(ESTIMATORS))
    config_lib.check(self.eps > 0, f"{SECTION}.eps",
                     f"must be > 0, got {self.eps}")
    config_lib.check(isinstance(self.dynamic_sampling, bool),
                     f"{SECTION}.dynamic_sampling",
                     f"must be True or False, got {self.dynamic_sampling!r}")
    config_lib.check(self.oversample_factor >= 1.0,
                     f"{SECTION}.oversample_factor",
                     f"must be >= 1.0, got {self.oversample_factor}")
    config_lib.check(
        self.oversample_factor == 1.0 or self.dynamic_sampling,
        f"{SECTION}.oversample_factor",
        f"is {self.oversample_factor} but oversampling only refills groups "
        f"dropped by dynamic sampling; set {SECTION}.dynamic_sampling=True "
        "or oversample_factor=1.0")

  def prompts_to_sample(self, num_groups: int) -> int:
    """Prompts to sample for P = `num_groups` trained groups (P_over)."""
    return math.ceil(num_groups * self.oversample_factor)


def compute_advantages(
    rewards: jax.Array,
    valid: jax.Array,
    prompt_mask: jax.Array,
    cfg: AdvantageConfig,
    *,
    correct_threshold: float,
    shaped_rewards: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Advantages for one step's groups, with dynamic sampling if configured.

  Args:
    rewards: [P, G] verifier rewards; they decide correctness.
    valid: [P, G] bool, rollouts that exist.
    prompt_mask: [P] bool, real prompts (False for padding slots, e.g. the
      `valid` output of `select_groups`).
    cfg: the advantage configuration.
    correct_threshold: `rewards.correct_threshold`.
    shaped_rewards: [P, G] rewards after `shaping.shape_rewards`, used for
      the advantage signal; None uses `rewards`.

  Returns:
    (advantages [P, G] f32, 0 outside the trained rollouts; group_mask [P]
    bool, the groups that enter the update: real prompts kept by dynamic
    sampling). Train on rollouts with `valid & group_mask[:, None]`.
  """
  valid = valid & prompt_mask[:, None]  # [P, G]
  group_mask = prompt_mask
  if cfg.dynamic_sampling:
    group_mask = group_mask & dynamic_sampling_mask(rewards, valid,
                                                    correct_threshold)
  signal = rewards if shaped_rewards is None else shaped_rewards
  mask = valid & group_mask[:, None]  # [P, G]
  adv = ESTIMATORS[cfg.estimator](signal.astype(jnp.float32), mask, cfg.eps)
  return adv, group_mask
