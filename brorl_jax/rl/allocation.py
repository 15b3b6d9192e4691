"""Mass-balance-aware rollout allocation (pure, jittable).

`rollout.allocation = "adaptive"` splits a step's static budget of B rollout
rows over its P prompts in two rounds: a probe of `probe_n` rollouts per
prompt, then each prompt's extra rollouts, sized here from the probe and the
prefill's first-token distribution p `[P, V]`.

What is minimised (README, "Adaptive rollout allocation"): the sum over
prompts of the expected unsampled-coupling bound of Theorem 1 after n_i
rollouts,

  C_i(n) = s_i * E[U_2 | probe]
         = s_i * sum_{v not in S_i} p_v^2 (1 - p_v)^(n - n0)

where S_i is the set of first tokens the probe drew (n0 = probe_n draws;
the later draws are independent of it), and s_i estimates |S_R|. With
first tokens that decide the outcome, S_R -> 2 pi_i - 1 as N grows (pi_i:
the prompt's success rate); s_i is the posterior mean of |2 pi - 1| under
a uniform prior after c correct of n0 probe rollouts (Beta(c+1, n0-c+1)),
so a 2-of-4 probe is not read as "no coupling at all".

Each C_i is convex and decreasing in n, so handing out the remaining budget
one block of `block` rollouts at a time, each to the prompt whose bound falls
most (water-filling), reaches the minimum of sum_i C_i(n_i) over block
allocations (greedy is exact for separable convex objectives). Prompts whose
probe is all-correct or all-wrong carry no gradient at any N under dynamic
sampling: they keep the floor and receive blocks only once every mixed
prompt is at the cap `max_n`. Identical prompts have identical C_i, so they
get equal n: the rule reduces to a fixed N when prompts are alike.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from brorl_jax.config import check

# Quadrature points of the posterior mean of |2 pi - 1| (midpoint rule; the
# integrand is piecewise smooth, so 512 points give ~1e-5).
_GRID = 512


@dataclasses.dataclass(frozen=True)
class AllocationConfig:
  """The adaptive allocation's static sizes (keys in section `rollout`).

  Attributes:
    num_prompts: P, prompts sampled per step.
    budget: B (`rollout.budget`), rollout rows per step, probe included.
    probe_n: n0 (`rollout.probe_n`), first-round rollouts per prompt.
    floor: `rollout.allocation_floor`, the fewest rollouts a prompt ends
      with (below probe_n: probe_n); all an unmixed probe gets while a mixed
      prompt can still take a block.
    block: `rollout.allocation_block`, rollouts handed out at a time.
    max_n: G_max (`rollout.n`), the most rollouts one prompt can get; the
      padded group axis of the step's arrays.
  """

  num_prompts: int
  budget: int
  probe_n: int
  floor: int
  block: int
  max_n: int

  def __post_init__(self):
    check(self.probe_n >= 2, "rollout.probe_n",
          f"must be >= 2 (a probe of one rollout cannot be mixed), got "
          f"{self.probe_n}")
    check(self.block >= 1, "rollout.allocation_block",
          f"must be >= 1, got {self.block}")
    check(self.max_n >= self.base, "rollout.n",
          f"is the most rollouts a prompt can get under adaptive "
          f"allocation; it must be >= max(probe_n, allocation_floor) = "
          f"{self.base}, got {self.max_n}")
    check((self.max_n - self.base) % self.block == 0,
          "rollout.allocation_block",
          f"{self.block} must divide rollout.n - max(probe_n, "
          f"allocation_floor) = {self.max_n - self.base}, so a prompt can "
          "reach the cap in whole blocks")
    low, high = self.num_prompts * self.base, self.num_prompts * self.max_n
    check(low <= self.budget <= high, "rollout.budget",
          f"must be between P * max(probe_n, allocation_floor) = {low} and "
          f"P * rollout.n = {high} (P = {self.num_prompts} prompts sampled "
          f"per step), got {self.budget}")
    fits = low + (self.budget - low) // self.block * self.block
    check((self.budget - low) % self.block == 0, "rollout.budget",
          f"{self.budget} minus the {low} rows every prompt gets must be a "
          f"multiple of rollout.allocation_block = {self.block}; e.g. "
          f"rollout.budget={fits}")

  @property
  def base(self) -> int:
    """Rollouts every prompt gets: max(probe_n, floor)."""
    return max(self.probe_n, self.floor)

  @property
  def num_blocks(self) -> int:
    return (self.budget - self.num_prompts * self.base) // self.block


def abs_sr_estimate(num_correct: jax.Array, num_probe: int) -> jax.Array:
  """[P] posterior mean of |2 pi - 1| after `num_correct` of `num_probe`.

  pi ~ Beta(c + 1, n0 - c + 1) (a uniform prior); midpoint quadrature.
  """
  x = (jnp.arange(_GRID, dtype=jnp.float32) + 0.5) / _GRID     # [K]
  c = num_correct.astype(jnp.float32)[:, None]                 # [P, 1]
  logw = c * jnp.log(x) + (num_probe - c) * jnp.log1p(-x)      # [P, K]
  w = jnp.exp(logw - logw.max(-1, keepdims=True))
  return jnp.sum(w * jnp.abs(2 * x - 1), -1) / jnp.sum(w, -1)


def coupling_bound(probs: jax.Array, probe_sampled: jax.Array,
                   s_hat: jax.Array, extra: jax.Array) -> jax.Array:
  """[P] expected coupling bound C_i after `extra` rollouts beyond the probe.

  Args:
    probs: [P, V] first-token distribution (the prefill's).
    probe_sampled: [P, V] bool, first tokens the probe drew.
    s_hat: [P] the |S_R| estimate (`abs_sr_estimate`).
    extra: [P] rollouts after the probe (n_i - probe_n).
  """
  p = probs.astype(jnp.float32)
  # (1 - p)^m as exp(m log1p(-p)); p = 1 gives 0 for m > 0 and 1 for m = 0.
  decay = jnp.where(extra[:, None] > 0,
                    jnp.exp(extra[:, None].astype(jnp.float32) *
                            jnp.log1p(-jnp.minimum(p, 1.0 - 1e-7))), 1.0)
  u2 = jnp.sum(jnp.where(probe_sampled, 0.0, p * p * decay), -1)
  return s_hat * u2


def probe_masks(first_tokens: jax.Array, vocab_size: int) -> jax.Array:
  """[P, V] bool, the first tokens drawn by the probe ([P, n0] ids)."""
  rows = jnp.broadcast_to(jnp.arange(first_tokens.shape[0])[:, None],
                          first_tokens.shape)
  return jnp.zeros((first_tokens.shape[0], vocab_size), bool).at[
      rows, first_tokens].set(True)


def allocate(cfg: AllocationConfig, probs: jax.Array, probe_sampled: jax.Array,
             num_correct: jax.Array) -> dict[str, jax.Array]:
  """Rollouts per prompt for the step: water-filling of the coupling bound.

  Args:
    cfg: static sizes.
    probs: [P, V] first-token distribution.
    probe_sampled: [P, V] bool, first tokens the probe drew.
    num_correct: [P] int, correct probe rollouts (of cfg.probe_n).

  Returns:
    {"counts": [P] int32 rollouts per prompt (probe included), summing to
     cfg.budget; "mixed": [P] bool, mixed probes; "predicted": [P] the
     bound C_i at counts; "s_hat": [P]}.
  """
  mixed = (num_correct > 0) & (num_correct < cfg.probe_n)
  s_hat = abs_sr_estimate(num_correct, cfg.probe_n)
  bound = lambda n: coupling_bound(probs, probe_sampled, s_hat,  # noqa: E731
                                   n - cfg.probe_n)
  counts = jnp.full((cfg.num_prompts,), cfg.base, jnp.int32)

  def give_block(_, carry):
    n, now = carry
    after = bound(n + cfg.block)
    ok = n + cfg.block <= cfg.max_n
    # Mixed prompts first (gains are <= 1, so +2 orders them); ties go to
    # the prompt with fewer rollouts, so equal prompts stay equal.
    score = jnp.where(ok, now - after + 2.0 * mixed, -jnp.inf)
    best = score.max()
    i = jnp.argmax(jnp.where(score == best, -n, jnp.iinfo(jnp.int32).min))
    n = n.at[i].add(cfg.block)
    return n, now.at[i].set(after[i])

  counts, predicted = jax.lax.fori_loop(0, cfg.num_blocks, give_block,
                                        (counts, bound(counts)))
  return {"counts": counts, "mixed": mixed, "predicted": predicted,
          "s_hat": s_hat}
