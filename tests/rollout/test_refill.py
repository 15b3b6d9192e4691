"""The refill decode against the fixed-chunk decode, and its slot accounting."""

import jax
import numpy as np
import pytest

from brorl_jax.config import ConfigError
from brorl_jax.model.sharding import (SAMPLE_RULES, MeshRules, make_mesh,
                                      reshard)
from brorl_jax.rollout import Sampler, SamplerConfig, refill
from brorl_jax.rollout.config import refill_plan
from brorl_jax.rollout.slots import fixed_chunk_steps, simulate_pools

LP, T, P, N = 10, 12, 3, 6


def _setup(vocab, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([10, 4, 7], np.int32)
  tokens = np.zeros((P, LP), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, LP - n:] = rng.integers(3, vocab, n)
  # Per-rollout length budgets from 1 (ends at the prefill's token) to T.
  limits = rng.integers(1, T + 1, (P, N)).astype(np.int32)
  return tokens, lengths, limits


def _sampler(policy, stop_ids, mesh_rules=None, **kw):
  cfg = SamplerConfig(**{"n": N, "max_prompt_len": LP, "max_new_tokens": T,
                         **kw})
  return Sampler(policy, cfg, stop_ids=stop_ids, pad_id=0,
                 mesh_rules=mesh_rules)


def _assert_same(got, want):
  np.testing.assert_array_equal(np.asarray(got.tokens),
                                np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs),
                             np.asarray(want.logprobs), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got.lengths),
                                np.asarray(want.lengths))
  np.testing.assert_array_equal(np.asarray(got.stopped),
                                np.asarray(want.stopped))


@pytest.mark.parametrize("greedy", [False, True])
def test_refill_equals_fixed_chunks(tiny_policy, tiny_params, greedy):
  tokens, lengths, limits = _setup(tiny_policy.cfg.vocab_size)
  free = _sampler(tiny_policy, (10_000,), greedy=greedy).generate(
      tiny_params, tokens, lengths, jax.random.key(1))
  # Stop tokens the rollouts actually emit, so some end early by a stop.
  cont = np.asarray(free.tokens)
  stops = (int(cont[0, 0, 3]), int(cont[1, 2, 5]))
  ref = _sampler(tiny_policy, stops, greedy=greedy).generate(
      tiny_params, tokens, lengths, jax.random.key(1), length_limits=limits)
  ref_lengths = np.asarray(ref.lengths)
  # Rows end by a stop token, at their budget, and at the first token.
  assert np.asarray(ref.stopped).any() and (ref_lengths == limits).any()
  assert (ref_lengths == 1).any() and (ref_lengths > T // 2).any()
  # 1 slot per prompt, or 2 (one slot left over), or 4; with greedy draws
  # the other counts (each count is a compile: the suite's time).
  for rows in ((7, 12) if greedy else (3, 8)):
    got = _sampler(tiny_policy, stops, greedy=greedy, refill=True,
                   max_decode_rows=rows, segment_steps=4).generate(
                       tiny_params, tokens, lengths, jax.random.key(1),
                       length_limits=limits)
    _assert_same(got, ref)
    # Every slot-step that made a token is one generated token.
    busy = int(got.total_slots) - int(got.finished_slots)
    assert busy == int(np.sum(ref_lengths - 1))
  if not greedy:  # fewer slots than prompts: prompts decoded in parts
    got = _sampler(tiny_policy, stops, refill=True,
                   max_decode_rows=1).generate(
                       tiny_params, tokens, lengths, jax.random.key(1),
                       length_limits=limits)
    _assert_same(got, ref)


def test_refill_on_a_mesh_equals_one_device(tiny_policy, tiny_params):
  tokens, lengths, limits = _setup(tiny_policy.cfg.vocab_size, seed=3)
  tokens = np.concatenate([tokens, tokens[:1]])      # 4 prompts: 8 | P*G
  lengths = np.concatenate([lengths, [5]]).astype(np.int32)
  limits = np.concatenate([limits, limits[:1, ::-1]])
  ref = _sampler(tiny_policy, (10_000,)).generate(
      tiny_params, tokens, lengths, jax.random.key(2), length_limits=limits)
  for shape in [(2, 2, 2)]:         # data, fsdp and tensor axes all split
    rules = MeshRules(make_mesh(shape), SAMPLE_RULES)
    params = reshard(tiny_params, tiny_policy.shardings(rules))
    got = _sampler(tiny_policy, (10_000,), mesh_rules=rules, refill=True,
                   max_decode_rows=8, segment_steps=5).generate(
                       params, tokens, lengths, jax.random.key(2),
                       length_limits=limits)
    _assert_same(got, ref)


def test_slot_utilization_matches_the_event_simulation(tiny_policy,
                                                       tiny_params):
  tokens, lengths, limits = _setup(tiny_policy.cfg.vocab_size, seed=5)
  for rows in (6,):
    s = _sampler(tiny_policy, (10_000,), refill=True, max_decode_rows=rows,
                 segment_steps=3)
    out = s.generate(tiny_params, tokens, lengths, jax.random.key(0),
                     length_limits=limits)
    sim = simulate_pools(limits, refill_plan(P, N, rows)[1])
    assert int(out.total_slots) == sim["steps"] * rows
    assert int(out.total_slots) - int(out.finished_slots) == sim["busy"]
    # The suffix buffers follow the busy slots: narrower than T at first
    # (and again as the long rollouts end), wide enough for each segment.
    prefill = s.prefill(tiny_params, tokens, lengths)
    widths, ends = [], []
    for _, state, last in s.segments(tiny_params, prefill, jax.random.key(0),
                                     length_limits=limits):
      widths.append(state.width)
      ends.append(last)
    assert widths[0] < T and len(set(widths)) > 1 and ends[-1]
    assert all(w % -(-T // refill.WIDTH_BUCKETS) == 0 or w == T
               for w in widths)
  # The fixed chunks' steps: each chunk runs to its longest row.
  fixed = _sampler(tiny_policy, (10_000,), max_decode_rows=6).generate(
      tiny_params, tokens, lengths, jax.random.key(0), length_limits=limits)
  assert int(fixed.total_slots) == fixed_chunk_steps(limits, 2) * 6


def test_suffix_width_by_hand():
  # T = 12: widths in multiples of 3. Busy slots below position 5 (extent
  # 5), 4 steps: writes up to position 4 + 3 = 7 -> 8 slots -> 9.
  assert refill.suffix_width(5, 4, 12) == 9
  assert refill.suffix_width(0, 4, 12) == 6      # first segment: 0..3
  assert refill.suffix_width(1, 3, 12) == 3
  assert refill.suffix_width(11, 4, 12) == 12    # never past T
  assert refill.suffix_width(3, 1000, 12) == 12


def test_simulate_pools_by_hand():
  # One prompt, 2 slots, rollouts of 5, 3, 3, 1 tokens: 4, 2, 2, 0 steps.
  # Slot A: 4; slot B: 2 then 2 -> 4 steps, 8 busy of 8.
  sim = simulate_pools(np.array([[5, 3, 3, 1]]), 2)
  assert sim == {"steps": 4, "busy": 8, "utilization": 1.0}
  sim = simulate_pools(np.array([[9, 2, 2, 2]]), 2)
  assert sim["steps"] == 8 and sim["busy"] == 11
  with pytest.raises(ValueError, match="lengths must be"):
    simulate_pools(np.array([[0, 3]]), 2)
  with pytest.raises(ConfigError, match="rollout.segment_steps"):
    SamplerConfig(segment_steps=0)
