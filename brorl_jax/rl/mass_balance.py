"""Mass-balance diagnostics: Theorem 1 at each prompt's first response token.

All G rollouts of a prompt share its context up to the first response token,
so BroRL's token-level analysis (PAPER.md §1-2) applies literally there. The
sampler's prefill gives the pre-update distribution p `[P, V]` at that
position (the temperature-scaled one the rollouts were drawn from). A distinct
sampled first token's outcome is the mean reward of the valid rollouts that
start with it, compared with the correct threshold (>= is correct); token
rewards follow the paper: R_c = +1, R_w = -1, unsampled tokens 0. Then, with
A / B the sampled correct / incorrect first tokens and U the unsampled ones:

  P_pos = sum_A p,  P_neg = sum_B p,  A_2 = sum_A p^2,  B_2 = sum_B p^2,
  S_R = P_pos - P_neg,  U_2 = sum_U p^2  (exactly sum p^2 - A_2 - B_2).

Theorem 1: dQ_pos = (eta/N) [(1 - S_R) Q_neg A_2 + (S_R + 1) Q_pos B_2
                             + S_R (Q_pos U_neg,2 - Q_neg U_pos,2)].
Q_pos itself is unobservable: unsampled tokens have no outcome, so Q_pos only
lies in [P_pos, 1 - P_neg]. Hence term 1 >= (1 - S_R) P_neg A_2, term 2 >=
(S_R + 1) P_pos B_2 and |term 3| <= |S_R| U_2; `margin` = the two lower bounds
minus the coupling bound, and margin > 0 means the paper's first-order change
of correct mass is guaranteed positive for that prompt.

The bracket terms omit the eta/N factor: the real update is Adam on a clipped
log-prob loss, not one plain gradient step on the linear surrogate, so there
is no single eta to multiply by, and the margin's sign does not depend on it.

Everything here is pure and jittable; `[P, V]` scatter-adds (counts and reward
sums per token) keep memory at `[P, V]`, never `[P, G, V]`. Averaging over
prompts across hosts and logging (`mass/*`) belong to the train loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy


def first_token_masks(first_tokens: jax.Array, rewards: jax.Array,
                      valid: jax.Array, vocab_size: int,
                      correct_threshold: float) -> tuple[jax.Array, jax.Array]:
  """The sampled-correct and sampled-incorrect first-token sets A and B.

  Args:
    first_tokens: `[P, G]` int32, each rollout's first response token.
    rewards: `[P, G]` float, each rollout's reward.
    valid: `[P, G]` bool, rollouts that exist and have at least one token.
      Invalid rollouts count nowhere, whatever their token and reward.
    vocab_size: V.
    correct_threshold: a token whose valid rollouts' mean reward is >= this
      is correct.

  Returns:
    (correct `[P, V]` bool, incorrect `[P, V]` bool), disjoint; tokens in
    neither were not sampled by a valid rollout.
  """
  num_prompts = first_tokens.shape[0]
  rows = jnp.broadcast_to(jnp.arange(num_prompts)[:, None],
                          first_tokens.shape)                 # [P, G]
  # Invalid rollouts add weight 0, so their (possibly padding, even negative
  # or out-of-range) token ids never mark a token as sampled.
  weight = valid.astype(jnp.float32)                          # [P, G]
  zeros = jnp.zeros((num_prompts, vocab_size), jnp.float32)
  counts = zeros.at[rows, first_tokens].add(weight)           # [P, V]
  reward_sums = zeros.at[rows, first_tokens].add(
      jnp.where(valid, rewards.astype(jnp.float32), 0.0))     # [P, V]
  sampled = counts > 0
  # mean >= threshold, compared as sum >= threshold * count: no division
  # rounding, so a tie such as (0.49 + 0.51) / 2 against 0.5 stays a tie.
  correct = sampled & (reward_sums >= correct_threshold * counts)
  return correct, sampled & ~correct


def terms_from_masks(probs: jax.Array, correct_mask: jax.Array,
                     incorrect_mask: jax.Array) -> dict[str, jax.Array]:
  """Theorem 1's observable quantities per prompt, given the sets A and B.

  Args:
    probs: `[P, V]` pre-update first-position distribution.
    correct_mask: `[P, V]` bool, set A (from `first_token_masks`).
    incorrect_mask: `[P, V]` bool, set B.

  Returns:
    `[P]` float32 arrays: p_pos, p_neg, a2, b2, s_r, unsampled_mass
    (1 - p_pos - p_neg), u2, term1_lb, term2_lb, term3_bound, margin, and
    num_sampled_correct / num_sampled_incorrect (distinct tokens in A / B).
    The terms omit eta/N (see the module docstring).
  """
  probs = probs.astype(jnp.float32)
  sq = probs * probs                                          # [P, V]
  unsampled = ~(correct_mask | incorrect_mask)                # [P, V]
  masked_sum = lambda x, m: jnp.sum(jnp.where(m, x, 0.0), axis=-1)
  p_pos = masked_sum(probs, correct_mask)                     # [P]
  p_neg = masked_sum(probs, incorrect_mask)
  a2 = masked_sum(sq, correct_mask)
  b2 = masked_sum(sq, incorrect_mask)
  # Summed over U directly: sum p^2 - A_2 - B_2 would cancel when U is small.
  u2 = masked_sum(sq, unsampled)
  s_r = p_pos - p_neg              # R_c P_pos + R_w P_neg with R_c=1, R_w=-1
  term1_lb = (1.0 - s_r) * p_neg * a2      # Q_neg >= P_neg
  term2_lb = (s_r + 1.0) * p_pos * b2      # Q_pos >= P_pos
  term3_bound = jnp.abs(s_r) * u2   # |Q_pos U_neg2 - Q_neg U_pos2| <= U_2
  return {
      "p_pos": p_pos,
      "p_neg": p_neg,
      "a2": a2,
      "b2": b2,
      "s_r": s_r,
      "unsampled_mass": 1.0 - p_pos - p_neg,
      "u2": u2,
      "term1_lb": term1_lb,
      "term2_lb": term2_lb,
      "term3_bound": term3_bound,
      "margin": term1_lb + term2_lb - term3_bound,
      "num_sampled_correct": jnp.sum(correct_mask, -1).astype(jnp.float32),
      "num_sampled_incorrect": jnp.sum(incorrect_mask, -1).astype(jnp.float32),
  }


def realized_first_token_change(
    probs_before: jax.Array, probs_after: jax.Array, correct_mask: jax.Array,
    incorrect_mask: jax.Array) -> dict[str, jax.Array]:
  """What the update actually did to the first-position distribution.

  Args:
    probs_before: `[P, V]` pre-update distribution.
    probs_after: `[P, V]` post-update distribution on the same prompts (a
      prefill-only forward with the new parameters, same temperature).
    correct_mask: `[P, V]` bool, set A.
    incorrect_mask: `[P, V]` bool, set B.

  Returns:
    `[P]` float32: d_correct_mass (change of P_pos), d_incorrect_mass (of
    P_neg), d_unsampled_mass, d_entropy (nats). Each is a sum of elementwise
    differences, so it is exactly 0 when the two distributions are equal.
  """
  before = probs_before.astype(jnp.float32)
  after = probs_after.astype(jnp.float32)
  diff = after - before                                       # [P, V]
  unsampled = ~(correct_mask | incorrect_mask)
  masked_sum = lambda m: jnp.sum(jnp.where(m, diff, 0.0), axis=-1)
  # H(after) - H(before) = sum (b log b - a log a); xlogy(0, 0) = 0. Tokens
  # whose probability did not change contribute exactly 0: XLA may round two
  # evaluations of the same log differently (fusion, vectorized paths).
  d_entropy = jnp.sum(
      jnp.where(diff == 0, 0.0, xlogy(before, before) - xlogy(after, after)),
      axis=-1)
  return {
      "d_correct_mass": masked_sum(correct_mask),
      "d_incorrect_mass": masked_sum(incorrect_mask),
      "d_unsampled_mass": masked_sum(unsampled),
      "d_entropy": d_entropy,
  }


def sequence_logp_change(logp_before: jax.Array, logp_after: jax.Array,
                         correct: jax.Array,
                         valid: jax.Array) -> dict[str, jax.Array]:
  """Sequence-level change of likelihood of re-scored rollouts.

  Args:
    logp_before: `[...]` summed response log-probs under the old parameters.
    logp_after: same shape, under the updated parameters.
    correct: same shape, bool, rollouts whose reward is >= the threshold.
    valid: same shape, bool, rollouts in the re-scored subset.

  Returns:
    Scalars: dlogp_correct / dlogp_incorrect (means of log pi_after - log
    pi_before), frac_correct_rose (share of correct rollouts whose likelihood
    rose), worst_dlogp_correct (most negative change among correct rollouts:
    knowledge shrinkage), num_correct / num_incorrect (int32). With no
    rollouts in a group its mean, share and worst are 0 and its count 0.
  """
  diff = (logp_after.astype(jnp.float32)
          - logp_before.astype(jnp.float32))
  is_correct = valid & correct
  is_incorrect = valid & ~correct
  num_correct = jnp.sum(is_correct)
  num_incorrect = jnp.sum(is_incorrect)
  mean = lambda m, n: jnp.sum(jnp.where(m, diff, 0.0)) / jnp.maximum(n, 1)
  worst = jnp.min(jnp.where(is_correct, diff, jnp.inf))
  return {
      "dlogp_correct": mean(is_correct, num_correct),
      "dlogp_incorrect": mean(is_incorrect, num_incorrect),
      "frac_correct_rose": (jnp.sum(is_correct & (diff > 0))
                            / jnp.maximum(num_correct, 1)).astype(jnp.float32),
      "worst_dlogp_correct": jnp.where(num_correct > 0, worst, 0.0),
      "num_correct": num_correct.astype(jnp.int32),
      "num_incorrect": num_incorrect.astype(jnp.int32),
  }


def summarize(terms: dict[str, jax.Array],
              prompt_mask: jax.Array) -> dict[str, jax.Array]:
  """Means over the selected prompts, and the share with a positive margin.

  Args:
    terms: `[P]` arrays (from `terms_from_masks` or
      `realized_first_token_change`).
    prompt_mask: `[P]` bool, prompts to include (e.g. those with at least one
      valid rollout, on this host).

  Returns:
    Scalars: each key's mean over the selected prompts (0 when none),
    `frac_margin_positive` when `terms` has a margin, and `num_prompts`.
  """
  count = jnp.sum(prompt_mask)
  mean = lambda x: (jnp.sum(jnp.where(prompt_mask, x, 0.0))
                    / jnp.maximum(count, 1)).astype(jnp.float32)
  out = {k: mean(v) for k, v in terms.items()}
  if "margin" in terms:
    out["frac_margin_positive"] = mean(
        (terms["margin"] > 0).astype(jnp.float32))
  out["num_prompts"] = count.astype(jnp.int32)
  return out
