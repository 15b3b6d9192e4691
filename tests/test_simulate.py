"""Tests for brorl_jax.simulate: Theorem 1 numerics, a short simulator run."""

import csv
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brorl_jax import simulate, simulator
from brorl_jax.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(num_actions=2000, num_correct=100, n_values=(4, 512),
             num_seeds=2, steps=60)


def _random_sets(key, vocab=40):
  """Random logits, correct set P and sampled sets A, B; N in [1, 64).

  Theorem 1 holds for any A, B (N enters only through 1/N), so the sets are
  drawn directly, with a per-case sampling rate, and N is a traced value:
  one compilation covers every case.
  """
  k_z, k_c, k_r, k_s, k_n = jax.random.split(key, 5)
  z = 2.0 * jax.random.normal(k_z, (vocab,))
  correct = jax.random.bernoulli(k_c, 0.3, (vocab,)).at[0].set(True)
  sampled = jax.random.bernoulli(k_s, jax.random.uniform(k_r, (), minval=0.05,
                                                         maxval=0.95), (vocab,))
  rewards = jnp.where(sampled, jnp.where(correct, 1.0, -1.0), 0.0)
  n = jax.random.randint(k_n, (), 1, 64).astype(z.dtype)
  return z, correct, rewards, n


@jax.jit
@jax.vmap
def _linear_case(key):
  z, correct, rewards, n = _random_sets(key)
  probs = jax.nn.softmax(z)
  terms = simulator.theorem1_terms(probs, correct, rewards)
  _, linear = simulator.step_delta_q(z, correct, rewards, n, 0.1)
  dz = -0.1 * jax.grad(simulator.set_surrogate)(z, rewards, n)
  # The paper's logit update: dz_j = (eta/N) p_j (R_j - S_R).
  dz_paper = 0.1 / n * probs * (rewards - terms["s_r"])
  return linear, 0.1 / n * terms["bracket"], dz, dz_paper, terms


def test_linearized_step_matches_theorem1():
  """Theorem 1 is the exact first-order change: float64 agreement."""
  with jax.enable_x64(True):
    linear, formula, dz, dz_paper, terms = _linear_case(
        jax.random.split(jax.random.key(0), 64))
    assert linear.dtype == jnp.float64
    np.testing.assert_array_less(np.abs(linear - formula),
                                 1e-12 * np.abs(formula))
    np.testing.assert_allclose(dz, dz_paper, rtol=1e-12, atol=1e-18)
    # The first two terms are never negative (R_w <= S_R <= R_c); the third
    # takes both signs across cases.
    assert np.all(terms["term1"] >= 0) and np.all(terms["term2"] >= 0)
    assert np.any(terms["term3"] > 0) and np.any(terms["term3"] < 0)


def test_finite_step_error_falls_like_eta():
  etas = (1e-1, 1e-2, 1e-3, 1e-4)
  errs = simulator.theorem_errors(jax.random.key(7), etas, n_values=(8,),
                                 cases=16, vocab=30)
  finite = errs["finite"]                                     # [E, C]
  assert finite.shape == (4, 16) and np.all(np.isfinite(finite))
  ratios = finite[:-1] / finite[1:]
  assert np.all((ratios > 8) & (ratios < 12)), ratios
  assert np.median(finite[-1]) < 1e-5
  assert errs["linear"].max() < 1e-12


def test_sample_actions_follows_probs():
  probs = jnp.array([0.5, 0.0, 0.2, 0.25, 0.05])
  draws = simulator.sample_actions(jax.random.key(0), probs, 200_000)
  freq = np.bincount(np.asarray(draws), minlength=5) / draws.shape[0]
  assert freq[1] == 0.0                     # probability 0: never drawn
  np.testing.assert_allclose(freq, probs, atol=4e-3)


def test_sample_surrogate_gradient():
  """Autograd through the softmax equals the closed form."""
  z = jax.random.normal(jax.random.key(1), (10,))
  actions = jnp.array([2, 2, 5, 7])
  centred = jnp.array([0.5, 0.5, -1.5, 0.5])
  grad = jax.jit(jax.grad(simulator.sample_surrogate))(z, actions, centred)
  p = np.asarray(jax.nn.softmax(z), np.float64)
  want = np.zeros(10)
  for a, r in zip(np.asarray(actions), np.asarray(centred)):
    want -= r * p[a] * (np.eye(10)[a] - p) / 4
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)


def test_config_validation():
  with pytest.raises(ConfigError, match="config.num_correct"):
    simulator.SimulatorConfig(num_actions=10, num_correct=10)
  with pytest.raises(ConfigError, match="config.dtype"):
    simulator.SimulatorConfig(dtype="bfloat16")
  assert simulator.SimulatorConfig(n_values=[4, 8]).n_values == (4, 8)


def test_short_run_writes_csv_and_png(tmp_path, capsys):
  cfg = simulator.SimulatorConfig(**SMALL, record_every=20)
  results = simulate.run_cli(cfg, str(tmp_path))
  assert "wall" in capsys.readouterr().out
  with open(tmp_path / "simulator.csv") as f:
    rows = list(csv.reader(f))
  assert tuple(rows[0]) == ("n", "seed", "step", "q_pos", "pct_improved",
                            "worst_drop", "entropy")
  steps = sorted({int(r[2]) for r in rows[1:]})
  assert steps == [0, 20, 40, 60]
  assert len(rows) - 1 == 2 * 2 * 4
  first = [r for r in rows[1:] if r[2] == "0"]
  assert all(float(r[4]) == 0.0 and float(r[5]) == 0.0 for r in first)
  assert (tmp_path / "simulator.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # Behaviour: at N = 512 the correct mass grows in every seed and more
  # correct actions improve than at N = 4.
  big, small = results[512], results[4]
  assert np.all(big["q_pos"][:, -1] > big["q_pos"][:, 0] + 1e-4)
  assert big["q_pos"][:, -1].mean() > small["q_pos"][:, -1].mean()
  assert big["pct_improved"][:, -1].mean() > small["pct_improved"][:, -1].mean()
  z0 = np.array([5.0] + [3.0] * 99 + [0.0] * 1900)
  np.testing.assert_allclose(big["q_pos"][:, 0],
                             np.exp(z0[:100]).sum() / np.exp(z0).sum(),
                             rtol=1e-6)


def test_default_initial_state():
  """PAPER.md §3: Q0 ~ 0.6301, p_anchor ~ 4.65e-4, p_correct ~ 6.30e-5."""
  cfg = simulator.SimulatorConfig()
  probs = np.asarray(jax.nn.softmax(simulator.initial_logits(cfg)))
  assert probs.shape == (128_000,)
  np.testing.assert_allclose(probs[:10_000].sum(), 0.6301, atol=1e-4)
  np.testing.assert_allclose(probs[0], 4.65e-4, rtol=2e-3)
  np.testing.assert_allclose(probs[1], 6.30e-5, rtol=2e-3)
  rewards = np.asarray(simulator.action_rewards(cfg))
  assert (rewards[:10_000] == 1).all() and (rewards[10_000:] == -1).all()


def test_cli_with_overrides(tmp_path):
  cmd = [sys.executable, "-m", "brorl_jax.simulate",
         "--config", "configs/simulator.py", "--out", str(tmp_path),
         "--config.num_actions=500", "--config.num_correct=50",
         "--config.n_values=(4,)", "--config.num_seeds=1",
         "--config.steps=5"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr
  assert "step 5" in proc.stdout
  with open(tmp_path / "simulator.csv") as f:
    assert len(f.readlines()) == 1 + 6
