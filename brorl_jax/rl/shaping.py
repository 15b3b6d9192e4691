"""Reward shaping from the ProRL / DAPO recipes; every option is off by default.

Shaping runs *after* the correctness decision. A rollout's correctness (for
dynamic sampling, pass rates, pass@k and mass balance) is always decided on
the verifier reward with `advantages.is_correct`; the shaped reward returned
here only replaces the reward that the advantage estimator sees. So a long
correct answer stays correct even when the length penalty pushes its shaped
reward below the threshold.

Order of application, on R = verifier reward, t = response length (generated
tokens, EOS included), L = `max_new_tokens`:

  1. truncation: a response that did not stop (no EOS / stop string before
     L tokens) gets R := `truncation_reward` if set, and then
     R -= `truncation_penalty` (ProRL v1 runs 4-5: "penalize responses that
     do not terminate properly"). At most one of the two may be on.
  2. cosine length penalty (ProRL v2, PAPER.md §4.2):
       length_reward(t) = eta_min + 0.5 (eta_max - eta_min) (1 + cos(pi t/T))
       R += lambda * length_reward(t),   T = `cosine_length_limit` or L,
     active on steps with (step mod (on + off)) < on when a cycle is set.
  3. DAPO overlong shaping (DAPO eq. 13, L_cache = `overlong_cache`):
       R += coef * 0                          if t <= L - L_cache
       R += coef * ((L - L_cache) - t)/L_cache if L - L_cache < t <= L
     i.e. a penalty rising linearly from 0 to -coef over the last L_cache
     tokens before the cap.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from brorl_jax import config as config_lib

# Config section of `ShapingConfig` (error messages name its keys).
SECTION = "algo.shaping"


@dataclasses.dataclass(frozen=True)
class ShapingConfig:
  """Reward shaping options (config section `algo.shaping`). All off.

  Attributes:
    truncation_reward: reward given to a response that did not stop before
      `max_new_tokens` (replaces the verifier reward); None = off.
    truncation_penalty: subtracted from the reward of a response that did
      not stop; 0 = off. Exclusive with `truncation_reward`.
    cosine_length_coef: lambda_len of ProRL v2's cosine length penalty;
      0 = off.
    cosine_eta_min: eta_min, the length reward at t = T. ProRL v2 does not
      publish its etas or lambda; the defaults [-1, 0] make the term a pure
      penalty that grows with length.
    cosine_eta_max: eta_max, the length reward at t = 0.
    cosine_length_limit: T of the cosine; None uses `max_new_tokens`.
    cosine_cycle_on: with `cosine_cycle_off`, the penalty is active for
      `on` steps out of every `on + off` (ProRL v2 cycles it, e.g. 100 on,
      500 off). Both 0 = always active (when the coefficient is non-zero).
    cosine_cycle_off: see `cosine_cycle_on`.
    overlong_cache: L_cache of DAPO's overlong shaping, in tokens; 0 = off.
    overlong_coef: the penalty at the cap (DAPO uses 1).
  """
  truncation_reward: float | None = None
  truncation_penalty: float = 0.0
  cosine_length_coef: float = 0.0
  cosine_eta_min: float = -1.0
  cosine_eta_max: float = 0.0
  cosine_length_limit: int | None = None
  cosine_cycle_on: int = 0
  cosine_cycle_off: int = 0
  overlong_cache: int = 0
  overlong_coef: float = 1.0

  def __post_init__(self):
    check = config_lib.check
    check(self.truncation_reward is None or self.truncation_penalty == 0.0,
          f"{SECTION}.truncation_penalty",
          "set either truncation_reward or truncation_penalty, not both")
    check(self.truncation_penalty >= 0.0, f"{SECTION}.truncation_penalty",
          f"must be >= 0 (it is subtracted), got {self.truncation_penalty}")
    check(self.cosine_eta_min <= self.cosine_eta_max,
          f"{SECTION}.cosine_eta_min",
          f"must be <= cosine_eta_max ({self.cosine_eta_max}), got "
          f"{self.cosine_eta_min}")
    check(self.cosine_length_limit is None or self.cosine_length_limit > 0,
          f"{SECTION}.cosine_length_limit",
          f"must be a positive token count or None, got "
          f"{self.cosine_length_limit}")
    check(self.cosine_cycle_on >= 0 and self.cosine_cycle_off >= 0,
          f"{SECTION}.cosine_cycle_on",
          "cycle lengths must be >= 0 steps")
    check(self.cosine_cycle_off == 0 or self.cosine_cycle_on > 0,
          f"{SECTION}.cosine_cycle_on",
          "must be > 0 when cosine_cycle_off is set (else never active)")
    check(self.overlong_cache >= 0, f"{SECTION}.overlong_cache",
          f"must be >= 0 tokens, got {self.overlong_cache}")
    check(self.overlong_coef >= 0.0, f"{SECTION}.overlong_coef",
          f"must be >= 0, got {self.overlong_coef}")

  @property
  def enabled(self) -> bool:
    """Whether any option changes rewards."""
    return (self.truncation_reward is not None or self.truncation_penalty
            or self.cosine_length_coef or self.overlong_cache > 0)


def cosine_length_reward(lengths: jax.Array, limit: int, eta_min: float,
                         eta_max: float) -> jax.Array:
  """ProRL v2's length reward, eta_min + (eta_max-eta_min)(1+cos(pi t/T))/2.

  Args:
    lengths: [...] response lengths t.
    limit: T; lengths above it are treated as T.
    eta_min: value at t = T.
    eta_max: value at t = 0.

  Returns:
    [...] f32.
  """
  frac = jnp.minimum(lengths.astype(jnp.float32), limit) / limit
  return eta_min + 0.5 * (eta_max - eta_min) * (1.0 + jnp.cos(jnp.pi * frac))


def overlong_penalty(lengths: jax.Array, max_len: int,
                     cache: int) -> jax.Array:
  """DAPO's soft overlong punishment (eq. 13), in [-1, 0].

  Args:
    lengths: [...] response lengths.
    max_len: L_max, the generation cap.
    cache: L_cache > 0, the width of the linear ramp.

  Returns:
    [...] f32: 0 up to L_max - L_cache, then linear down to -1 at L_max,
    and -1 beyond.
  """
  start = max_len - cache
  over = lengths.astype(jnp.float32) - start
  return -jnp.clip(over / cache, 0.0, 1.0)


def shape_rewards(rewards: jax.Array, lengths: jax.Array, stopped: jax.Array,
                  max_new_tokens: int, cfg: ShapingConfig, *,
                  step: jax.Array | int | None = None) -> jax.Array:
  """Applies the configured shaping; see the module docstring for the order.

  Args:
    rewards: [P, G] verifier rewards.
    lengths: [P, G] int, generated tokens per rollout.
    stopped: [P, G] bool, True when the rollout ended with a stop token
      before `max_new_tokens` (False = truncated).
    max_new_tokens: L, the generation cap (static).
    cfg: the shaping configuration.
    step: the RL step (for the cosine on/off cycle); needed only when a
      cycle is configured.

  Returns:
    [P, G] f32 shaped rewards: feed them to the advantage estimator only.
  """
  shaped = rewards.astype(jnp.float32)  # [P, G]
  truncated = ~stopped
  if cfg.truncation_reward is not None:
    shaped = jnp.where(truncated, cfg.truncation_reward, shaped)
  if cfg.truncation_penalty:
    shaped = shaped - cfg.truncation_penalty * truncated
  if cfg.cosine_length_coef:
    limit = cfg.cosine_length_limit or max_new_tokens
    bonus = cfg.cosine_length_coef * cosine_length_reward(
        lengths, limit, cfg.cosine_eta_min, cfg.cosine_eta_max)
    if cfg.cosine_cycle_on:
      if step is None:
        raise ValueError("shape_rewards: a cosine on/off cycle is configured "
                         f"({SECTION}.cosine_cycle_on); pass step=.")
      period = cfg.cosine_cycle_on + cfg.cosine_cycle_off
      bonus = jnp.where(jnp.asarray(step) % period < cfg.cosine_cycle_on,
                        bonus, 0.0)
    shaped = shaped + bonus
  if cfg.overlong_cache:
    config_lib.check(cfg.overlong_cache <= max_new_tokens,
                     f"{SECTION}.overlong_cache",
                     f"{cfg.overlong_cache} exceeds rollout.max_new_tokens="
                     f"{max_new_tokens}")
    shaped = shaped + cfg.overlong_coef * overlong_penalty(
        lengths, max_new_tokens, cfg.overlong_cache)
  return shaped
