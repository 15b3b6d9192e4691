"""The shared prefix's bench cases (`bench step`'s `prefix_share_ratio`).

Each case times the update with each prompt computed once per slot
(`algo.shared_prefix = True`) against every rollout its own `prompt ++
response` row (False), over the same seeded rows and the same micro-batches
(one slot order), both compiled in the same process and called interleaved
(median of `reps` calls after a warm-up): a ratio robust to load.

Cases (the config's model, optimizer and update settings, but for the
overrides named):
  * `demo`: the demo's shapes (16 prompts x 32 rollouts, prompts of 29 of 32
    columns, responses of 32, the config's KL) -> `prefix_share_ratio`
    (issue 34's bar: <= 0.65);
  * `g16_kl` / `g512_kl`: P x G = 512 rollouts as 32 x 16 and 1 x 512 at the
    demo's prompt and response lengths with a KL reference (0.04), the
    task shape of the side-by-side with Tunix's GRPO;
  * `long_prompt`: 2 prompts x 64 rollouts, prompts of 512, responses of
    128, micro-batches of 64 -> `prefix_share_ratio_long_prompt` (bar:
    <= 0.4).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from brorl_jax.rl import slots as slots_lib
from brorl_jax.rl import update as update_lib
from brorl_jax.rl.batch import RolloutBatch
from brorl_jax.rl.train_state import TrainState

# The demo's rendered prompts: 29 tokens of max_prompt_len = 32.
DEMO_PROMPT_LEN = 29
TUNIX_KL = 0.04


@dataclasses.dataclass(frozen=True)
class Case:
  """One comparison: [p, g] rollouts, prompts of `prompt_len` of `lp`
  columns, responses of up to `t`; `update` / `kl_coef` override the
  config's (None: the config's)."""

  p: int
  g: int
  lp: int
  t: int
  prompt_len: int
  update: dict = dataclasses.field(default_factory=dict)
  kl_coef: float | None = None


def cases(cfg: Any) -> dict[str, Case]:
  """The cases at the config's demo shapes (see the module docstring)."""
  lp, t = cfg.rollout.max_prompt_len, cfg.rollout.max_new_tokens
  plen = min(DEMO_PROMPT_LEN, lp)
  return {
      "demo": Case(cfg.loop.prompts_per_step, cfg.rollout.n, lp, t, plen),
      "g16_kl": Case(32, 16, lp, t, plen, kl_coef=TUNIX_KL),
      "g512_kl": Case(1, 512, lp, t, plen, kl_coef=TUNIX_KL),
      "long_prompt": Case(2, 64, 512, 128, 512,
                          {"micro_batch_size": 64, "num_minibatches": 1,
                           "length_buckets": 1, "prompt_buckets": 1}),
  }


def synthetic_batch(vocab: int, case: Case, seed: int = 0) -> RolloutBatch:
  """Seeded rows: prompts of `prompt_len` left-padded to lp, responses of
  uniform lengths in [t/2, t]."""
  rng = np.random.default_rng(seed)
  p, g, t = case.p, case.g, case.t
  prompt = rng.integers(3, vocab, (p, case.lp))
  prompt[:, :case.lp - case.prompt_len] = 0
  return RolloutBatch(
      prompt_tokens=jnp.asarray(prompt, jnp.int32),
      prompt_lengths=jnp.full((p,), case.prompt_len, jnp.int32),
      tokens=jnp.asarray(rng.integers(3, vocab, (p, g, t)), jnp.int32),
      logprobs=jnp.asarray(-rng.uniform(1, 7, (p, g, t)), jnp.float32),
      lengths=jnp.asarray(rng.integers(t // 2, t + 1, (p, g)), jnp.int32),
      advantages=jnp.asarray(rng.normal(size=(p, g)), jnp.float32),
      mask=jnp.ones((p, g), bool))


def timed_arms(arms: dict, state, batch, reps: int) -> dict:
  """Median seconds of each compiled update, calls interleaved."""
  times = {k: [] for k in arms}
  for i in range(reps + 1):                  # the first is a warm-up
    for name, fn in arms.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, batch, jax.random.key(i)))
      if i:
        times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def prefix_share(trainer, reps: int, names: tuple[str, ...] | None = None
                 ) -> dict:
  """The shared-prefix update over the repeated-rows update for each case
  (`names`: a subset; default all)."""
  cfg = trainer.cfg
  vocab = trainer.exp.model_cfg.vocab_size
  params = trainer.policy.init(jax.random.key(0))
  out = {}
  for name, case in cases(cfg).items():
    if names is not None and name not in names:
      continue
    loss = (cfg.loss if case.kl_coef is None
            else dataclasses.replace(cfg.loss, kl_coef=case.kl_coef))
    state = TrainState.create(params, trainer.optimizer,
                              with_reference=loss.kl_coef > 0)
    batch = synthetic_batch(vocab, case)
    arms = {}
    for arm, shared in (("shared", True), ("repeated", False)):
      ucfg = dataclasses.replace(cfg.update, shared_prefix=shared,
                                 **case.update)
      fn = jax.jit(update_lib.make_update_fn(
          trainer.policy, ucfg, loss, trainer.optimizer,
          temperature=cfg.rollout.logprob_temperature))
      arms[arm] = fn.lower(state, batch, jax.random.key(0)).compile()
    med = timed_arms(arms, state, batch, reps)
    micro = case.update.get("micro_batch_size", cfg.update.micro_batch_size)
    out[name] = {
        "ratio": med["shared"] / med["repeated"], "seconds": med,
        "temp_bytes": {k: int(f.memory_analysis().temp_size_in_bytes)
                       for k, f in arms.items()},
        "prompts": case.p, "n": case.g, "max_prompt_len": case.lp,
        "prompt_len": case.prompt_len, "max_new_tokens": case.t,
        "micro_batch_size": micro,
        "rows_per_slot": slots_lib.slot_rows(micro, case.g),
        "kl_coef": loss.kl_coef, "timed_calls": reps}
  results: dict = {"prefix_share": out}
  if "demo" in out:
    results["prefix_share_ratio"] = out["demo"]["ratio"]
  if "long_prompt" in out:
    results["prefix_share_ratio_long_prompt"] = out["long_prompt"]["ratio"]
  return results


def print_share(share: dict) -> None:
  for case, r in share["prefix_share"].items():
    print(f"shared-prefix update over repeated rows, {case} ({r['prompts']} "
          f"x {r['n']}, prompt {r['prompt_len']}/{r['max_prompt_len']}, "
          f"response {r['max_new_tokens']}, KL {r['kl_coef']}, "
          f"{r['rows_per_slot']} rollouts per slot): {r['ratio']:.2f} "
          f"({r['seconds']['shared']:.3f} s / "
          f"{r['seconds']['repeated']:.3f} s)")
