"""PPO-clip policy loss with clip-higher, KL to a reference, entropy bonus.

Per response token (B rollouts, T positions), with r = pi_theta / pi_old
(log-ratio clamped to +-`log_ratio_clamp` before exp) and the rollout's
advantage A broadcast over its tokens:

  pg    = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)     (DAPO/ProRL)
  kl    = k1 | k2 | k3 of pi_theta against pi_ref               (Schulman)
  total = pg + kl_coef * kl - entropy_coef * H

aggregated over tokens (`token_mean`) or per sequence first
(`sequence_mean`). Gradient accumulation is exact by construction: the loss
of a micro-batch is its *sum* divided by a `normalizer` computed once for
the whole mini-batch (`loss_normalizer`), so summing micro-batch losses and
gradients gives the mini-batch loss and gradient, whatever the micro-batch
sizes or padding.

Old log-probs are the sampler's (the behaviour policy's), so r at the first
mini-batch of a step is exactly the sampler/trainer gap. The optional ratio
cap (truncated importance sampling, Yao et al. 2025; ICE-POP in NeMo RL)
acts on this r, per token:

  truncate (TIS): in the unclipped branch r is replaced by min(r, C) with
    the gradient weight min(r, C): value and gradient are those of
    min(r, C) A where r > C. Only binds where the min picks that branch,
    i.e. for A < 0 (and for A > 0 when C < 1 + eps_high).
  mask (ICE-POP): tokens with r outside [`ratio_cap_low`, C] contribute
    nothing to the loss (they still count in the normalizer).

Sequence-level ratio (`ratio = "sequence"`, GSPO: Zheng et al. 2025, Group
Sequence Policy Optimization, eqs. 5-7 and 13-14). Rollout i with response
tokens y_i (|y_i| of them, the mask's) gets the length-normalised sequence
ratio

  s_i = (pi_theta(y_i | x) / pi_old(y_i | x))^(1 / |y_i|)
      = exp( (1/|y_i|) sum_t log(pi_theta(y_i,t) / pi_old(y_i,t)) ),

its log clamped to +-`log_ratio_clamp`, and every token of i is clipped on
s_i, i.e. per sequence. It enters in GSPO-token's form (eq. 13),

  s_i,t = sg[s_i] * pi_theta(y_i,t) / sg[pi_theta(y_i,t)],

whose value is s_i at every token and whose gradient is s_i grad log
pi_theta(y_i,t) (sg = stop-gradient), so that

  pg_i,t = -min(s_i,t A_i, clip(s_i,t, 1 - eps_low, 1 + eps_high) A_i).

With one advantage per rollout (this project's case) and `aggregation =
"sequence_mean"` this is GSPO's objective, value and gradient:
(1/G) sum_i -min(s_i A_i, clip(s_i) A_i), gradient (1/G) sum_i s_i A_i
(1/|y_i|) sum_t grad log pi (unclipped i). `token_mean` weights sequence i
by |y_i| instead (veRL's GSPO takes either). The GSPO paper clips far
tighter than token-level PPO (eps_low 3e-4, eps_high 4e-4). The ratio cap
then acts on s_i (a whole sequence is capped or masked), and the clip /
ratio metrics describe s_i; `approx_kl` and `logp_diff_*` stay per token.
Masking truncated rollouts (`mask_truncated`, DAPO's overlong filtering)
happens where the batch is built (`batch.prepare`): their tokens leave the
mask, hence the loss and its normalizer.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from brorl_jax import config as config_lib

# Config section of `LossConfig` (error messages name its keys).
SECTION = "algo.loss"
AGGREGATIONS = ("token_mean", "sequence_mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_CAP_MODES = ("truncate", "mask")
RATIOS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The policy loss (config section `algo.loss`).

  Attributes:
    eps_low: epsilon_low, the ratio's lower clip 1 - eps_low (0.2).
    eps_high: epsilon_high, the upper clip 1 + eps_high; > eps_low is
      DAPO's clip-higher (ProRL v2: 0.28; ProRL v1: 0.4).
    aggregation: "token_mean" (DAPO: sum over all tokens of the mini-batch
      / its token count) or "sequence_mean" (mean over each sequence's
      tokens, then over sequences).
    kl_coef: beta, weight of the KL to the reference policy; 0 = no KL term
      and no reference log-probs needed (ProRL v2's likely value: 1e-4).
    kl_estimator: "k1" (log pi/pi_ref), "k2" (0.5 (log pi_ref/pi)^2,
      ProRL v2) or "k3" (pi_ref/pi - 1 - log pi_ref/pi).
    kl_log_ratio_clamp: log(pi_ref/pi) is clamped to +-this before the
      estimator (ProRL v2: 10).
    log_ratio_clamp: log(pi/pi_old) is clamped to +-this before exp, so a
      stray token cannot overflow the ratio.
    ratio_cap: C of the truncated importance ratio (see module docstring);
      None = off (NeMo RL's ICE-POP: 5.0).
    ratio_cap_mode: "truncate" (TIS) or "mask" (ICE-POP).
    ratio_cap_low: lower bound of the kept ratio range in "mask" mode
      (ICE-POP: 0.5); unused in "truncate" mode.
    entropy_coef: weight of the entropy bonus (the loss subtracts
      entropy_coef * H); 0 = entropy is only a metric.
    ratio: "token" (PPO: r per token) or "sequence" (GSPO: the
      length-normalised sequence ratio s_i, clipped per sequence; see the
      module docstring).
    mask_truncated: rollouts that hit `max_new_tokens` without a stop
      token contribute no loss (DAPO's overlong filtering); their rewards
      still count in the group baseline and the advantage normalization.
      Applied by `batch.prepare` (the batch knows who stopped).
  """
  eps_low: float = 0.2
  eps_high: float = 0.28
  aggregation: str = "token_mean"
  kl_coef: float = 0.0
  kl_estimator: str = "k2"
  kl_log_ratio_clamp: float = 10.0
  log_ratio_clamp: float = 20.0
  ratio_cap: float | None = None
  ratio_cap_mode: str = "truncate"
  ratio_cap_low: float = 0.0
  entropy_coef: float = 0.0
  ratio: str = "token"
  mask_truncated: bool = False

  def __post_init__(self):
    check = config_lib.check
    check(0.0 < self.eps_low < 1.0, f"{SECTION}.eps_low",
          f"must be in (0, 1), got {self.eps_low}")
    check(self.eps_high > 0.0, f"{SECTION}.eps_high",
          f"must be > 0, got {self.eps_high}")
    config_lib.check_choice(self.aggregation, f"{SECTION}.aggregation",
                            AGGREGATIONS)
    check(self.kl_coef >= 0.0, f"{SECTION}.kl_coef",
          f"must be >= 0, got {self.kl_coef}")
    config_lib.check_choice(self.kl_estimator, f"{SECTION}.kl_estimator",
                            KL_ESTIMATORS)
    check(self.kl_log_ratio_clamp > 0.0, f"{SECTION}.kl_log_ratio_clamp",
          f"must be > 0, got {self.kl_log_ratio_clamp}")
    check(self.log_ratio_clamp > 0.0, f"{SECTION}.log_ratio_clamp",
          f"must be > 0, got {self.log_ratio_clamp}")
    check(self.ratio_cap is None or self.ratio_cap >= 1.0,
          f"{SECTION}.ratio_cap",
          f"must be None (off) or >= 1, got {self.ratio_cap}")
    config_lib.check_choice(self.ratio_cap_mode, f"{SECTION}.ratio_cap_mode",
                            RATIO_CAP_MODES)
    check(0.0 <= self.ratio_cap_low < 1.0, f"{SECTION}.ratio_cap_low",
          f"must be in [0, 1), got {self.ratio_cap_low}")
    check(self.entropy_coef >= 0.0, f"{SECTION}.entropy_coef",
          f"must be >= 0, got {self.entropy_coef}")
    config_lib.check_choice(self.ratio, f"{SECTION}.ratio", RATIOS)
    check(isinstance(self.mask_truncated, bool), f"{SECTION}.mask_truncated",
          f"must be True or False, got {self.mask_truncated!r}")


def loss_normalizer(mask: jax.Array, aggregation: str) -> jax.Array:
  """The denominator shared by all micro-batches of one mini-batch.

  Args:
    mask: [..., T] response-token mask of the *whole* mini-batch (any
      leading dims, e.g. [K, B, T] for K micro-batches).
    aggregation: "token_mean" or "sequence_mean".

  Returns:
    f32 scalar: the token count, or the count of sequences with at least
    one token.
  """
  return counts_normalizer((mask > 0).sum(-1), aggregation)


def counts_normalizer(counts: jax.Array, aggregation: str) -> jax.Array:
  """`loss_normalizer` from the rows' counted tokens ([...] int)."""
  if aggregation == "token_mean":
    return counts.sum(dtype=jnp.float32)
  if aggregation == "sequence_mean":
    return (counts > 0).sum(dtype=jnp.float32)
  raise ValueError(f"{SECTION}.aggregation: unknown {aggregation!r}")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str,
               clamp: float = 10.0) -> jax.Array:
  """Per-token estimate of KL(pi_theta || pi_ref) from tokens of pi_theta.

  With log_r = clip(ref_logp - logp, -clamp, clamp) = log(pi_ref/pi):
  k1 = -log_r, k2 = log_r^2 / 2, k3 = exp(log_r) - 1 - log_r.

  Args:
    logp: [B, T] log pi_theta of the sampled tokens.
    ref_logp: [B, T] log pi_ref of the same tokens.
    estimator: "k1", "k2" or "k3".
    clamp: bound on |log_r|.

  Returns:
    [B, T] f32.
  """
  log_r = jnp.clip(ref_logp - logp, -clamp, clamp)
  if estimator == "k1":
    return -log_r
  if estimator == "k2":
    return 0.5 * jnp.square(log_r)
  if estimator == "k3":
    return jnp.exp(log_r) - 1.0 - log_r
  raise ValueError(f"{SECTION}.kl_estimator: unknown {estimator!r}")


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    cfg: LossConfig,
    *,
    ref_logp: jax.Array | None = None,
    entropy: jax.Array | None = None,
    normalizer: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of one micro-batch, normalized by the mini-batch `normalizer`.

  Args:
    logp: [B, T] f32 log pi_theta of the response tokens.
    old_logp: [B, T] f32 log pi_old (the sampler's log-probs).
    advantages: [B] f32, one per rollout.
    mask: [B, T] response tokens that count (bool or 0/1); zero it for
      padding, padded rollouts and groups dropped by dynamic sampling.
    cfg: the loss configuration.
    ref_logp: [B, T] f32 log pi_ref; required when `cfg.kl_coef > 0`, used
      for the `kl_ref` metric otherwise.
    entropy: [B, T] f32 token entropies of pi_theta; required when
      `cfg.entropy_coef > 0`, used for the `entropy` metric otherwise.
    normalizer: `loss_normalizer(mask_of_whole_minibatch, cfg.aggregation)`;
      None uses this micro-batch's own (right for a single micro-batch).

  Returns:
    (loss, aux): loss = aux["pg_loss"] + aux["kl_loss"] -
    aux["entropy_bonus"], an f32 scalar. aux holds f32 scalars; `SUM_KEYS`
    add up over micro-batches (they share the normalizer), `MAX_KEYS` /
    `MIN_KEYS` are extrema, the rest are means over this micro-batch's
    tokens (combine with `reduce_aux`). Metrics of absent inputs are 0.
  """
  if cfg.kl_coef > 0 and ref_logp is None:
    raise ValueError(f"{SECTION}.kl_coef={cfg.kl_coef} > 0 needs ref_logp.")
  if cfg.entropy_coef > 0 and entropy is None:
    raise ValueError(
        f"{SECTION}.entropy_coef={cfg.entropy_coef} > 0 needs entropy.")
  m = mask > 0  # [B, T]
  # Zero masked entries first: padding may hold -inf/NaN, and a NaN in an
  # unselected `where` branch would still poison the gradient.
  clean = lambda x: jnp.where(m, x.astype(jnp.float32), 0.0)
  logp, old_logp = clean(logp), clean(old_logp)
  adv = jnp.broadcast_to(advantages.astype(jnp.float32)[:, None], m.shape)
  adv = jnp.where(m, adv, 0.0)  # [B, T]

  log_ratio = jnp.clip(logp - old_logp, -cfg.log_ratio_clamp,
                       cfg.log_ratio_clamp)
  tok_count = m.sum(-1)  # [B]
  token_ratio = jnp.exp(log_ratio)  # [B, T]
  ratio = token_ratio
  if cfg.ratio == "sequence":
    seq_log_ratio = jnp.clip(
        (logp - old_logp).sum(-1) / jnp.maximum(tok_count, 1),
        -cfg.log_ratio_clamp, cfg.log_ratio_clamp)              # [B] log s_i
    # GSPO-token: value s_i at every token, gradient s_i * d log pi.
    sg = jax.lax.stop_gradient
    ratio = jnp.exp(sg(seq_log_ratio)[:, None] + logp - sg(logp))  # [B, T]
  clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
  ratio_is = ratio
  keep = m
  capped = jnp.zeros_like(m)
  if cfg.ratio_cap is not None:
    if cfg.ratio_cap_mode == "truncate":
      capped = m & (ratio > cfg.ratio_cap)
      # Value min(r, C); gradient min(r, C) * dlogp (a stop-gradient weight).
      ratio_is = ratio * jax.lax.stop_gradient(
          jnp.minimum(ratio, cfg.ratio_cap) / ratio)
    else:
      capped = m & ((ratio > cfg.ratio_cap) | (ratio < cfg.ratio_cap_low))
      keep = m & ~capped
  pg_tok = -jnp.minimum(ratio_is * adv, clipped * adv)  # [B, T]
  pg_tok = jnp.where(keep, pg_tok, 0.0)

  zeros = jnp.zeros_like(logp)
  kl_tok = zeros
  if ref_logp is not None:
    kl_tok = jnp.where(m, kl_penalty(logp, clean(ref_logp), cfg.kl_estimator,
                                     cfg.kl_log_ratio_clamp), 0.0)
  ent_tok = zeros if entropy is None else clean(entropy)

  if normalizer is None:
    normalizer = loss_normalizer(m, cfg.aggregation)
  normalizer = jnp.asarray(normalizer, jnp.float32)
  normalizer = jnp.where(normalizer > 0, normalizer, 1.0)

  def aggregate(x):  # [B, T] -> scalar sum / normalizer
    if cfg.aggregation == "token_mean":
      return x.sum() / normalizer
    per_seq = x.sum(-1) / jnp.maximum(tok_count, 1)  # [B]
    return per_seq.sum() / normalizer

  pg_loss = aggregate(pg_tok)
  kl_loss = cfg.kl_coef * aggregate(kl_tok) if cfg.kl_coef else 0.0
  entropy_bonus = (cfg.entropy_coef * aggregate(ent_tok)
                   if cfg.entropy_coef else 0.0)
  loss = pg_loss + kl_loss - entropy_bonus

  n_tok = m.sum(dtype=jnp.float32)
  mean = lambda x: jnp.where(m, x, 0.0).sum() / jnp.maximum(n_tok, 1.0)
  frac = lambda b: (b & m).sum(dtype=jnp.float32) / jnp.maximum(n_tok, 1.0)
  some = n_tok > 0

  def extreme(x, fn, fill):
    return jnp.where(some, fn(jnp.where(m, x, fill)), 0.0)

  # Schulman's k3 of KL(pi_old || pi_theta) on tokens from pi_old.
  approx_kl = token_ratio - 1.0 - log_ratio
  logp_diff = jnp.abs(logp - old_logp)
  aux = {
      "pg_loss": pg_loss,
      "kl_loss": jnp.asarray(kl_loss, jnp.float32),
      "entropy_bonus": jnp.asarray(entropy_bonus, jnp.float32),
      "num_tokens": n_tok,
      "num_sequences": (tok_count > 0).sum(dtype=jnp.float32),
      "clip_frac_low": frac((adv < 0) & (ratio < 1.0 - cfg.eps_low)),
      "clip_frac_high": frac((adv > 0) & (ratio > 1.0 + cfg.eps_high)),
      "ratio_capped_frac": frac(capped),
      "approx_kl": mean(approx_kl),
      "kl_ref": mean(kl_tok),
      "entropy": mean(ent_tok),
      "ratio_mean": mean(ratio),
      "ratio_max": extreme(ratio, jnp.max, -jnp.inf),
      "ratio_min": extreme(ratio, jnp.min, jnp.inf),
      "logp_diff_mean": mean(logp_diff),
      "logp_diff_max": extreme(logp_diff, jnp.max, -jnp.inf),
  }
  return loss, aux


SUM_KEYS = ("pg_loss", "kl_loss", "entropy_bonus", "num_tokens",
            "num_sequences")
MAX_KEYS = ("ratio_max", "logp_diff_max")
MIN_KEYS = ("ratio_min",)


def reduce_aux(stacked: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Combines `policy_loss` aux of K micro-batches into mini-batch values.

  Args:
    stacked: aux dict with a leading [K] axis on each value (e.g. the
      stacked outputs of the micro-batch `lax.scan`).

  Returns:
    dict of f32 scalars: sums for `SUM_KEYS`, extrema over non-empty
    micro-batches for `MAX_KEYS` / `MIN_KEYS`, token-weighted means (by
    `num_tokens`) for the rest; equal to the aux of one call on the whole
    mini-batch with the same normalizer.
  """
  n = stacked["num_tokens"]  # [K]
  some = n > 0
  any_tokens = some.any()
  out = {}
  for key, value in stacked.items():
    if key in SUM_KEYS:
      out[key] = value.sum()
    elif key in MAX_KEYS:
      out[key] = jnp.where(any_tokens,
                           jnp.where(some, value, -jnp.inf).max(), 0.0)
    elif key in MIN_KEYS:
      out[key] = jnp.where(any_tokens,
                           jnp.where(some, value, jnp.inf).min(), 0.0)
    else:
      out[key] = (value * n).sum() / jnp.maximum(n.sum(), 1.0)
  return out
