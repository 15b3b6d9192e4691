"""Token-level simulator of BroRL's Figure 3; numerical check of Theorem 1.

Run it with `python -m brorl_jax.simulate` (see simulate.py).

Simulator (PAPER.md §3). One decoding position with d actions; actions
[0, num_correct) are correct (R = +1, action 0 is the anchor), the rest have
R = -1. Each step draws N i.i.d. actions from p = softmax(z) by inverse CDF,
centres their rewards on the batch mean, and takes an AdamW step on the
paper's sample-based surrogate

  L_sur(z) = -(1/N) sum_j r~_j p_{y_j}(z),   r~_j = R_{y_j} - mean_k R_{y_k},

a sum over the N draws (an action drawn twice counts twice), differentiated
through the softmax by autograd. Runs are `lax.scan` over steps and `vmap`
over seeds; every step is recorded.

Theorem check (PAPER.md §1-2). Theorem 1 is about a different surrogate: the
set-based -(1/N) sum_i R_i p_i over the vocabulary, with each distinct sampled
token counted once, uncentred R_c = +1 / R_w = -1, unsampled tokens 0, and one
plain gradient step of size eta. `--check_theorem` compares the measured
change of Q_pos after that step with the theorem's three terms in float64.

This module is the device side (pure jnp); `simulate.py` is the command
line (CSV, PNG, tables).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from brorl_jax.config import check, check_choice
from brorl_jax.rl.train_state import OptimConfig, make_optimizer

METRICS = ("q_pos", "pct_improved", "worst_drop", "entropy")
CSV_COLUMNS = ("n", "seed", "step") + METRICS


@dataclasses.dataclass(frozen=True)
class SimulatorConfig:
  """The simulator's setup (defaults: the paper's Figure 3).

  Attributes:
    num_actions: d, the number of actions (tokens).
    num_correct: |P|, actions [0, num_correct) with reward +1; the rest -1.
    logit_correct: initial logit of correct actions.
    logit_anchor: initial logit of the anchor, correct action 0.
    logit_other: initial logit of incorrect actions.
    n_values: the N values (samples per step) to simulate, one run each.
    num_seeds: independent runs per N.
    seed: root PRNG seed; run k of N uses fold_in(fold_in(key(seed), N), k).
    steps: T, the number of optimizer steps.
    learning_rate: eta, AdamW's learning rate.
    b1: AdamW beta1 (unstated in the paper; PyTorch default).
    b2: AdamW beta2 (unstated; PyTorch default).
    eps: AdamW epsilon (unstated; PyTorch default).
    weight_decay: AdamW decoupled weight decay (unstated; PyTorch default).
    record_every: the CSV keeps steps that are multiples of this, and the last.
    dtype: "float32" or "float64" (the latter runs under jax_enable_x64).
  """
  num_actions: int = 128_000
  num_correct: int = 10_000
  logit_correct: float = 3.0
  logit_anchor: float = 5.0
  logit_other: float = 0.0
  n_values: tuple[int, ...] = (4, 8, 16, 512, 51200)
  num_seeds: int = 3
  seed: int = 0
  steps: int = 1000
  learning_rate: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01
  record_every: int = 1
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "n_values", tuple(int(n) for n in self.n_values))
    check(self.num_actions >= 2, "config.num_actions",
          f"must be >= 2, got {self.num_actions}")
    check(1 <= self.num_correct < self.num_actions, "config.num_correct",
          f"must be in [1, num_actions), got {self.num_correct}")
    check(bool(self.n_values) and min(self.n_values) >= 1, "config.n_values",
          f"must be a non-empty tuple of N >= 1, got {self.n_values}")
    check(self.num_seeds >= 1, "config.num_seeds",
          f"must be >= 1, got {self.num_seeds}")
    check(self.steps >= 1, "config.steps", f"must be >= 1, got {self.steps}")
    check(self.learning_rate > 0, "config.learning_rate",
          f"must be > 0, got {self.learning_rate}")
    check(0 <= self.b1 < 1, "config.b1", f"must be in [0, 1), got {self.b1}")
    check(0 <= self.b2 < 1, "config.b2", f"must be in [0, 1), got {self.b2}")
    check(self.eps >= 0, "config.eps", f"must be >= 0, got {self.eps}")
    check(self.weight_decay >= 0, "config.weight_decay",
          f"must be >= 0, got {self.weight_decay}")
    check(self.record_every >= 1, "config.record_every",
          f"must be >= 1, got {self.record_every}")
    check_choice(self.dtype, "config.dtype", ("float32", "float64"))

  def optim_config(self) -> OptimConfig:
    """The equivalent `optim` settings: AdamW at a constant rate, no clip."""
    return OptimConfig(learning_rate=self.learning_rate, b1=self.b1,
                       b2=self.b2, eps=self.eps,
                       weight_decay=self.weight_decay, grad_clip=0.0)


# ---------------------------------------------------------------------------
# Simulator (device code).
# ---------------------------------------------------------------------------


def initial_logits(cfg: SimulatorConfig) -> jax.Array:
  """The seeded initial logits z(0), `[d]`."""
  ids = jnp.arange(cfg.num_actions)
  z = jnp.where(ids < cfg.num_correct, cfg.logit_correct, cfg.logit_other)
  return z.at[0].set(cfg.logit_anchor).astype(cfg.dtype)


def action_rewards(cfg: SimulatorConfig) -> jax.Array:
  """R_i: +1 for the correct actions [0, num_correct), -1 otherwise; `[d]`."""
  ids = jnp.arange(cfg.num_actions)
  return jnp.where(ids < cfg.num_correct, 1.0, -1.0).astype(cfg.dtype)


def sample_actions(key: jax.Array, probs: jax.Array, n: int) -> jax.Array:
  """Draws `n` i.i.d. actions from `probs` by inverse CDF.

  A categorical over `[n, d]` would need n*d floats (20 GB at N = 51200);
  inverse CDF needs the `[d]` cumulative sum and a binary search per draw.

  Args:
    key: PRNG key.
    probs: `[d]` probabilities.
    n: number of draws.

  Returns:
    `[n]` int32 action ids.
  """
  cdf = jnp.cumsum(probs)                                     # [d]
  # Scale by the total so rounding in the cumulative sum cannot leave a gap
  # at the top; side="right" never returns an action of probability 0.
  u = jax.random.uniform(key, (n,), probs.dtype) * cdf[-1]    # [n]
  ids = jnp.searchsorted(cdf, u, side="right")
  return jnp.minimum(ids, probs.shape[0] - 1).astype(jnp.int32)


def sample_surrogate(z: jax.Array, actions: jax.Array,
                     centred_rewards: jax.Array) -> jax.Array:
  """The paper's L_sur = -(1/N) sum_j r~_j p_{y_j}(z); z `[d]`, others `[N]`."""
  probs = jax.nn.softmax(z)
  return -jnp.mean(centred_rewards * probs[actions])


def _metrics(z: jax.Array, p0: jax.Array, num_correct: int) -> dict:
  """Figure 3's metrics at logits `z`, relative to the step-0 probs `p0`."""
  probs = jax.nn.softmax(z)                                   # [d]
  gain = probs[:num_correct] - p0[:num_correct]               # [|P|]
  return {
      "q_pos": jnp.sum(probs[:num_correct]),
      "pct_improved": 100.0 * jnp.mean((gain > 0).astype(z.dtype)),
      "worst_drop": jnp.min(gain),
      "entropy": -jnp.sum(probs * jax.nn.log_softmax(z)),
  }


def _run_one(cfg: SimulatorConfig, n: int, key: jax.Array) -> dict:
  """One seed's trajectory: dict of `[T + 1]` metrics (step 0 included)."""
  z0 = initial_logits(cfg)
  p0 = jax.nn.softmax(z0)
  rewards = action_rewards(cfg)
  # No reference_samples_per_step: the rate is not rescaled by N.
  opt = make_optimizer(cfg.optim_config(), n)

  def step(carry, t):
    z, opt_state = carry
    actions = sample_actions(jax.random.fold_in(key, t), jax.nn.softmax(z), n)
    r = rewards[actions]                                      # [N]
    grad = jax.grad(sample_surrogate)(z, actions, r - jnp.mean(r))
    updates, opt_state = opt.update(grad, opt_state, z)
    z = optax.apply_updates(z, updates)
    return (z, opt_state), _metrics(z, p0, cfg.num_correct)

  _, traj = lax.scan(step, (z0, opt.init(z0)), jnp.arange(cfg.steps))
  first = _metrics(z0, p0, cfg.num_correct)
  return {k: jnp.concatenate([first[k][None], traj[k]]) for k in METRICS}


def simulate(cfg: SimulatorConfig, n: int) -> dict[str, jax.Array]:
  """Runs `cfg.num_seeds` seeds at N = `n`.

  Args:
    cfg: the setup.
    n: samples per step.

  Returns:
    `q_pos`, `pct_improved`, `worst_drop`, `entropy`, each `[seeds, T + 1]`;
    column t is after t optimizer steps.
  """
  with jax.enable_x64(cfg.dtype == "float64"):
    root = jax.random.fold_in(jax.random.key(cfg.seed), n)
    keys = jax.vmap(functools.partial(jax.random.fold_in, root))(
        jnp.arange(cfg.num_seeds))
    run = jax.jit(jax.vmap(functools.partial(_run_one, cfg, n)))
    return jax.block_until_ready(run(keys))


# ---------------------------------------------------------------------------
# Theorem 1 (device code; call under jax.enable_x64 for float64).
# ---------------------------------------------------------------------------


def set_surrogate(z: jax.Array, token_rewards: jax.Array, n: int) -> jax.Array:
  """Theorem 1's surrogate -(1/N) sum_i R_i p_i(z) over the vocabulary.

  Args:
    z: `[V]` logits.
    token_rewards: `[V]`, R_c on sampled correct tokens (set A), R_w on
      sampled incorrect ones (set B), 0 on unsampled tokens; each distinct
      sampled token once, whatever its multiplicity.
    n: N, the number of draws (only the 1/N factor).

  Returns:
    The scalar surrogate.
  """
  return -jnp.sum(token_rewards * jax.nn.softmax(z)) / n


def theorem1_terms(probs: jax.Array, correct: jax.Array,
                   token_rewards: jax.Array) -> dict[str, jax.Array]:
  """Theorem 1's bracket terms (without eta/N) for R_c = +1, R_w = -1.

  Args:
    probs: `[V]` the pre-step distribution p.
    correct: `[V]` bool, the correct set P.
    token_rewards: `[V]` in {+1, -1, 0}: sets A, B and U.

  Returns:
    term1 = (R_c - S_R) Q_neg A_2, term2 = (S_R - R_w) Q_pos B_2,
    term3 = S_R (Q_pos U_neg,2 - Q_neg U_pos,2), their sum `bracket`, and S_R;
    Theorem 1 says dQ_pos = (eta / N) * bracket to first order.
  """
  p2 = probs * probs                                          # [V]
  unsampled = token_rewards == 0
  q_pos = jnp.sum(jnp.where(correct, probs, 0.0))
  q_neg = 1.0 - q_pos
  s_r = jnp.sum(token_rewards * probs)
  a2 = jnp.sum(jnp.where(token_rewards > 0, p2, 0.0))
  b2 = jnp.sum(jnp.where(token_rewards < 0, p2, 0.0))
  u_pos2 = jnp.sum(jnp.where(unsampled & correct, p2, 0.0))
  u_neg2 = jnp.sum(jnp.where(unsampled & ~correct, p2, 0.0))
  terms = {
      "term1": (1.0 - s_r) * q_neg * a2,
      "term2": (s_r + 1.0) * q_pos * b2,
      "term3": s_r * (q_pos * u_neg2 - q_neg * u_pos2),
  }
  terms["bracket"] = terms["term1"] + terms["term2"] + terms["term3"]
  terms["s_r"] = s_r
  return terms


def random_case(key: jax.Array, vocab: int, n: int,
                logit_scale: float = 2.0) -> tuple[jax.Array, ...]:
  """A random distribution, correct set and sample of N draws.

  Args:
    key: PRNG key.
    vocab: V.
    n: N, the number of i.i.d. draws from p.
    logit_scale: standard deviation of the normal logits.

  Returns:
    z `[V]` logits, correct `[V]` bool (token 0 correct, token 1 incorrect,
    the rest with probability 0.3), token_rewards `[V]` (+1 / -1 on the
    distinct sampled correct / incorrect tokens, 0 elsewhere).
  """
  k_z, k_c, k_s = jax.random.split(key, 3)
  z = logit_scale * jax.random.normal(k_z, (vocab,))
  correct = jax.random.bernoulli(k_c, 0.3, (vocab,))
  correct = correct.at[0].set(True).at[1].set(False)
  draws = jax.random.categorical(k_s, z, shape=(n,))          # [N]
  sampled = jnp.zeros((vocab,), bool).at[draws].set(True)
  token_rewards = jnp.where(sampled, jnp.where(correct, 1.0, -1.0), 0.0)
  return z, correct, token_rewards.astype(z.dtype)


def step_delta_q(z: jax.Array, correct: jax.Array, token_rewards: jax.Array,
                 n: int, eta: float) -> tuple[jax.Array, jax.Array]:
  """ΔQ_pos of one plain gradient step on `set_surrogate`: exact and linear.

  The exact change is computed as sum_P p_i expm1(Δz_i - Δlse) rather than
  Q(z') - Q(z), which would lose ~1e-16 / ΔQ relative precision to
  cancellation (ΔQ ~ 1e-10 at eta = 1e-5).

  Args:
    z: `[V]` logits before the step.
    correct: `[V]` bool, the correct set P.
    token_rewards: `[V]` in {+1, -1, 0} (see `set_surrogate`).
    n: N (may be traced).
    eta: the step size (may be traced).

  Returns:
    (exact ΔQ_pos of the finite step, first-order ΔQ_pos via jvp).
  """
  dz = -eta * jax.grad(set_surrogate)(z, token_rewards, n)    # [V]
  probs = jax.nn.softmax(z)
  dlse = jnp.log1p(jnp.sum(probs * jnp.expm1(dz)))
  exact = jnp.sum(jnp.where(correct, probs * jnp.expm1(dz - dlse), 0.0))
  q_pos = lambda x: jnp.sum(jnp.where(correct, jax.nn.softmax(x), 0.0))
  _, linear = jax.jvp(q_pos, (z,), (dz,))
  return exact, linear


@functools.partial(jax.jit, static_argnums=(2, 3))
def _case_errors(keys: jax.Array, etas: jax.Array, n: int,
                 vocab: int) -> tuple[jax.Array, jax.Array]:
  """Relative errors of Theorem 1 on the random cases of `keys` `[C]`."""

  def one(key):
    z, correct, rewards = random_case(key, vocab, n)
    # (eta / N) * bracket is Theorem 1's first-order dQ_pos.
    slope = theorem1_terms(jax.nn.softmax(z), correct,
                           rewards)["bracket"] / n
    rel = lambda got, eta: jnp.abs(got - eta * slope) / jnp.abs(eta * slope)
    exact = jax.vmap(
        lambda eta: step_delta_q(z, correct, rewards, n, eta)[0])(etas)
    # The linear change is proportional to eta: one eta suffices.
    linear = step_delta_q(z, correct, rewards, n, 1.0)[1]
    return rel(exact, etas), rel(linear, 1.0)

  return jax.vmap(one)(keys)                                  # [C, E], [C]


def theorem_errors(key: jax.Array, etas: tuple[float, ...],
                   n_values: tuple[int, ...] = (1, 4, 16, 64),
                   cases: int = 25, vocab: int = 50) -> dict[str, np.ndarray]:
  """Relative errors of Theorem 1 on random cases, in float64.

  Args:
    key: PRNG key.
    etas: step sizes.
    n_values: N values; `cases` random cases each.
    cases: cases per N.
    vocab: V.

  Returns:
    `finite` `[len(etas), cases * len(n_values)]`: |exact - formula| /
    |formula| for the finite step; `linear` `[cases * len(n_values)]`: the
    same for the first-order change (float64 rounding only).
  """
  finite, linear = [], []
  with jax.enable_x64(True):
    for n in n_values:
      keys = jax.random.split(jax.random.fold_in(key, n), cases)
      f, l = _case_errors(keys, jnp.asarray(etas, jnp.float64), n, vocab)
      finite.append(np.asarray(f).T)
      linear.append(np.asarray(l))
  return {"finite": np.concatenate(finite, axis=1),
          "linear": np.concatenate(linear)}
