"""Golden numbers for the PPO-clip loss, KL estimators, the ratio cap, and
exact gradient accumulation over micro-batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brorl_jax import config as config_lib
from brorl_jax.rl import losses

LN = math.log
# Two rollouts, three positions. Ratios r = pi/pi_old per token:
#   row 0, A = +1: r = 1.5, 1.1, 0.5
#   row 1, A = -2: r = 0.5, 0.9, (masked; its logp is NaN padding)
OLD = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7]], np.float32)
LOG_R = np.array([[LN(1.5), LN(1.1), LN(0.5)], [LN(0.5), LN(0.9), 0.0]])
LOGP = (OLD + LOG_R).astype(np.float32)
LOGP[1, 2] = np.nan
ADV = np.array([1.0, -2.0], np.float32)
MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
# Per-token pg = -min(r A, clip(r, 0.8, 1.28) A):
#   row 0: -1.28 (high clip binds), -1.1, -0.5 (r < 0.8 but A > 0: unclipped)
#   row 1: -2 * max(r, clip r): 1.6 (low clip binds), 1.8
# token_mean: (-2.88 + 3.4) / 5 = 0.104; sequence_mean: (-0.96 + 1.7)/2.
PG_TOKEN_MEAN = 0.104
PG_SEQUENCE_MEAN = 0.37


def _loss(cfg, logp=LOGP, old=OLD, adv=ADV, mask=MASK, **kw):
  fn = jax.jit(losses.policy_loss, static_argnames=("cfg",))
  return fn(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
            jnp.asarray(mask), cfg=cfg, **kw)


def _grad_logp(cfg, logp=LOGP, old=OLD, adv=ADV, mask=MASK, **kw):
  fn = lambda lp: losses.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv),
                                     jnp.asarray(mask), cfg, **kw)[0]
  return np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(logp)))


@pytest.mark.parametrize("aggregation,expected", [
    ("token_mean", PG_TOKEN_MEAN), ("sequence_mean", PG_SEQUENCE_MEAN)])
def test_clip_higher_golden(aggregation, expected):
  cfg = losses.LossConfig(eps_low=0.2, eps_high=0.28, aggregation=aggregation)
  loss, aux = _loss(cfg)
  assert float(loss) == pytest.approx(expected, abs=1e-6)
  assert float(aux["pg_loss"]) == pytest.approx(expected, abs=1e-6)
  assert float(aux["kl_loss"]) == 0.0 and float(aux["kl_ref"]) == 0.0
  # One token each where the high / the low clip binds, out of 5.
  assert float(aux["clip_frac_high"]) == pytest.approx(0.2)
  assert float(aux["clip_frac_low"]) == pytest.approx(0.2)
  assert float(aux["ratio_mean"]) == pytest.approx(0.9, abs=1e-6)
  assert float(aux["ratio_max"]) == pytest.approx(1.5, abs=1e-6)
  assert float(aux["ratio_min"]) == pytest.approx(0.5, abs=1e-6)
  # |log r|: ln 1.5, ln 1.1, ln 2, ln 2, ln(1/0.9); sum 1.9924302.
  assert float(aux["logp_diff_mean"]) == pytest.approx(0.3984860, abs=1e-6)
  assert float(aux["logp_diff_max"]) == pytest.approx(0.6931472, abs=1e-6)
  # k3 of (r - 1 - ln r): .0945349 + .0046898 + 2 * .1931472 + .0053605.
  assert float(aux["approx_kl"]) == pytest.approx(0.0981759, abs=1e-6)
  assert float(aux["num_tokens"]) == 5 and float(aux["num_sequences"]) == 2


def test_symmetric_clip_golden():
  # eps_high = 0.2: row 0 token 0 becomes -1.2, so token_mean = 0.6 / 5.
  cfg = losses.LossConfig(eps_low=0.2, eps_high=0.2)
  loss, aux = _loss(cfg)
  assert float(loss) == pytest.approx(0.12, abs=1e-6)
  assert float(aux["clip_frac_high"]) == pytest.approx(0.2)
  # A wider high clip (0.6) no longer binds on r = 1.5: (-3.1 + 3.4) / 5.
  loss, aux = _loss(losses.LossConfig(eps_high=0.6))
  assert float(loss) == pytest.approx(0.06, abs=1e-6)
  assert float(aux["clip_frac_high"]) == 0.0


def test_gradient_golden():
  # d pg / d logp = -A r on unclipped tokens, 0 on clipped ones, / 5:
  # row 0: 0, -1.1, -0.5; row 1: 0, +1.8, 0 (masked).
  cfg = losses.LossConfig()
  np.testing.assert_allclose(_grad_logp(cfg),
                             [[0, -0.22, -0.1], [0, 0.36, 0]], atol=1e-6)


# log(pi_ref / pi) for the five real tokens: 0.5, -1, 0 | 0.2, -0.3.
REF_LOG_R = np.array([[0.5, -1.0, 0.0], [0.2, -0.3, 0.0]], np.float32)
KL_GOLDEN = {  # mean over the 5 tokens of each estimator
    "k1": (-0.5 + 1.0 + 0 - 0.2 + 0.3) / 5,                   # -log_r
    "k2": (0.125 + 0.5 + 0 + 0.02 + 0.045) / 5,               # log_r^2 / 2
    "k3": (0.1487213 + 0.3678794 + 0 + 0.0214028 + 0.0408182) / 5,
}


@pytest.mark.parametrize("estimator", sorted(KL_GOLDEN))
def test_kl_estimators_golden(estimator):
  ref = LOGP + REF_LOG_R
  cfg = losses.LossConfig(kl_coef=0.1, kl_estimator=estimator)
  loss, aux = _loss(cfg, ref_logp=jnp.asarray(ref))
  assert float(aux["kl_ref"]) == pytest.approx(KL_GOLDEN[estimator], abs=1e-6)
  assert float(aux["kl_loss"]) == pytest.approx(
      0.1 * KL_GOLDEN[estimator], abs=1e-7)
  assert float(loss) == pytest.approx(
      PG_TOKEN_MEAN + 0.1 * KL_GOLDEN[estimator], abs=1e-6)
  # beta = 0: the KL is reported but not in the loss.
  loss0, aux0 = _loss(losses.LossConfig(kl_estimator=estimator),
                      ref_logp=jnp.asarray(ref))
  assert float(loss0) == pytest.approx(PG_TOKEN_MEAN, abs=1e-6)
  assert float(aux0["kl_ref"]) == pytest.approx(KL_GOLDEN[estimator],
                                                abs=1e-6)


def test_kl_penalty_values_and_clamp():
  logp = jnp.zeros(4)
  ref = jnp.array([0.5, -1.0, 0.0, 12.0])  # 12 is clamped to 10
  k = lambda e: np.asarray(losses.kl_penalty(logp, ref, e, clamp=10.0))
  np.testing.assert_allclose(k("k1"), [-0.5, 1.0, 0.0, -10.0], atol=1e-6)
  np.testing.assert_allclose(k("k2"), [0.125, 0.5, 0.0, 50.0], atol=1e-6)
  # e^0.5 - 1.5, e^-1, 0, e^10 - 11
  np.testing.assert_allclose(k("k3"), [0.1487213, 0.3678794, 0.0,
                                       22015.4657948], rtol=1e-6)


def test_kl_gradient_k2():
  # d/dlogp of 0.5 (ref - logp)^2 = -(ref - logp) = -log_r; beta 0.1, / 5.
  ref = LOGP + REF_LOG_R
  cfg = losses.LossConfig(kl_coef=0.1, kl_estimator="k2")
  grad = _grad_logp(cfg, ref_logp=jnp.asarray(ref))
  pg = np.array([[0, -0.22, -0.1], [0, 0.36, 0]])
  kl = -0.1 * REF_LOG_R / 5 * MASK
  np.testing.assert_allclose(grad, pg + kl, atol=1e-6)


def test_entropy_bonus_and_metric():
  ent = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, np.nan]], np.float32)
  cfg = losses.LossConfig(entropy_coef=0.01)
  loss, aux = _loss(cfg, entropy=jnp.asarray(ent))
  assert float(aux["entropy"]) == pytest.approx(3.0)
  assert float(aux["entropy_bonus"]) == pytest.approx(0.03)
  assert float(loss) == pytest.approx(PG_TOKEN_MEAN - 0.03, abs=1e-6)


# Ratio cap: one rollout, A = -1, r = 3.0, 1.5, 0.5. Uncapped per-token pg =
# -A max(r, clip r) = 3, 1.5, 0.8: mean 5.3 / 3.
CAP_OLD = np.zeros((1, 3), np.float32)
CAP_LOGP = np.log(np.array([[3.0, 1.5, 0.5]], np.float32))
CAP_ADV = np.array([-1.0], np.float32)
CAP_MASK = np.ones((1, 3), np.float32)


def _cap(cfg):
  args = dict(logp=CAP_LOGP, old=CAP_OLD, adv=CAP_ADV, mask=CAP_MASK)
  loss, aux = _loss(cfg, **args)
  return float(loss), aux, _grad_logp(cfg, **args)


def test_ratio_cap_truncate_golden():
  loss, aux, grad = _cap(losses.LossConfig())
  assert loss == pytest.approx(5.3 / 3, abs=1e-6)
  np.testing.assert_allclose(grad, [[3 / 3, 1.5 / 3, 0]], atol=1e-6)
  # C = 2: r = 3 counts as 2 in value and in gradient weight.
  loss, aux, grad = _cap(losses.LossConfig(ratio_cap=2.0))
  assert loss == pytest.approx(4.3 / 3, abs=1e-6)
  np.testing.assert_allclose(grad, [[2 / 3, 1.5 / 3, 0]], atol=1e-6)
  assert float(aux["ratio_capped_frac"]) == pytest.approx(1 / 3)
  assert float(aux["clip_frac_low"]) == pytest.approx(1 / 3)  # r = 0.5
  assert float(aux["ratio_max"]) == pytest.approx(3.0, abs=1e-5)  # raw r


def test_ratio_cap_mask_golden():
  # ICE-POP keeps r in [0.6, 2]: only r = 1.5 remains, still / 3 tokens.
  cfg = losses.LossConfig(ratio_cap=2.0, ratio_cap_mode="mask",
                          ratio_cap_low=0.6)
  loss, aux, grad = _cap(cfg)
  assert loss == pytest.approx(0.5, abs=1e-6)
  np.testing.assert_allclose(grad, [[0, 0.5, 0]], atol=1e-6)
  assert float(aux["ratio_capped_frac"]) == pytest.approx(2 / 3)


def _random_batch(seed, b=6, t=5):
  rng = np.random.default_rng(seed)
  old = rng.normal(-1.5, 0.5, (b, t)).astype(np.float32)
  logp = (old + rng.normal(0, 0.3, (b, t))).astype(np.float32)
  ref = (old + rng.normal(0, 0.3, (b, t))).astype(np.float32)
  ent = rng.uniform(0.5, 3.0, (b, t)).astype(np.float32)
  adv = rng.normal(0, 1, b).astype(np.float32)
  lengths = np.array([5, 3, 0, 1, 4, 2])[:b]
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  return logp, old, ref, ent, adv, mask


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_micro_batch_accumulation_equals_full_batch(aggregation):
  logp, old, ref, ent, adv, mask = _random_batch(0)
  cfg = losses.LossConfig(aggregation=aggregation, kl_coef=0.05,
                          entropy_coef=0.01, ratio_cap=1.3)
  norm = losses.loss_normalizer(jnp.asarray(mask), aggregation)
  assert float(norm) == (15 if aggregation == "token_mean" else 5)

  def loss_fn(lp, rows, normalizer):
    sl = slice(*rows)
    return losses.policy_loss(lp, old[sl], adv[sl], mask[sl], cfg,
                              ref_logp=ref[sl], entropy=ent[sl],
                              normalizer=normalizer)[0]

  grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
  full_loss, full_grad = grad_fn(logp, (0, 6), norm)
  parts = [grad_fn(logp[a:b], (a, b), norm) for a, b in ((0, 2), (2, 6))]
  acc_loss = parts[0][0] + parts[1][0]
  acc_grad = np.concatenate([np.asarray(g) for _, g in parts])
  # Same per-token arithmetic: the gradients agree bit for bit; the loss
  # only differs by the order of the float additions.
  np.testing.assert_array_equal(acc_grad, np.asarray(full_grad))
  assert float(acc_loss) == pytest.approx(float(full_loss), rel=1e-6)
  # The local normalizer of a micro-batch would weigh it differently.
  local = loss_fn(logp[0:2], (0, 2), None) + loss_fn(logp[2:6], (2, 6), None)
  assert abs(float(local) - float(full_loss)) > 1e-3


def test_reduce_aux_equals_full_batch_aux():
  logp, old, ref, ent, adv, mask = _random_batch(1)
  cfg = losses.LossConfig(kl_coef=0.05, entropy_coef=0.01)
  norm = losses.loss_normalizer(jnp.asarray(mask), cfg.aggregation)
  run = lambda sl: losses.policy_loss(
      jnp.asarray(logp[sl]), old[sl], adv[sl], mask[sl], cfg,
      ref_logp=ref[sl], entropy=ent[sl], normalizer=norm)
  _, full = run(slice(0, 6))
  micro = [run(sl)[1] for sl in (slice(0, 3), slice(3, 6))]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *micro)
  combined = losses.reduce_aux(stacked)
  assert set(combined) == set(full)
  for key in full:
    assert float(combined[key]) == pytest.approx(float(full[key]), rel=1e-5,
                                                 abs=1e-7), key


def test_empty_mask_is_finite_and_zero():
  cfg = losses.LossConfig(kl_coef=0.1)
  nan = jnp.full((2, 3), jnp.nan)
  fn = lambda lp: losses.policy_loss(lp, nan, jnp.zeros(2), jnp.zeros((2, 3)),
                                     cfg, ref_logp=nan)
  (loss, aux), grad = jax.value_and_grad(fn, has_aux=True)(nan)
  assert float(loss) == 0.0
  assert all(float(v) == 0.0 for v in aux.values())
  assert np.all(np.asarray(grad) == 0.0)


def test_missing_inputs_and_config_validation():
  with pytest.raises(ValueError, match="needs ref_logp"):
    losses.policy_loss(LOGP, OLD, ADV, MASK, losses.LossConfig(kl_coef=0.1))
  with pytest.raises(ValueError, match="needs entropy"):
    losses.policy_loss(LOGP, OLD, ADV, MASK,
                       losses.LossConfig(entropy_coef=0.1))
  bad = [({"aggregation": "sum"}, "algo.loss.aggregation"),
         ({"kl_estimator": "k4"}, "algo.loss.kl_estimator"),
         ({"eps_low": 1.2}, "algo.loss.eps_low"),
         ({"ratio_cap": 0.5}, "algo.loss.ratio_cap"),
         ({"ratio_cap_mode": "clip"}, "algo.loss.ratio_cap_mode"),
         ({"kl_coef": -1.0}, "algo.loss.kl_coef")]
  for kwargs, key in bad:
    with pytest.raises(config_lib.ConfigError, match=key):
      losses.LossConfig(**kwargs)
