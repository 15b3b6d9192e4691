"""Adaptive rollout allocation, and unequal groups through the RL math."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brorl_jax.config import ConfigError
from brorl_jax.rl import advantages as adv_lib
from brorl_jax.rl import allocation as alloc_lib
from brorl_jax.rl import batch as batch_lib
from brorl_jax.rl import losses
from brorl_jax.rl.shaping import ShapingConfig
from brorl_jax.rollout import Rollouts


def _cfg(**kw):
  args = dict(num_prompts=4, budget=48, probe_n=4, floor=0, block=4,
              max_n=24)
  args.update(kw)
  return alloc_lib.AllocationConfig(**args)


def _inputs(seed, p, v=12, probe_n=4):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(p, v)) * rng.uniform(0.5, 3.0, size=(p, 1))
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1)
  first = jnp.asarray(rng.integers(0, v, size=(p, probe_n)), jnp.int32)
  return probs, alloc_lib.probe_masks(first, v)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocation_sums_to_budget_and_respects_floor_and_cap(seed):
  cfg = _cfg(num_prompts=6, budget=6 * 6 + 32, floor=6, block=2, max_n=20)
  probs, sampled = _inputs(seed, 6)
  num_correct = jnp.asarray([0, 4, 1, 2, 3, 0])       # prompts 0, 1, 5 unmixed
  out = alloc_lib.allocate(cfg, probs, sampled, num_correct)
  counts = np.asarray(out["counts"])
  assert counts.sum() == cfg.budget
  assert (counts >= 6).all() and (counts <= cfg.max_n).all()
  assert ((counts - 6) % cfg.block == 0).all()
  # 32 extra rows fit in the 3 mixed prompts' headroom (3 x 14): the
  # unmixed ones stay at the floor.
  np.testing.assert_array_equal(counts[[0, 1, 5]], 6)
  np.testing.assert_array_equal(np.asarray(out["mixed"]),
                                [False, False, True, True, True, False])


def test_unmixed_prompts_take_what_mixed_ones_cannot():
  cfg = _cfg(num_prompts=3, budget=3 * 4 + 24, max_n=16)
  probs, sampled = _inputs(3, 3)
  out = alloc_lib.allocate(cfg, probs, sampled, jnp.asarray([2, 0, 4]))
  counts = np.asarray(out["counts"])
  assert counts[0] == 16 and counts.sum() == cfg.budget


def test_identical_prompts_get_equal_n():
  cfg = _cfg(num_prompts=5, budget=5 * 12, max_n=32)
  probs, sampled = _inputs(4, 1)
  probs, sampled = (jnp.repeat(probs, 5, 0), jnp.repeat(sampled, 5, 0))
  out = alloc_lib.allocate(cfg, probs, sampled, jnp.full((5,), 2))
  np.testing.assert_array_equal(np.asarray(out["counts"]), 12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_water_filling_matches_brute_force(seed):
  p, block, probe_n, max_n, num_blocks = 3, 2, 2, 10, 6
  cfg = _cfg(num_prompts=p, budget=p * probe_n + num_blocks * block,
             probe_n=probe_n, block=block, max_n=max_n)
  probs, sampled = _inputs(10 + seed, p, probe_n=probe_n)
  num_correct = jnp.ones((p,), jnp.int32)                # all mixed
  s_hat = alloc_lib.abs_sr_estimate(num_correct, probe_n)
  out = alloc_lib.allocate(cfg, probs, sampled, num_correct)

  def objective(counts):
    extra = jnp.asarray(counts, jnp.int32) - probe_n
    return float(alloc_lib.coupling_bound(probs, sampled, s_hat, extra).sum())
  best = min(objective([probe_n + block * b for b in split])
             for split in itertools.product(range(num_blocks + 1), repeat=p)
             if sum(split) == num_blocks
             and all(probe_n + block * b <= max_n for b in split))
  got = objective(np.asarray(out["counts"]))
  assert got == pytest.approx(best, rel=1e-5, abs=1e-9)
  assert float(out["predicted"].sum()) == pytest.approx(got, rel=1e-5)


def test_abs_sr_estimate_is_the_beta_posterior_mean():
  # Beta(3, 3): E|2x - 1| = 2 * 2 * int_0^.5 (1 - 2x) x^2 (1-x)^2 / B(3, 3)
  x = (np.arange(200_000) + 0.5) / 200_000
  w = x**2 * (1 - x)**2
  exact = np.sum(w * np.abs(2 * x - 1)) / np.sum(w)
  got = alloc_lib.abs_sr_estimate(jnp.asarray([2, 0]), 4)
  assert float(got[0]) == pytest.approx(exact, abs=1e-4)
  assert float(got[1]) > float(got[0])                # all wrong: |S_R| ~ 1


def test_bad_budget_names_the_key():
  with pytest.raises(ConfigError, match="rollout.budget"):
    _cfg(budget=49)
  with pytest.raises(ConfigError, match="rollout.budget"):
    _cfg(budget=4 * 24 + 4)


# ---- unequal groups through advantages, loss, prepare ------------------------

SIZES = (5, 2, 3, 4)


def _unequal(seed, g=5):
  rng = np.random.default_rng(seed)
  valid = np.arange(g)[None, :] < np.asarray(SIZES)[:, None]
  rewards = rng.integers(0, 2, size=(len(SIZES), g)).astype(np.float32)
  rewards[:, 0], rewards[:, 1] = 1.0, 0.0               # every group mixed
  rewards = np.where(valid, rewards, np.nan)            # padding: garbage
  return jnp.asarray(rewards), jnp.asarray(valid)


@pytest.mark.parametrize("estimator", ["reinforce_pp_baseline", "grpo"])
def test_unequal_group_advantages_match_a_per_group_reference(estimator):
  rewards, valid = _unequal(0)
  cfg = adv_lib.AdvantageConfig(estimator=estimator)
  adv, keep = adv_lib.compute_advantages(
      rewards, valid, jnp.ones(len(SIZES), bool), cfg, correct_threshold=0.5)
  groups = [np.asarray(rewards)[i, :n] for i, n in enumerate(SIZES)]
  if estimator == "grpo":
    ref = [(r - r.mean()) / (r.std(ddof=1) + cfg.eps) for r in groups]
  else:
    centered = np.concatenate([r - r.mean() for r in groups])
    normed = (centered - centered.mean()) / (centered.std(ddof=1) + cfg.eps)
    ref = np.split(normed, np.cumsum(SIZES)[:-1])
  assert bool(keep.all())
  for i, n in enumerate(SIZES):
    np.testing.assert_allclose(np.asarray(adv)[i, :n], ref[i], rtol=1e-5,
                               atol=1e-6)
  assert float(jnp.abs(jnp.where(valid, 0.0, adv)).max()) == 0.0


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_unequal_group_loss_matches_the_compacted_batch(aggregation):
  rewards, valid = _unequal(1)
  adv, _ = adv_lib.compute_advantages(
      rewards, valid, jnp.ones(len(SIZES), bool), adv_lib.AdvantageConfig(),
      correct_threshold=0.5)
  p, g, t = len(SIZES), 5, 6
  rng = np.random.default_rng(2)
  logp = jnp.asarray(-rng.uniform(0.1, 2.0, (p, g, t)), jnp.float32)
  old = logp + jnp.asarray(rng.normal(0, 0.1, (p, g, t)), jnp.float32)
  lengths = jnp.asarray(rng.integers(1, t + 1, (p, g)))
  tok_mask = (jnp.arange(t) < lengths[..., None]) & valid[..., None]
  cfg = losses.LossConfig(aggregation=aggregation)
  padded, _ = losses.policy_loss(
      logp.reshape(p * g, t), old.reshape(p * g, t), adv.reshape(-1),
      tok_mask.reshape(p * g, t), cfg)
  rows = np.flatnonzero(np.asarray(valid).reshape(-1))
  compact, _ = losses.policy_loss(
      logp.reshape(p * g, t)[rows], old.reshape(p * g, t)[rows],
      adv.reshape(-1)[rows], tok_mask.reshape(p * g, t)[rows], cfg)
  assert float(padded) == pytest.approx(float(compact), rel=1e-6)


def _rollouts(seed, p=4, g=5, t=6, v=16):
  rng = np.random.default_rng(seed)
  lengths = jnp.asarray(rng.integers(1, t + 1, (p, g)), jnp.int32)
  return Rollouts(
      tokens=jnp.asarray(rng.integers(0, v, (p, g, t)), jnp.int32),
      logprobs=jnp.asarray(-rng.uniform(0, 2, (p, g, t)), jnp.float32),
      lengths=lengths, stopped=jnp.asarray(rng.random((p, g)) < 0.8),
      first_probs=jax.nn.softmax(jnp.asarray(rng.normal(size=(p, v)),
                                             jnp.float32), -1),
      finished_slots=jnp.int32(0), total_slots=jnp.int32(1))


def _prepare(ro, rewards, valid=None):
  cfg = batch_lib.BatchConfig(
      num_groups=4, max_new_tokens=6, correct_threshold=0.5,
      advantage=adv_lib.AdvantageConfig(), shaping=ShapingConfig())
  p = rewards.shape[0]
  return batch_lib.prepare(cfg, jnp.ones((p, 3), jnp.int32),
                           jnp.full((p,), 3, jnp.int32), ro, rewards,
                           jnp.int32(0), valid)


def test_prepare_with_all_rows_valid_is_the_fixed_path():
  ro = _rollouts(3)
  rewards = jnp.asarray(np.random.default_rng(4).integers(0, 2, (4, 5)),
                        jnp.float32)
  fixed = _prepare(ro, rewards)
  same = _prepare(ro, rewards, jnp.ones((4, 5), bool))
  jax.tree.map(np.testing.assert_array_equal, fixed.batch, same.batch)
  for k, v in fixed.stats.items():
    np.testing.assert_allclose(v, same.stats[k], rtol=1e-6, err_msg=k)
  assert float(fixed.stats["rollout/n_mean"]) == 5.0


def test_prepare_ignores_padding_rows():
  ro = _rollouts(5)
  rewards, valid = _unequal(6)
  out = _prepare(ro, jnp.nan_to_num(rewards, nan=1.0), valid)
  # Padding rows: masked out of the batch, the stats and the mass terms.
  assert not bool(jnp.any(out.batch.mask & ~valid))
  assert float(out.stats["rollout/generated_tokens"]) == float(
      jnp.where(valid, ro.lengths, 0).sum())
  r = np.asarray(rewards)[np.asarray(valid)]
  assert float(out.stats["reward/mean"]) == pytest.approx(r.mean())
  assert float(out.stats["rollout/n_min"]) == 2
  assert float(out.stats["rollout/n_max"]) == 5
  assert float(out.stats["rollout/mixed_share"]) == pytest.approx(1.0)
