"""Tests for brorl_jax.rl.mass_balance against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np

from brorl_jax import simulator
from brorl_jax.rl import mass_balance as mb

TERM_KEYS = ("p_pos", "p_neg", "a2", "b2", "s_r", "unsampled_mass", "u2",
             "term1_lb", "term2_lb", "term3_bound", "margin",
             "num_sampled_correct", "num_sampled_incorrect")


def reference(probs, first_tokens, rewards, valid, threshold):
  """Per-prompt loops in float64, written from PAPER.md / DESIGN.md §4."""
  probs = np.asarray(probs, np.float64)
  out = {k: [] for k in TERM_KEYS}
  sets = []
  for p in range(probs.shape[0]):
    outcomes = {}
    for tok, r, ok in zip(first_tokens[p], rewards[p], valid[p]):
      if ok:
        outcomes.setdefault(int(tok), []).append(float(r))
    a = sorted(t for t, rs in outcomes.items() if np.mean(rs) >= threshold)
    b = sorted(t for t, rs in outcomes.items() if np.mean(rs) < threshold)
    sets.append((a, b))
    pr = probs[p]
    p_pos, p_neg = pr[a].sum(), pr[b].sum()
    a2, b2 = (pr[a] ** 2).sum(), (pr[b] ** 2).sum()
    s_r = 1.0 * p_pos + (-1.0) * p_neg
    u2 = (pr ** 2).sum() - a2 - b2
    t1, t2, t3 = (1 - s_r) * p_neg * a2, (s_r + 1) * p_pos * b2, abs(s_r) * u2
    for k, v in zip(TERM_KEYS, (p_pos, p_neg, a2, b2, s_r, 1 - p_pos - p_neg,
                                u2, t1, t2, t3, t1 + t2 - t3, len(a), len(b))):
      out[k].append(v)
  return {k: np.array(v) for k, v in out.items()}, sets


def first_token_terms(probs, first_tokens, rewards, valid, threshold):
  """Theorem 1's observable terms per prompt from one step's rollouts, as
  `rl/batch.prepare` composes them."""
  correct, incorrect = mb.first_token_masks(first_tokens, rewards, valid,
                                            probs.shape[-1], threshold)
  return mb.terms_from_masks(probs, correct, incorrect)


def check_against_reference(probs, tokens, rewards, valid, threshold):
  probs = np.asarray(probs, np.float32)
  args = (jnp.asarray(probs), jnp.asarray(tokens, jnp.int32),
          jnp.asarray(rewards, jnp.float32), jnp.asarray(valid, bool))
  got = jax.jit(first_token_terms)(*args, threshold)
  want, sets = reference(probs, np.asarray(tokens),
                         np.asarray(rewards, np.float32), np.asarray(valid),
                         threshold)
  assert set(got) == set(TERM_KEYS)
  for k in TERM_KEYS:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5,
                               atol=1e-7, err_msg=k)
  correct, incorrect = mb.first_token_masks(*args[1:], probs.shape[1],
                                            threshold)
  for p, (a, b) in enumerate(sets):
    assert np.flatnonzero(np.asarray(correct[p])).tolist() == a
    assert np.flatnonzero(np.asarray(incorrect[p])).tolist() == b
  return got, sets


def _probs(rng, p, v):
  return rng.dirichlet(np.full(v, 0.3), size=p).astype(np.float32)


def test_hand_built_cases():
  rng = np.random.default_rng(0)
  v = 12
  probs = _probs(rng, 6, v)
  probs[0] = np.full(v, 1.0 / v)            # every probability tied
  tokens = np.array([
      [3, 3, 5, 5, 7, 7, 9, 9],             # tied probs, pairs of tokens
      [4, 4, 4, 4, 4, 4, 4, 4],             # one token sampled many times
      [1, 2, 1, 2, 3, 3, 0, 11],            # all-correct group
      [1, 2, 1, 2, 3, 3, 0, 11],            # all-wrong group
      [0, 1, 2, 3, 3, 4, 4, 5],             # fractional, around 0.5
      [6, 6, 7, 8, 8, 9, 10, -1],           # invalid rollouts masked
  ])
  rewards = np.array([
      [1, 0, 1, 1, 0, 0, 0.5, 0.5],
      [1, 0, 0, 0, 1, 0, 0, 1],             # mean 3/8 < 0.5: incorrect
      [1, 1, 1, 1, 1, 1, 1, 1],
      [0, 0, 0, 0, 0, 0, 0, 0],
      [0.49, 0.5, 0.51, 0.49, 0.51, 0.4, 0.59, 0.5],
      [1, 0, 0, 1, 1, 0, 1, 0],
  ], np.float32)
  valid = np.ones_like(tokens, bool)
  valid[5] = [True, False, False, True, False, True, False, False]
  got, sets = check_against_reference(probs, tokens, rewards, valid, 0.5)
  assert sets[1] == ([], [4])
  assert sets[2][1] == [] and sets[3][0] == []
  # 0.49 wrong; 0.5, 0.51 right; (0.49 + 0.51) / 2 = 0.5 right (the tie);
  # (0.4 + 0.59) / 2 wrong.
  assert sets[4] == ([1, 2, 3, 5], [0, 4])
  # Token 6: the valid rollout has reward 1 and the invalid one 0; tokens
  # 7, 10 and the padding id -1 appear only in invalid rollouts.
  assert sets[5] == ([6, 8], [9])
  np.testing.assert_allclose(got["s_r"][2], got["p_pos"][2], rtol=1e-6)
  assert float(got["term1_lb"][2]) == 0.0 and float(got["term2_lb"][3]) == 0.0


def test_random_cases_match_reference():
  rng = np.random.default_rng(1)
  p, g, v = 8, 16, 40
  probs = _probs(rng, p, v)
  tokens = np.stack([rng.choice(v, g, p=row / row.sum()) for row in probs])
  rewards = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], (p, g)).astype(np.float32)
  valid = rng.random((p, g)) < 0.8
  valid[0] = False                          # a prompt with no valid rollout
  got, _ = check_against_reference(probs, tokens, rewards, valid, 0.5)
  assert float(got["unsampled_mass"][0]) == 1.0
  assert float(got["margin"][0]) == 0.0


@jax.jit
@jax.vmap
def _margin_and_bracket(key):
  z, correct, token_rewards = simulator.random_case(key, 30, 16)
  probs = jax.nn.softmax(z)
  bracket = simulator.theorem1_terms(probs, correct, token_rewards)["bracket"]
  terms = mb.terms_from_masks(probs[None], (token_rewards > 0)[None],
                              (token_rewards < 0)[None])
  return terms["margin"][0], bracket


def test_margin_lower_bounds_theorem_bracket():
  """margin <= Theorem 1's bracket for the true (hidden) correct set."""
  with jax.enable_x64(True):
    margin, bracket = _margin_and_bracket(
        jax.random.split(jax.random.key(0), 64))
    margin, bracket = np.asarray(margin), np.asarray(bracket)
    assert np.all(margin <= bracket + 1e-7)
    assert np.any(margin > 0) and np.any(margin < 0)


def test_realized_change_zero_when_unchanged():
  rng = np.random.default_rng(2)
  probs = jnp.asarray(_probs(rng, 4, 30))
  probs = probs.at[0, :5].set(0.0)          # zeros exercise 0 log 0
  tokens = jnp.asarray(rng.integers(0, 30, (4, 8)), jnp.int32)
  rewards = jnp.asarray(rng.random((4, 8)), jnp.float32)
  masks = mb.first_token_masks(tokens, rewards, jnp.ones((4, 8), bool), 30,
                               0.5)
  change = jax.jit(mb.realized_first_token_change)(probs, probs, *masks)
  for k, v in change.items():
    assert np.all(np.asarray(v) == 0.0), k
  logp = jnp.asarray(rng.normal(size=(4, 8)) * 20, jnp.float32)
  seq = jax.jit(mb.sequence_logp_change)(logp, logp, rewards >= 0.5,
                                         jnp.ones((4, 8), bool))
  for k in ("dlogp_correct", "dlogp_incorrect", "frac_correct_rose",
            "worst_dlogp_correct"):
    assert float(seq[k]) == 0.0, k


def test_realized_change_matches_reference():
  rng = np.random.default_rng(3)
  before, after = _probs(rng, 3, 20), _probs(rng, 3, 20)
  correct = rng.random((3, 20)) < 0.3
  incorrect = ~correct & (rng.random((3, 20)) < 0.3)
  got = mb.realized_first_token_change(before, after, correct, incorrect)
  entropy = lambda x: -np.sum(np.where(x > 0, x * np.log(x), 0.0), -1)
  b64, a64 = before.astype(np.float64), after.astype(np.float64)
  want = {
      "d_correct_mass": ((a64 - b64) * correct).sum(-1),
      "d_incorrect_mass": ((a64 - b64) * incorrect).sum(-1),
      "d_unsampled_mass": ((a64 - b64) * ~(correct | incorrect)).sum(-1),
      "d_entropy": entropy(a64) - entropy(b64),
  }
  for k, v in want.items():
    np.testing.assert_allclose(np.asarray(got[k]), v, rtol=1e-5, atol=1e-6)


def test_sequence_logp_change():
  before = jnp.array([[-10.0, -20.0, -5.0, -7.0], [-3.0, -4.0, -8.0, -9.0]])
  after = jnp.array([[-9.0, -21.0, -5.5, -6.0], [-3.0, jnp.nan, -7.0, -9.5]])
  correct = jnp.array([[True, True, False, False], [True, True, True, False]])
  valid = jnp.array([[True, True, True, True], [True, False, True, True]])
  got = mb.sequence_logp_change(before, after, correct, valid)
  # correct & valid: +1, -1, 0, +1; incorrect & valid: -0.5, +1, -0.5.
  np.testing.assert_allclose(float(got["dlogp_correct"]), 0.25)
  np.testing.assert_allclose(float(got["dlogp_incorrect"]), 0.0, atol=1e-7)
  np.testing.assert_allclose(float(got["frac_correct_rose"]), 0.5)
  assert float(got["worst_dlogp_correct"]) == -1.0
  assert int(got["num_correct"]) == 4 and int(got["num_incorrect"]) == 3


def test_sequence_logp_change_empty_groups():
  logp = jnp.array([-1.0, -2.0, -3.0])
  valid = jnp.ones(3, bool)
  none_correct = mb.sequence_logp_change(logp, logp - 1, jnp.zeros(3, bool),
                                         valid)
  assert int(none_correct["num_correct"]) == 0
  assert all(np.isfinite(float(v)) for v in none_correct.values())
  assert float(none_correct["dlogp_incorrect"]) == -1.0
  nothing = mb.sequence_logp_change(logp, logp, jnp.ones(3, bool),
                                    jnp.zeros(3, bool))
  assert all(float(v) == 0.0 for v in nothing.values())


def test_summarize():
  terms = {"margin": jnp.array([1.0, -1.0, 2.0, jnp.nan]),
           "u2": jnp.array([0.1, 0.2, 0.3, 0.4])}
  mask = jnp.array([True, True, True, False])
  got = jax.jit(mb.summarize)(terms, mask)
  np.testing.assert_allclose(float(got["margin"]), 2.0 / 3.0, rtol=1e-6)
  np.testing.assert_allclose(float(got["u2"]), 0.2, rtol=1e-6)
  np.testing.assert_allclose(float(got["frac_margin_positive"]), 2.0 / 3.0,
                             rtol=1e-6)
  assert int(got["num_prompts"]) == 3
  empty = mb.summarize(terms, jnp.zeros(4, bool))
  assert all(float(v) == 0.0 for v in empty.values())
