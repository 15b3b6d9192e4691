"""A step-time estimate from compiled programs (roofline, per device).

Each program's time is its bytes over the device's memory bandwidth or its
FLOPs over the bf16 peak, whichever is longer, each at a stated efficiency,
plus a fixed cost per kernel launched (`hlo_cost.Cost`: the compiled HLO,
loops by their trip counts):

  t = max(bytes / (bandwidth x eff_memory), flops / (peak x eff_flops))
      + launches x launch_s

The decode is counted step by step: one step's cost is the compiled decode
loop's body (`hlo_cost.loop_costs`), with the suffix kernel's bytes (its
whole operand buffers) replaced by what it reads, each row to its own
length (the kernels take per-row lengths); the steps come from the rollout
lengths: for fixed chunks every chunk runs until its longest row ends and
every row reads the chunk's step count; for the refill, `slots.
simulate_pools` gives the steps, and each rollout reads only its own
tokens. Lengths come from `slots.skewed_lengths` at stated parameters (no
run of this recipe has been measured).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from brorl_jax.aot.hlo_cost import Cost
from brorl_jax.rollout import slots as slots_lib

# The paper's generation throughput, BroRL arm on 64 H100s (PAPER.md Table 2).
PAPER_SAMPLES_PER_S = {"brorl": 72.4, "prorl": 36.5}


@dataclasses.dataclass(frozen=True)
class Efficiency:
  """The shares of the target's peaks a program reaches (assumptions).

  Attributes:
    memory: of the memory bandwidth (0.7: what decode kernels of this size
      commonly reach on HBM3; not measured here).
    flops: of the dense bf16 peak (0.4: a usual training MFU).
    launch_s: seconds per kernel launched (2 us: a graph-launched kernel).
  """

  memory: float = 0.7
  flops: float = 0.4
  launch_s: float = 2e-6


@dataclasses.dataclass(frozen=True)
class Lengths:
  """The response-length model (`slots.skewed_lengths`) and its seed."""

  mean_frac: float = 0.35
  sigma: float = 0.8
  capped: float = 0.02
  seed: int = 0

  def draw(self, prompts: int, n: int, t_max: int) -> np.ndarray:
    return slots_lib.skewed_lengths(
        np.random.default_rng(self.seed), (prompts, n), t_max,
        sigma=self.sigma, mean_frac=self.mean_frac, capped=self.capped)


def seconds(cost: Cost, target, eff: Efficiency, extra_bytes: float = 0.0,
            times: float = 1.0) -> float:
  """Roofline time of `times` runs of `cost` (+ extra bytes in all)."""
  memory = (times * cost.bytes + extra_bytes) / (target.bandwidth
                                                 * eff.memory)
  compute = times * cost.flops / (target.bf16_flops * eff.flops)
  return max(memory, compute) + times * cost.launches * eff.launch_s


@dataclasses.dataclass(frozen=True)
class DecodeWork:
  """What the decode's time depends on, for all devices together.

  Attributes:
    steps: decode steps run (programs one after another, summed).
    suffix_tokens: suffix KV slots read over all steps and rows.
    programs: decode programs run (chunks or refill prompt parts).
  """

  steps: int
  suffix_tokens: float
  programs: int


def fixed_chunk_work(lengths: np.ndarray, pc: int, gc: int) -> DecodeWork:
  """Fixed chunks of pc prompts x gc rollouts: each chunk runs to its
  longest row (early stop), every row reading the chunk's step count."""
  p, n = lengths.shape
  steps, tokens, programs = 0, 0.0, 0
  for p0 in range(0, p, pc):
    for g0 in range(0, n, gc):
      s = int(lengths[p0:p0 + pc, g0:g0 + gc].max()) - 1
      steps += s
      tokens += pc * gc * s * (s + 1) / 2       # step t reads t + 1 slots
      programs += 1
  return DecodeWork(steps, tokens, programs)


def refill_work(lengths: np.ndarray, pc: int, slots: int) -> DecodeWork:
  """Refilled pools of `slots` per prompt, pc prompts per decode: steps
  from the event simulation; each rollout of L tokens reads 1..L-1."""
  p = lengths.shape[0]
  steps = sum(slots_lib.simulate_pools(lengths[p0:p0 + pc], slots)["steps"]
              for p0 in range(0, p, pc))
  work = lengths.astype(np.float64) - 1
  return DecodeWork(int(steps), float(np.sum(work * (work + 1) / 2)),
                    -(-p // pc))


def estimate(*, target, devices: int, samples: int, prefill: Cost,
             decode_step: Cost, decode_once: Cost, suffix_kernel_bytes: float,
             work: DecodeWork, kv_bytes_per_token: float, update: Cost,
             eff: Efficiency = Efficiency(), lengths: Lengths | None = None,
             notes: tuple[str, ...] = ()) -> dict[str, Any]:
  """The step's time on `devices` devices of `target` (per device costs).

  Args:
    target: a `topology.GpuTarget` (bandwidth, bf16_flops).
    devices: devices the rows are spread over (decode work is per device:
      `work` / devices).
    samples: rollouts per step.
    prefill: the prefill program, once per step.
    decode_step: one step of the decode loop (the loop body).
    decode_once: the decode program outside its loop, once per program.
    suffix_kernel_bytes: the part of `decode_step.bytes` that is the suffix
      kernel's operand buffers (replaced by `work.suffix_tokens`).
    work: the decode's steps and suffix reads (all devices).
    kv_bytes_per_token: K and V bytes of one token over all layers.
    update: the update program, once per step.
    eff / lengths / notes: the assumptions, reported back.

  Returns:
    {"prefill_s", "decode_s", "update_s", "step_s",
     "generation_samples_per_s", "decode_steps", "assumptions"}.
  """
  step = dataclasses.replace(decode_step,
                             bytes=decode_step.bytes - suffix_kernel_bytes)
  suffix = work.suffix_tokens * kv_bytes_per_token / devices
  decode_s = (seconds(step, target, eff, extra_bytes=suffix,
                      times=work.steps)
              + seconds(decode_once, target, eff, times=work.programs))
  prefill_s = seconds(prefill, target, eff)
  update_s = seconds(update, target, eff)
  out = {
      "prefill_s": prefill_s, "decode_s": decode_s, "update_s": update_s,
      "step_s": prefill_s + decode_s + update_s,
      "generation_samples_per_s": samples / (prefill_s + decode_s),
      "decode_steps": work.steps, "decode_programs": work.programs,
      "assumptions": {
          "memory_bandwidth_gb_s": target.bandwidth / 1e9,
          "bf16_peak_tflop_s": target.bf16_flops / 1e12,
          "memory_efficiency": eff.memory, "flops_efficiency": eff.flops,
          "launch_us": eff.launch_s * 1e6,
          **({"lengths": dataclasses.asdict(lengths)} if lengths else {}),
          "notes": list(notes)}}
  return out
