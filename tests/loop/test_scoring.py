"""Scoring as refilled rollouts finish, and stopping at segment boundaries."""

import concurrent.futures
import types

import jax
import numpy as np

from brorl_jax.loop import scoring
from brorl_jax.rewards.registry import VerifyResult
from brorl_jax.rollout import Sampler, SamplerConfig

LP, T, P, N = 10, 12, 2, 6


class _Tokens:
  """Completion text = the token ids, so the reward can be checked."""

  def decode_batch(self, batch):
    return [" ".join(map(str, ids)) for ids in batch]


class _Pool:
  """Scores synchronously; records how many items each submit carried."""

  def __init__(self):
    self.batches = []

  def submit(self, items):
    self.batches.append(len(items))
    f = concurrent.futures.Future()
    f.set_result([VerifyResult(reward=float(len(i.completion.split())),
                               status="ok", seconds=0.0) for i in items])
    return f


def _run(policy, params, refill, stops, should_stop=None):
  cfg = SamplerConfig(n=N, max_prompt_len=LP, max_new_tokens=T, refill=refill,
                      max_decode_rows=4, segment_steps=2)
  sampler = Sampler(policy, cfg, stop_ids=stops, pad_id=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, policy.cfg.vocab_size, (P, LP)).astype(np.int32)
  lengths = np.full((P,), LP, np.int32)
  records = [types.SimpleNamespace(answer="", verifier="v", tests=None,
                                   meta={})] * P
  pool = _Pool()
  out = scoring.sample_and_score(sampler, pool, _Tokens(), params, tokens,
                                 lengths, records, jax.random.key(4),
                                 should_stop=should_stop)
  return out, pool


def test_refill_scores_rollouts_as_they_finish(tiny_policy, tiny_params):
  free, _ = _run(tiny_policy, tiny_params, False, (10_000,))
  cont = np.asarray(free.rollouts.tokens)
  stops = (int(cont[0, 0, 2]), int(cont[1, 3, 4]), int(cont[0, 5, 6]))
  fixed, _ = _run(tiny_policy, tiny_params, False, stops)
  got, pool = _run(tiny_policy, tiny_params, True, stops)
  # Items reached the verifiers in several batches, the first one while
  # rollouts were still decoding.
  assert len(pool.batches) > 1 and pool.batches[0] < P * N
  assert sum(pool.batches) == P * N
  np.testing.assert_array_equal(np.asarray(got.rollouts.tokens),
                                np.asarray(fixed.rollouts.tokens))
  np.testing.assert_array_equal(np.asarray(got.rewards),
                                np.asarray(got.rollouts.lengths))
  np.testing.assert_array_equal(np.asarray(got.rewards),
                                np.asarray(fixed.rewards))


def test_refill_stops_at_a_segment_boundary(tiny_policy, tiny_params):
  asked = []

  def should_stop():
    asked.append(1)
    return True
  out, pool = _run(tiny_policy, tiny_params, True, (10_000,), should_stop)
  assert out is None and len(asked) == 1
  # One segment of 2 steps ran: nothing could finish (T = 12).
  assert pool.batches == []
