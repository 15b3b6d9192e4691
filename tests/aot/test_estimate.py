"""The step-time estimate against a count by hand on a small case."""

import numpy as np
import pytest

from brorl_jax.aot import estimate as est
from brorl_jax.aot.hlo_cost import Cost
from brorl_jax.aot.topology import GpuTarget

TARGET = GpuTarget(kind="t", name="t", memory_bytes=2**30, bandwidth=1e12,
                   bf16_flops=1e15, text="", source="")
EFF = est.Efficiency(memory=0.5, flops=0.5, launch_s=1e-6)
# Two prompts x two rollouts, lengths in tokens (the first comes from the
# prefill: a rollout of L tokens takes L - 1 decode steps).
LENGTHS = np.array([[3, 5], [2, 4]])


def test_decode_work_by_hand():
  # One slot per prompt: prompt 0 runs 2 + 4 steps, prompt 1 1 + 3; the
  # decode runs until the slowest pool is done. A rollout of L tokens reads
  # 1 + 2 + ... + (L - 1) suffix slots: 3 + 10 + 1 + 6.
  refill = est.refill_work(LENGTHS, pc=2, slots=1)
  assert (refill.steps, refill.suffix_tokens, refill.programs) == (6, 20, 1)
  # Fixed chunks of one rollout per prompt: chunk 0 runs to max(3, 2) - 1
  # = 2 steps, chunk 1 to 4; every row of a chunk reads 1..steps.
  fixed = est.fixed_chunk_work(LENGTHS, pc=2, gc=1)
  assert (fixed.steps, fixed.suffix_tokens, fixed.programs) == (
      6, 2 * 3 + 2 * 10, 2)


def test_estimate_by_hand():
  step = Cost(flops=1e9, bytes=1.5e9, launches=10)
  out = est.estimate(
      target=TARGET, devices=2, samples=4, prefill=Cost(bytes=5e9),
      decode_step=step, decode_once=Cost(bytes=1e8),
      suffix_kernel_bytes=5e8, work=est.refill_work(LENGTHS, 2, 1),
      kv_bytes_per_token=1000, update=Cost(flops=1e12, bytes=1e9,
                                           launches=100), eff=EFF)
  # Decode, memory bound: 6 steps x 1e9 bytes (the kernel's 5e8 replaced
  # by 20 slots x 1000 bytes over 2 devices) at 0.5 x 1e12 B/s, + 6 x 10
  # launches of 1 us, + the program's 1e8 bytes once.
  decode = (6 * 1e9 + 20 * 1000 / 2) / 5e11 + 6 * 10 * 1e-6 + 1e8 / 5e11
  # Update, compute bound: 1e12 FLOPs at 0.5 x 1e15 (bytes: 2e-3 s).
  update = 1e12 / 5e14 + 100 * 1e-6
  prefill = 5e9 / 5e11
  assert out["decode_s"] == pytest.approx(decode, rel=1e-12)
  assert out["update_s"] == pytest.approx(update, rel=1e-12)
  assert out["step_s"] == pytest.approx(prefill + decode + update)
  assert out["generation_samples_per_s"] == pytest.approx(
      4 / (prefill + decode))
  assert out["assumptions"]["memory_efficiency"] == 0.5


def test_refill_beats_fixed_chunks_on_long_tails():
  # The pod recipes' case in small: a long tail stalls every fixed chunk,
  # refilled slots move on.
  lengths = est.Lengths(mean_frac=0.3).draw(4, 64, 1024)
  refill = est.refill_work(lengths, pc=4, slots=16)
  fixed = est.fixed_chunk_work(lengths, pc=4, gc=16)
  assert refill.steps < 0.6 * fixed.steps
  assert refill.suffix_tokens < 0.5 * fixed.suffix_tokens
