"""Adaptive rollout allocation on the host: probe, allocate, decode the rest.

  round 1: `probe_n` rollouts per prompt, sampled and scored
  allocate (device, `rl/allocation.py`): rollouts per prompt from the
      prefill's first-token distribution and the probe's rewards
  round 2: each prompt's extra rollouts from its own refill queue: G_max -
      probe_n rows per prompt, the unused ones limited to their first token
      (never queued, never trained), so the shapes stay static
  -> one `Scored` over [P, G_max] rows and its `valid` mask ([P, G_max]
     bool: the probe, then each prompt's extra rollouts).

The second round draws with its own key, so its rollouts are independent of
the probe's. Its prefill repeats the probe's (same parameters, same
prompts): a prefill is one forward of P prompts, small next to a decode.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from brorl_jax.loop import scoring
from brorl_jax.rewards import RewardPool
from brorl_jax.rl import allocation as alloc_lib
from brorl_jax.rl import mass_balance
from brorl_jax.rollout import Rollouts, Sampler

PROBE, EXTRA = 0, 1               # rounds folded into the step's rollout key


@functools.partial(jax.jit, static_argnums=(0, 4))
def _plan(cfg: alloc_lib.AllocationConfig, first_probs, first_tokens,
          rewards, threshold: float):
  """Counts per prompt, and the probe's statistics, from round 1."""
  num_correct = jnp.sum(rewards >= threshold, -1)
  sampled = alloc_lib.probe_masks(first_tokens, first_probs.shape[-1])
  return alloc_lib.allocate(cfg, first_probs, sampled, num_correct)


@functools.partial(jax.jit, static_argnums=(4,))
def _measured(first_probs, first_tokens, rewards, valid, threshold: float):
  """[P] the coupling bound |S_R| U_2 of the step's final groups."""
  correct, incorrect = mass_balance.first_token_masks(
      first_tokens, rewards, valid, first_probs.shape[-1], threshold)
  return mass_balance.terms_from_masks(first_probs, correct,
                                       incorrect)["term3_bound"]


def _merge(a: scoring.Scored, b: scoring.Scored) -> scoring.Scored:
  """Round 1 ++ round 2 along the group axis."""
  cat = lambda x, y: jnp.concatenate([x, y], axis=1)  # noqa: E731
  ra, rb = a.rollouts, b.rollouts
  rollouts = Rollouts(
      tokens=cat(ra.tokens, rb.tokens), logprobs=cat(ra.logprobs,
                                                     rb.logprobs),
      lengths=cat(ra.lengths, rb.lengths), stopped=cat(ra.stopped,
                                                       rb.stopped),
      first_probs=ra.first_probs,
      finished_slots=ra.finished_slots + rb.finished_slots,
      total_slots=ra.total_slots + rb.total_slots)
  g0 = ra.tokens.shape[1]
  texts = dict(a.texts)
  # Unused rows keep their (one-token) texts: the archive's text sample
  # picks rows on the padded grid.
  texts.update({(p, g0 + g): t for (p, g), t in b.texts.items()})
  seconds = {k: a.seconds.get(k, 0.0) + b.seconds.get(k, 0.0)
             for k in set(a.seconds) | set(b.seconds)}
  if "segment_max" in seconds:
    seconds["segment_max"] = max(a.seconds.get("segment_max", 0.0),
                                 b.seconds.get("segment_max", 0.0))
  return scoring.Scored(rollouts=rollouts, rewards=cat(a.rewards, b.rewards),
                        status=cat(a.status, b.status), texts=texts,
                        seconds=seconds)


def sample_allocated(sampler: Sampler, pool: RewardPool, tokenizer,
                     params: Any, prompt_tokens: jax.Array,
                     prompt_lengths: jax.Array, records: Sequence[Any],
                     rng: jax.Array, cfg: alloc_lib.AllocationConfig, *,
                     correct_threshold: float,
                     should_stop: Callable[[], bool] | None = None):
  """Both rounds of an adaptive step.

  Args:
    sampler, pool, tokenizer, params, prompt_tokens, prompt_lengths,
      records, should_stop: as `scoring.sample_and_score`.
    rng: the step's rollout key.
    cfg: the allocation's sizes (cfg.max_n = the sampler's n).
    correct_threshold: `rewards.correct_threshold`.

  Returns:
    (scored [P, G_max], valid [P, G_max] bool, metrics {name: device
    scalar}), or None when `should_stop` said so.
  """
  probe = scoring.sample_and_score(
      sampler, pool, tokenizer, params, prompt_tokens, prompt_lengths,
      records, jax.random.fold_in(rng, PROBE), n=cfg.probe_n,
      should_stop=should_stop)
  if probe is None:
    return None
  ro = probe.rollouts
  plan = _plan(cfg, ro.first_probs, ro.tokens[:, :, 0], probe.rewards,
               correct_threshold)
  counts = plan["counts"]
  extra = cfg.max_n - cfg.probe_n
  p = counts.shape[0]
  if extra == 0:
    scored, valid = probe, jnp.ones((p, cfg.probe_n), bool)
  else:
    valid_b = jnp.arange(extra)[None, :] < (counts - cfg.probe_n)[:, None]
    limits = jnp.where(valid_b, sampler.cfg.max_new_tokens, 0).astype(
        jnp.int32)
    second = scoring.sample_and_score(
        sampler, pool, tokenizer, params, prompt_tokens, prompt_lengths,
        records, jax.random.fold_in(rng, EXTRA), n=extra,
        should_stop=should_stop, length_limits=limits)
    if second is None:
      return None
    scored = _merge(probe, second)
    valid = jnp.concatenate([jnp.ones((p, cfg.probe_n), bool), valid_b], 1)
  measured = _measured(scored.rollouts.first_probs,
                       scored.rollouts.tokens[:, :, 0], scored.rewards,
                       valid, correct_threshold)
  mixed = plan["mixed"]
  metrics = {
      "rollout/coupling_pred": plan["predicted"].sum(),
      "rollout/coupling_measured": measured.sum(),
      "rollout/probe_mixed_frac": mixed.mean(),
      # Share of the budget given to prompts whose probe was mixed.
      "rollout/budget_mixed_share": jnp.where(mixed, counts, 0).sum() /
          cfg.budget,
  }
  return scored, valid, metrics
