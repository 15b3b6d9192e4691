"""Sample and score: the sampler's chunks, overlapped with host verifiers.

  prefill (device) -> chunk 0 dispatched
  chunk i + 1 dispatched (device) | chunk i fetched, decoded, submitted to
                                  | the reward pool (host, worker processes)
  ... -> rewards [P, G] re-enter the mesh with the rollouts' sharding.

With the refill decode (`rollout.refill`) the unit is a segment instead of a
chunk: after each segment the rollouts that ended in it are fetched (only
their rows) and submitted, while the verifiers score them the next segment
decodes.

Each host fetches, decodes and scores only the rollouts whose shards it
holds (`host_shards`), and feeds its rewards back for exactly those shards,
so nothing crosses hosts but the rewards' own sharding. Every host holds the
records of the whole prompt batch (they are small), so whichever host a
rollout is decoded on can score it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from brorl_jax.rewards import STATUS_CODES, RewardPool, VerifyItem
from brorl_jax.rollout import Rollouts, Sampler


def host_shards(x: jax.Array) -> list[tuple[tuple[slice, ...], np.ndarray]]:
  """This process's distinct shards of `x`: (global index, data) pairs."""
  seen, out = set(), []
  for shard in x.addressable_shards:
    key = tuple((s.start, s.stop) for s in shard.index)
    if key in seen:
      continue
    seen.add(key)
    out.append((shard.index, np.asarray(shard.data)))
  return out


def _norm(index: tuple[slice, ...], shape: tuple[int, ...]):
  return tuple((s.start or 0, shape[i] if s.stop is None else s.stop)
               for i, s in enumerate(index))


def array_from_host_shards(shape: tuple[int, ...], sharding: Any,
                           shards: dict, dtype) -> jax.Array:
  """Builds a global array from values this process holds per shard.

  Args:
    shape: the global shape.
    sharding: the global sharding.
    shards: {((start, stop) per dim): values} for this host's blocks.
    dtype: the array's dtype.
  """
  by_key = shards

  def cb(index):
    key = _norm(index, shape)
    if key in by_key:
      return by_key[key].astype(dtype)
    # A sub-shard of a block this host scored (finer output sharding).
    for k, v in by_key.items():
      if all(a0 <= b0 and b1 <= a1 for (a0, a1), (b0, b1) in zip(k, key)):
        return v[tuple(slice(b0 - a0, b1 - a0) for (a0, _), (b0, b1)
                       in zip(k, key))].astype(dtype)
    raise ValueError(f"no host values for shard {key} of {shape}")
  return jax.make_array_from_callback(shape, sharding, cb)


@dataclasses.dataclass
class Scored:
  """Sampled and scored rollouts.

  Attributes:
    rollouts: the sampler's output (device arrays, [P, G, ...]).
    rewards: [P, G] f32 device array (verifier rewards).
    status: [P, G] int8 device array (`STATUS_CODES`).
    texts: {(p, g): completion text} of the rollouts this host scored.
    seconds: {"sample": ..., "score_wait": ...} host wall times; score_wait
      is the scoring time not hidden behind decoding; with the refill
      decode also "segment_max", the longest segment (a preemption waits
      at most this long for the decode).
  """

  rollouts: Rollouts
  rewards: jax.Array
  status: jax.Array
  texts: dict[tuple[int, int], str]
  seconds: dict[str, float]


def _verify_item(record, completion: str) -> VerifyItem:
  """What the reward pool scores: a completion against its record."""
  return VerifyItem(completion=completion, answer=record.answer,
                    verifier=record.verifier, tests=record.tests,
                    meta=record.meta)


def _items(tokens: np.ndarray, lengths: np.ndarray, p0: int, g0: int,
           records, tokenizer
           ) -> tuple[list[tuple[int, int]], list[VerifyItem]]:
  """VerifyItems for one host shard [p, g, T] starting at (p0, g0)."""
  keys, items = [], []
  for i in range(tokens.shape[0]):
    texts = tokenizer.decode_batch(
        [tokens[i, j, :lengths[i, j]].tolist() for j in range(tokens.shape[1])])
    for j, text in enumerate(texts):
      keys.append((p0 + i, g0 + j))
      items.append(_verify_item(records[p0 + i], text))
  return keys, items


def sample_and_score(sampler: Sampler, pool: RewardPool, tokenizer,
                     params: Any, prompt_tokens: jax.Array,
                     prompt_lengths: jax.Array, records: Sequence[Any],
                     rng: jax.Array, *, n: int | None = None,
                     keep_texts: bool = True,
                     should_stop: Callable[[], bool] | None = None,
                     prompt_offset: int = 0,
                     length_limits=None) -> Scored | None:
  """Samples G rollouts per prompt and scores them, overlapping the two.

  Args:
    sampler: the sampler (its config gives G unless `n` is set).
    pool: the reward pool.
    tokenizer: decodes completions.
    params: parameters in the sampling layout.
    prompt_tokens / prompt_lengths: [P, Lp] / [P] global device arrays.
    records: the P records (every host has all of them).
    rng: sampling key.
    n: rollouts per prompt (default: the sampler's).
    keep_texts: keep the decoded texts (for the JSONL sample).
    should_stop: asked after each decode chunk is fetched (a BroRL step
      decodes for most of an hour; a preemption notice gives ~30 s); True
      abandons the step and returns None. In a multi-process run it must
      give the same answer on every process (it is called the same number
      of times on each: a collective is fine).
    prompt_offset: global index of prompt 0 in the draws' keys (evaluation
      batches pass their first problem's index, so a problem's samples do
      not depend on the batch size).
    length_limits: optional [P, n] per-rollout length limits (0: the
      rollout is not decoded past its first token; adaptive allocation's
      unused rows).

  Returns:
    The scored rollouts, or None when `should_stop` said so.
  """
  t0 = time.perf_counter()
  prefill = sampler.prefill(params, prompt_tokens, prompt_lengths)
  outs, futures = [], []

  def submit(chunk):
    # Blocks until this chunk is decoded; the next one is already queued.
    p_slice, g_slice, out = chunk
    lengths = {_norm(i, out["lengths"].shape): v
               for i, v in host_shards(out["lengths"])}
    for index, tokens in host_shards(out["tokens"]):
      (p0, p1), (g0, g1), _ = _norm(index, out["tokens"].shape)
      keys, items = _items(tokens, lengths[(p0, p1), (g0, g1)],
                           p_slice.start + p0, g_slice.start + g0, records,
                           tokenizer)
      futures.append((keys, items, pool.submit(items)))

  if sampler.cfg.refill:
    finals = []
    seen = np.zeros((prefill.logits.shape[0], n or sampler.cfg.n), bool)
    # Rows limited to 0 tokens are placeholders (adaptive allocation's
    # unused rows): never scored; reward 0, empty text.
    unused = (np.zeros_like(seen) if length_limits is None else
              np.asarray(jax.device_get(length_limits)) == 0)
    seen |= unused
    longest, t_seg = 0.0, time.perf_counter()
    for p_slice, state, last in sampler.segments(
        params, prefill, rng, n=n, prompt_offset=prompt_offset,
        length_limits=length_limits):
      now = time.perf_counter()
      longest, t_seg = max(longest, now - t_seg), now
      futures.extend(_submit_finished(pool, state, p_slice.start, seen,
                                      records, tokenizer))
      if last:
        finals.append(state)
      if should_stop is not None and should_stop():
        return None                   # abandoned at a segment boundary
    rollouts = sampler.assemble_refill(prefill, finals)
    return _collect(rollouts, futures, keep_texts, t0,
                    {"segment_max": longest}, unused=unused)

  previous = None
  for chunk in sampler.chunks(params, prefill, rng, n=n,
                              prompt_offset=prompt_offset,
                              length_limits=length_limits):
    outs.append(chunk)
    if previous is not None:
      submit(previous)
      if should_stop is not None and should_stop():
        return None                   # chunks in flight finish unused
    previous = chunk
  submit(previous)
  return _collect(sampler.assemble(prefill, outs), futures, keep_texts, t0)


def _submit_finished(pool: RewardPool, state, p_start: int, seen: np.ndarray,
                     records, tokenizer) -> list:
  """Submits the rollouts of `state` that ended since the last segment.

  Reads `done` and `lengths` for this host's blocks, then only the token
  rows of the newly ended rollouts (a gather on the shard's device, its
  size rounded up to a power of two to bound recompiles). Marks them in
  `seen` ([P, N], global indices).
  """
  done = {_norm(i, state.done.shape): v for i, v in host_shards(state.done)}
  lens = {_norm(i, state.lengths.shape): v
          for i, v in host_shards(state.lengths)}
  futures, blocks = [], set()
  for shard in state.tokens.addressable_shards:
    (p0, p1), (g0, g1), _ = _norm(shard.index, state.tokens.shape)
    if ((p0, p1), (g0, g1)) in blocks:
      continue
    blocks.add(((p0, p1), (g0, g1)))
    block_seen = seen[p_start + p0:p_start + p1, g0:g1]
    ii, jj = np.nonzero(done[(p0, p1), (g0, g1)] & ~block_seen)
    if not ii.size:
      continue
    block_seen[ii, jj] = True
    pad = (1 << int(ii.size - 1).bit_length()) - ii.size
    rows = np.asarray(shard.data[np.pad(ii, (0, pad), mode="edge"),
                                 np.pad(jj, (0, pad), mode="edge")])
    ln = lens[(p0, p1), (g0, g1)][ii, jj]
    texts = tokenizer.decode_batch([rows[k, :ln[k]].tolist()
                                    for k in range(ii.size)])
    keys, items = [], []
    for i, j, text in zip(ii, jj, texts):
      keys.append((p_start + p0 + int(i), g0 + int(j)))
      items.append(_verify_item(records[p_start + p0 + int(i)], text))
    futures.append((keys, items, pool.submit(items)))
  return futures


def _collect(rollouts: Rollouts, futures: list, keep_texts: bool,
             t0: float, extra: dict[str, float] | None = None,
             unused: np.ndarray | None = None) -> Scored:
  """Waits for the decode and the verifiers; rewards back on device.
  `unused` ([P, G] bool) marks placeholder rows: reward 0, text ""."""
  jax.block_until_ready(rollouts.tokens)
  t1 = time.perf_counter()
  rewards, status, texts = {}, {}, {}
  if unused is not None:
    for p, g in zip(*np.nonzero(unused)):
      p, g = int(p), int(g)
      rewards[p, g], status[p, g] = 0.0, STATUS_CODES["ok"]
      if keep_texts:
        texts[p, g] = ""
  for keys, items, future in futures:
    for (p, g), item, result in zip(keys, items, future.result()):
      rewards[p, g] = result.reward
      status[p, g] = STATUS_CODES[result.status]
      if keep_texts:
        texts[p, g] = item.completion
  t2 = time.perf_counter()
  reward_arr, status_arr = _to_device(rewards, status,
                                      rollouts.lengths)
  return Scored(rollouts=rollouts, rewards=reward_arr, status=status_arr,
                texts=texts, seconds={"sample": t1 - t0,
                                      "score_wait": t2 - t1, **(extra or {})})


def _to_device(rewards: dict, status: dict, like: jax.Array):
  """{(p, g): value} of this host -> [P, G] arrays sharded like `like`."""
  shape = like.shape
  r_shards, s_shards = {}, {}
  for index, _ in host_shards(like):
    (p0, p1), (g0, g1) = _norm(index, shape)
    r = np.zeros((p1 - p0, g1 - g0), np.float32)
    s = np.zeros((p1 - p0, g1 - g0), np.int8)
    for p in range(p0, p1):
      for g in range(g0, g1):
        if (p, g) not in rewards:
          raise RuntimeError(
              f"rollout ({p}, {g}) sits on this host but was scored on "
              "another; use a mesh whose data axes divide the prompts")
        r[p - p0, g - g0] = rewards[p, g]
        s[p - p0, g - g0] = status[p, g]
    r_shards[(p0, p1), (g0, g1)] = r
    s_shards[(p0, p1), (g0, g1)] = s
  return (array_from_host_shards(shape, like.sharding, r_shards, np.float32),
          array_from_host_shards(shape, like.sharding, s_shards, np.int8))
