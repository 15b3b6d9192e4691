"""The loss options `algo.loss.ratio = "sequence"` (GSPO) and
`algo.loss.mask_truncated` (DAPO's overlong filtering), each against a
plain reference implementation of its formula.

GSPO (Zheng et al. 2025, eqs. 5-7): with s_i = exp(mean_t log(pi/pi_old))
over rollout i's response tokens,

  J = (1/G) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i),

and the loss is -J. Overlong filtering: a rollout that did not stop before
`max_new_tokens` contributes no token to the loss or its normalizer, while
its reward still counts in the group baseline.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brorl_jax.config import ConfigError
from brorl_jax.rl import advantages as adv_lib
from brorl_jax.rl import batch as batch_lib
from brorl_jax.rl import losses
from brorl_jax.rl.shaping import ShapingConfig
from brorl_jax.rollout import Rollouts


def _gspo_reference(logp, old, adv, mask, eps_low, eps_high):
  """GSPO's loss written per sequence, as the paper states it."""
  terms = []
  for i in range(logp.shape[0]):
    n = mask[i].sum()
    if n == 0:
      continue
    s = jnp.exp(jnp.sum(jnp.where(mask[i] > 0, logp[i] - old[i], 0.0)) / n)
    terms.append(-jnp.minimum(s * adv[i],
                              jnp.clip(s, 1 - eps_low, 1 + eps_high) * adv[i]))
  return sum(terms) / len(terms)


def _gspo_reference_token_mean(logp, old, adv, mask, eps_low, eps_high):
  """The same per-sequence terms weighted by their token counts."""
  total = 0.0
  for i in range(logp.shape[0]):
    n = mask[i].sum()
    if n == 0:
      continue
    s = jnp.exp(jnp.sum(jnp.where(mask[i] > 0, logp[i] - old[i], 0.0)) / n)
    total += n * -jnp.minimum(s * adv[i],
                              jnp.clip(s, 1 - eps_low, 1 + eps_high) * adv[i])
  return total / mask.sum()


def _inputs(seed, b=6, t=7, spread=0.3):
  rng = np.random.default_rng(seed)
  old = -rng.uniform(0.1, 3.0, (b, t)).astype(np.float32)
  logp = (old + rng.normal(0, spread, (b, t))).astype(np.float32)
  adv = rng.normal(0, 1, (b,)).astype(np.float32)
  lengths = rng.integers(1, t + 1, (b,))
  lengths[-1] = 0                                  # a fully masked row
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  logp[mask == 0] = np.nan                         # padding garbage
  return logp, old, adv, mask


@pytest.mark.parametrize("seed, eps", [(0, (0.2, 0.28)), (1, (3e-4, 4e-4)),
                                       (2, (3e-4, 4e-4))])
def test_sequence_ratio_matches_gspo_value_and_gradient(seed, eps):
  logp, old, adv, mask = _inputs(seed)
  cfg = losses.LossConfig(eps_low=eps[0], eps_high=eps[1], ratio="sequence",
                          aggregation="sequence_mean")
  clean = jnp.asarray(np.nan_to_num(logp))
  fn = lambda lp: losses.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv),
                                     jnp.asarray(mask), cfg)[0]
  ref = lambda lp: _gspo_reference(lp, old, adv, mask, *eps)
  np.testing.assert_allclose(float(jax.jit(fn)(jnp.asarray(logp))),
                             float(ref(clean)), rtol=1e-5, atol=1e-7)
  grad = np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(logp)))
  ref_grad = np.asarray(jax.grad(ref)(clean))
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
  assert np.all(grad[mask == 0] == 0)
  # Some sequences are clipped at the tight clip and some are not, so the
  # comparison covers both branches.
  if eps[0] < 1e-3:
    per_row = np.abs(ref_grad[:-1]).sum(-1)
    assert np.any(per_row == 0) and np.any(per_row > 0)


@pytest.mark.parametrize("seed", [3])
def test_sequence_ratio_with_token_mean_weights_sequences_by_length(seed):
  logp, old, adv, mask = _inputs(seed)
  cfg = losses.LossConfig(ratio="sequence", aggregation="token_mean")
  clean = jnp.asarray(np.nan_to_num(logp))
  fn = lambda lp: losses.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv),
                                     jnp.asarray(mask), cfg)[0]
  ref = lambda lp: _gspo_reference_token_mean(lp, old, adv, mask, 0.2, 0.28)
  np.testing.assert_allclose(float(fn(jnp.asarray(logp))), float(ref(clean)),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(jax.grad(fn)(jnp.asarray(logp))),
                             np.asarray(jax.grad(ref)(clean)), rtol=1e-4,
                             atol=1e-7)


def test_sequence_ratio_clips_whole_sequences():
  # Row 0: token ratios 2.0 and 0.5 -> s = 1: no clip, although each token
  # alone would be clipped. Row 1: both tokens at 1.5 -> s = 1.5, clipped.
  old = np.zeros((2, 2), np.float32) - 1.0
  logp = old + np.log(np.array([[2.0, 0.5], [1.5, 1.5]], np.float32))
  mask = np.ones((2, 2), np.float32)
  adv = np.array([1.0, 1.0], np.float32)
  args = (jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
          jnp.asarray(mask))
  _, tok = losses.policy_loss(*args, losses.LossConfig())
  _, seq = losses.policy_loss(*args, losses.LossConfig(ratio="sequence"))
  assert float(tok["clip_frac_high"]) == pytest.approx(0.75)
  assert float(seq["clip_frac_high"]) == pytest.approx(0.5)
  assert float(seq["ratio_max"]) == pytest.approx(1.5, rel=1e-6)
  assert float(seq["ratio_min"]) == pytest.approx(1.0, rel=1e-6)
  # approx_kl stays the per-token k3 of the token ratios.
  assert float(seq["approx_kl"]) == pytest.approx(float(tok["approx_kl"]))


def test_token_ratio_is_the_default_and_bad_values_are_named():
  assert losses.LossConfig().ratio == "token"
  assert losses.LossConfig().mask_truncated is False
  with pytest.raises(ConfigError, match="algo.loss.ratio"):
    losses.LossConfig(ratio="seq")
  with pytest.raises(ConfigError, match="algo.loss.mask_truncated"):
    losses.LossConfig(mask_truncated="yes")


# ---- mask_truncated ---------------------------------------------------------


def _rollouts(seed, p=4, g=6, t=5, v=16):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, t + 1, (p, g))
  stopped = rng.random((p, g)) < 0.6
  lengths[~stopped] = t                      # a truncated row used all T
  return Rollouts(
      tokens=jnp.asarray(rng.integers(0, v, (p, g, t)), jnp.int32),
      logprobs=jnp.asarray(-rng.uniform(0.1, 2, (p, g, t)), jnp.float32),
      lengths=jnp.asarray(lengths, jnp.int32), stopped=jnp.asarray(stopped),
      first_probs=jax.nn.softmax(jnp.asarray(rng.normal(size=(p, v)),
                                             jnp.float32), -1),
      finished_slots=jnp.int32(0), total_slots=jnp.int32(1))


def _prepare(ro, rewards, mask_truncated):
  cfg = batch_lib.BatchConfig(
      num_groups=rewards.shape[0], max_new_tokens=ro.tokens.shape[-1],
      correct_threshold=0.5, advantage=adv_lib.AdvantageConfig(
          dynamic_sampling=False),
      shaping=ShapingConfig(), mask_truncated=mask_truncated)
  p = rewards.shape[0]
  # Jitted, as the loop runs it: one compile instead of op-by-op dispatch.
  return jax.jit(batch_lib.prepare, static_argnums=0)(
      cfg, jnp.ones((p, 3), jnp.int32), jnp.full((p,), 3, jnp.int32), ro,
      rewards, jnp.int32(0))


def _ppo_reference(logp, old, adv, lengths, keep, eps_low=0.2,
                   eps_high=0.28):
  """Token-mean PPO-clip over the tokens of the kept rollouts, plainly."""
  total, count = 0.0, 0
  for i in range(logp.shape[0]):
    if not keep[i]:
      continue
    for t in range(lengths[i]):
      r = np.exp(logp[i, t] - old[i, t])
      total += -min(r * adv[i], np.clip(r, 1 - eps_low, 1 + eps_high) * adv[i])
      count += 1
  return total / count


@pytest.mark.parametrize("seed", [0])
def test_mask_truncated_drops_truncated_rollouts_from_the_loss(seed):
  ro = _rollouts(seed)
  rng = np.random.default_rng(seed + 10)
  rewards = jnp.asarray(rng.integers(0, 2, ro.lengths.shape), jnp.float32)
  on = _prepare(ro, rewards, True)
  off = _prepare(ro, rewards, False)
  stopped = np.asarray(ro.stopped)
  assert not stopped.all() and stopped.any()
  # Advantages (group baselines) are those of the unmasked batch.
  np.testing.assert_array_equal(np.asarray(on.batch.advantages),
                                np.asarray(off.batch.advantages))
  np.testing.assert_array_equal(np.asarray(on.batch.mask),
                                np.asarray(off.batch.mask) & stopped)
  assert int(on.stats["rollout/truncated_masked"]) == int(
      (np.asarray(off.batch.mask) & ~stopped).sum())
  assert "rollout/truncated_masked" not in off.stats

  rows = batch_lib.make_rows(on.batch)
  r = rows.targets.shape[0]
  logp = np.asarray(rows.old_logp) + rng.normal(0, 0.3, rows.old_logp.shape
                                                ).astype(np.float32)
  loss, _ = losses.policy_loss(jnp.asarray(logp), rows.old_logp,
                               rows.advantages, rows.loss_mask,
                               losses.LossConfig())
  keep = np.asarray(on.batch.mask).reshape(r)
  expected = _ppo_reference(logp, np.asarray(rows.old_logp),
                            np.asarray(rows.advantages),
                            np.asarray(ro.lengths).reshape(r), keep)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
