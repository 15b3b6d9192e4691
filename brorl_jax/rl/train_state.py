"""The train state and its optimizer (AdamW, warmup, clipping, LR scaling).

BroRL's learning-rate rule: when the rollout batch grows (N = 16 -> 512 at
fewer prompts, 8,192 -> 65,536 samples per step) while the number of PPO
mini-batches stays the same, scale the learning rate by the square root of
the growth (PAPER.md §4.3). `OptimConfig.reference_samples_per_step` turns it
on: lr = learning_rate * sqrt(samples_per_step / reference).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from brorl_jax.config import check, check_choice

SECTION = "optim"
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warmup and global-norm clipping (config section `optim`).

  Attributes:
    learning_rate: peak learning rate eta_0 (ProRL v1: 2e-6 constant).
    warmup_steps: linear warmup over this many optimizer updates.
    schedule: "constant", "cosine" or "linear" decay after warmup.
    decay_steps: optimizer updates of the decay (cosine / linear).
    end_lr_ratio: final lr as a fraction of the peak.
    b1, b2, eps, weight_decay: AdamW's.
    grad_clip: global-norm clip (0 = off).
    reference_samples_per_step: BroRL's sqrt rule; None = off. The lr is
      multiplied by sqrt(samples_per_step / reference_samples_per_step).
    max_consecutive_skips: this many mini-batch updates skipped in a row
      (loss, gradient or updated parameters not finite) stop the run with
      one line (0 = never).
    param_norm_jump: an applied update that grows the parameter norm by more
      than this factor logs a warning (`optim/param_norm_jumped` 1; 0 =
      off).
  """

  learning_rate: float = 1e-6
  warmup_steps: int = 0
  schedule: str = "constant"
  decay_steps: int = 0
  end_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  reference_samples_per_step: int | None = None
  max_consecutive_skips: int = 8
  param_norm_jump: float = 2.0

  def __post_init__(self):
    check(self.learning_rate > 0, f"{SECTION}.learning_rate", "must be > 0")
    check(self.warmup_steps >= 0, f"{SECTION}.warmup_steps", "must be >= 0")
    check_choice(self.schedule, f"{SECTION}.schedule", SCHEDULES)
    check(self.schedule == "constant" or self.decay_steps > 0,
          f"{SECTION}.decay_steps",
          f"must be > 0 for the '{self.schedule}' schedule")
    check(0 <= self.end_lr_ratio <= 1, f"{SECTION}.end_lr_ratio",
          "must be in [0, 1]")
    check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"{SECTION}.b1",
          "b1 and b2 must be in [0, 1)")
    check(self.grad_clip >= 0, f"{SECTION}.grad_clip", "must be >= 0")
    check(self.reference_samples_per_step is None
          or self.reference_samples_per_step > 0,
          f"{SECTION}.reference_samples_per_step", "must be > 0 or None")
    check(self.max_consecutive_skips >= 0, f"{SECTION}.max_consecutive_skips",
          "must be >= 0 (0 = never stop)")
    check(self.param_norm_jump == 0 or self.param_norm_jump > 1,
          f"{SECTION}.param_norm_jump", "must be > 1 (a factor) or 0 (off)")

  def peak_lr(self, samples_per_step: int) -> float:
    """The learning rate after BroRL's square-root batch scaling."""
    if self.reference_samples_per_step is None:
      return self.learning_rate
    return self.learning_rate * math.sqrt(
        samples_per_step / self.reference_samples_per_step)

  def schedule_fn(self, samples_per_step: int) -> optax.Schedule:
    peak = self.peak_lr(samples_per_step)
    end = peak * self.end_lr_ratio
    if self.schedule == "constant":
      decay = optax.constant_schedule(peak)
    elif self.schedule == "cosine":
      decay = optax.cosine_decay_schedule(peak, self.decay_steps,
                                          alpha=self.end_lr_ratio)
    else:
      decay = optax.linear_schedule(peak, end, self.decay_steps)
    if not self.warmup_steps:
      return decay
    warmup = optax.linear_schedule(peak / max(self.warmup_steps, 1), peak,
                                   self.warmup_steps)
    return optax.join_schedules([warmup, decay], [self.warmup_steps])


def make_optimizer(cfg: OptimConfig, samples_per_step: int
                   ) -> optax.GradientTransformation:
  """AdamW (+ global-norm clipping) with the configured schedule."""
  adamw = optax.adamw(cfg.schedule_fn(samples_per_step), b1=cfg.b1, b2=cfg.b2,
                      eps=cfg.eps, weight_decay=cfg.weight_decay)
  if cfg.grad_clip:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw


@struct.dataclass
class TrainState:
  """Everything the update changes.

  Attributes:
    step: int32, completed RL iterations.
    updates: int32, optimizer updates applied (drives the lr schedule).
    params: the policy parameters.
    opt_state: the optimizer state.
    ref_params: the reference policy's parameters (None when the KL
      coefficient is 0: nothing is held).
    skipped: int32, mini-batch updates skipped for a non-finite loss or
      gradient.
  """

  step: jax.Array
  updates: jax.Array
  params: Any
  opt_state: Any
  ref_params: Any
  skipped: jax.Array

  @classmethod
  def create(cls, params: Any, optimizer: optax.GradientTransformation, *,
             with_reference: bool) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32),
               params=params, opt_state=optimizer.init(params),
               ref_params=(jax.tree.map(jnp.copy, params) if with_reference
                           else None),
               skipped=jnp.zeros((), jnp.int32))


def reset_reference(state: TrainState, optimizer: optax.GradientTransformation,
                    *, reset_optimizer: bool) -> TrainState:
  """Makes the current policy the new reference (ProRL's hard reset).

  ProRL v1 also re-initializes the optimizer state; ProRL v2 keeps it.
  """
  if state.ref_params is None:
    raise ValueError("reference reset requested but no reference policy is "
                     "held (algo.loss.kl_coef is 0)")
  opt_state = optimizer.init(state.params) if reset_optimizer else \
      state.opt_state
  return state.replace(ref_params=jax.tree.map(jnp.copy, state.params),
                       opt_state=opt_state)


def opt_state_shardings(abstract_params, param_sh, optimizer, replicated):
  """The optimizer state's layout: moments like the parameters, counters
  replicated (the train loop's state and the warm start both use it)."""
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  return optax.tree_map_params(
      optimizer, lambda _, sh: sh, abstract_opt, param_sh,
      transform_non_params=lambda _: replicated)


def state_shardings(abstract_params, param_sh, optimizer, *,
                    with_reference: bool, replicated) -> TrainState:
  """The train state's layout: the optimizer's moments and the reference
  copy are sharded like the parameters (FSDP), counters are replicated.

  Left to XLA's sharding propagation, the moments (zeros like the
  parameters) come out replicated: for a 1.5B model that is 13 GiB of Adam
  state on every device instead of 1/fsdp of it.
  """
  opt_sh = opt_state_shardings(abstract_params, param_sh, optimizer,
                               replicated)
  return TrainState(
      step=replicated, updates=replicated, params=param_sh, opt_state=opt_sh,
      ref_params=param_sh if with_reference else None, skipped=replicated)
