"""The jitted update: exact gradient accumulation, non-finite skips."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brorl_jax.config import ConfigError
from brorl_jax.rl import buckets, losses
from brorl_jax.rl.train_state import (OptimConfig, TrainState,
                                      make_optimizer, reset_reference)
from brorl_jax.rl.batch import RolloutBatch, make_rows
from brorl_jax.rl.logprobs import response_logprobs
from brorl_jax.rl.update import UpdateConfig, make_update_fn

P, G, LP, T = 2, 4, 6, 5


def _batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(3, vocab, (P, LP)).astype(np.int32)
  lengths = np.array([6, 3], np.int32)
  prompt[1, :3] = 0
  return RolloutBatch(
      prompt_tokens=jnp.asarray(prompt), prompt_lengths=jnp.asarray(lengths),
      tokens=jnp.asarray(rng.integers(3, vocab, (P, G, T)), jnp.int32),
      logprobs=jnp.asarray(-rng.uniform(1, 7, (P, G, T)), jnp.float32),
      lengths=jnp.asarray(rng.integers(1, T + 1, (P, G)), jnp.int32),
      advantages=jnp.asarray(rng.normal(size=(P, G)), jnp.float32),
      mask=jnp.asarray(rng.uniform(size=(P, G)) > 0.2))


def _run(policy, params, cfg, loss_cfg, opt, batch):
  state = TrainState.create(params, opt, with_reference=loss_cfg.kl_coef > 0)
  fn = jax.jit(make_update_fn(policy, cfg, loss_cfg, opt, temperature=0.9))
  return fn(state, batch, jax.random.key(0))


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_micro_batch_accumulation_equals_full_batch(tiny_policy, tiny_params,
                                                    aggregation):
  batch = _batch(tiny_policy.cfg.vocab_size)
  loss_cfg = losses.LossConfig(aggregation=aggregation, kl_coef=0.1)
  # An "optimizer" whose state is the last gradient it saw.
  sgd = optax.GradientTransformation(
      init=lambda p: jax.tree.map(jnp.zeros_like, p),
      update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
  full, m_full = _run(tiny_policy, tiny_params, UpdateConfig(
      num_minibatches=1, micro_batch_size=P * G, shuffle=False), loss_cfg,
      sgd, batch)
  acc, m_acc = _run(tiny_policy, tiny_params, UpdateConfig(
      num_minibatches=1, micro_batch_size=2, shuffle=False), loss_cfg, sgd,
      batch)
  grad_full, grad_acc = full.opt_state, acc.opt_state
  for path, g in jax.tree_util.tree_leaves_with_path(grad_full):
    other = grad_acc
    for k in path:
      other = other[k.key]
    scale = float(jnp.abs(g).max())
    assert scale > 0, path
    np.testing.assert_allclose(other, g, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(m_acc["loss/loss"], m_full["loss/loss"],
                             rtol=1e-5)
  resp = np.arange(T)[None] < np.asarray(batch.lengths).reshape(-1, 1)
  assert float(m_full["loss/num_tokens"]) == (
      resp * np.asarray(batch.mask).reshape(-1, 1)).sum()
  # Before any update the trainer's log-probs differ from these made-up
  # "sampler" log-probs; the gap metric must see it.
  assert m_full["rollout/logp_diff_mean"] > 0.1


def test_non_finite_update_is_skipped(tiny_policy, tiny_params):
  batch = _batch(tiny_policy.cfg.vocab_size)
  batch = batch.replace(advantages=batch.advantages.at[0, 1].set(jnp.nan),
                        mask=batch.mask.at[0, 1].set(True))
  opt = make_optimizer(OptimConfig(learning_rate=1e-2), P * G)
  state, metrics = _run(tiny_policy, tiny_params, UpdateConfig(
      num_minibatches=2, micro_batch_size=2, shuffle=False),
      losses.LossConfig(), opt, batch)
  # Row 1 is in the first mini-batch: that update is skipped, the second
  # one (finite) is applied.
  assert int(state.skipped) == 1 and int(state.updates) == 1
  assert int(metrics["optim/skipped"]) == 1
  # With every mini-batch poisoned, nothing changes, bitwise.
  bad = batch.replace(advantages=jnp.full((P, G), jnp.nan),
                      mask=jnp.ones((P, G), bool))
  state, _ = _run(tiny_policy, tiny_params, UpdateConfig(
      num_minibatches=2, micro_batch_size=2), losses.LossConfig(), opt, bad)
  assert int(state.skipped) == 2 and int(state.updates) == 0
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(tiny_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(state.step) == 1


def test_update_learns_on_the_advantage_sign(tiny_policy, tiny_params):
  """A positive-advantage rollout's log-prob rises, a negative one's falls."""
  batch = _batch(tiny_policy.cfg.vocab_size, seed=3)
  batch = batch.replace(mask=jnp.ones((P, G), bool),
                        advantages=jnp.asarray([[1., -1, 1, -1]] * P))
  rows = make_rows(batch)
  def seq_logp(params):
    logp, _ = response_logprobs(tiny_policy, params, rows.inputs, rows.valid,
                                rows.targets, temperature=0.9,
                                vocab_chunk=128, seq_chunk=4)
    return np.asarray((logp * rows.loss_mask).sum(-1))
  before = seq_logp(tiny_params)
  opt = make_optimizer(OptimConfig(learning_rate=1e-3, grad_clip=0), P * G)
  # Old log-probs equal to the current ones (ratio 1 at the start).
  logp, _ = response_logprobs(tiny_policy, tiny_params, rows.inputs,
                              rows.valid, rows.targets, temperature=0.9,
                              vocab_chunk=128, seq_chunk=4)
  batch = batch.replace(logprobs=logp.reshape(P, G, T))
  state, metrics = _run(tiny_policy, tiny_params, UpdateConfig(
      num_minibatches=1, micro_batch_size=4), losses.LossConfig(), opt, batch)
  after = seq_logp(state.params)
  sign = np.sign(np.asarray(batch.advantages).reshape(-1))
  assert (np.sign(after - before) == sign).all(), (after - before, sign)
  assert float(metrics["rollout/logp_diff_max"]) < 1e-5


def test_rows_must_split_evenly(tiny_policy, tiny_params):
  with pytest.raises(ConfigError, match="algo.micro_batch_size"):
    _run(tiny_policy, tiny_params, UpdateConfig(num_minibatches=2,
                                                micro_batch_size=3),
         losses.LossConfig(), optax.sgd(1.0),
         _batch(tiny_policy.cfg.vocab_size))


def test_lr_scaling_and_reference_reset(tiny_params):
  cfg = OptimConfig(learning_rate=1e-6, reference_samples_per_step=8192)
  assert cfg.peak_lr(65536) == pytest.approx(1e-6 * 8 ** 0.5)
  assert cfg.peak_lr(8192) == pytest.approx(1e-6)
  opt = make_optimizer(cfg, 65536)
  state = TrainState.create(tiny_params, opt, with_reference=True)
  state = state.replace(params=jax.tree.map(lambda x: x + 1, state.params))
  reset = reset_reference(state, opt, reset_optimizer=False)
  np.testing.assert_array_equal(reset.ref_params["final_norm"]["scale"],
                                state.params["final_norm"]["scale"])
  with pytest.raises(ValueError, match="kl_coef"):
    reset_reference(TrainState.create(tiny_params, opt, with_reference=False),
                    opt, reset_optimizer=True)


def test_dropped_groups_cost_nothing_and_change_nothing(tiny_policy,
                                                        tiny_params):
  """Rows of dropped groups are sorted into skipped micro-batches; the
  gradient equals that of the kept rows alone."""
  batch = _batch(tiny_policy.cfg.vocab_size, seed=5)
  batch = batch.replace(mask=jnp.asarray([[True] * G, [False] * G]))
  recorder = optax.GradientTransformation(
      init=lambda p: jax.tree.map(jnp.zeros_like, p),
      update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
  full, m_full = _run(tiny_policy, tiny_params, UpdateConfig(
      num_minibatches=1, micro_batch_size=2), losses.LossConfig(), recorder,
      batch)
  kept = jax.tree.map(lambda x: x[:1], batch)
  alone, m_alone = _run(tiny_policy, tiny_params, UpdateConfig(
      num_minibatches=1, micro_batch_size=2), losses.LossConfig(), recorder,
      kept)
  for a, b in zip(jax.tree.leaves(full.opt_state),
                  jax.tree.leaves(alone.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert float(m_full["loss/num_tokens"]) == float(
      m_alone["loss/num_tokens"])
  np.testing.assert_allclose(m_full["loss/loss"], m_alone["loss/loss"],
                             rtol=1e-5)


def _mixed_batch(vocab, t=19, seed=7):
  """Rows of mixed response lengths (1..t, one at t), two dropped rows."""
  rng = np.random.default_rng(seed)
  batch = _batch(vocab, seed)
  lengths = rng.integers(1, t // 3, (P, G)).astype(np.int32)
  lengths[0, 2] = t
  lengths[1, 0] = t // 2
  return batch.replace(
      tokens=jnp.asarray(rng.integers(3, vocab, (P, G, t)), jnp.int32),
      logprobs=jnp.asarray(-rng.uniform(1, 7, (P, G, t)), jnp.float32),
      lengths=jnp.asarray(lengths),
      mask=jnp.asarray([[True] * G, [True, True, False, False]]))


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_length_buckets_equal_the_untrimmed_update(tiny_policy, tiny_params,
                                                   aggregation):
  batch = _mixed_batch(tiny_policy.cfg.vocab_size)
  # LP = 6, T = 19 with blockwise's granule of 8: buckets of 11 and 19
  # response columns (input lengths 16, 24); 2 buckets keep compiling short.
  assert buckets.bucket_targets(LP, 19, 2, "blockwise") == (11, 19)
  # No KL term: the reference forward takes the same cut micro-batch, and
  # it would double the compile time.
  loss_cfg = losses.LossConfig(aggregation=aggregation, kl_coef=0.0)
  recorder = optax.GradientTransformation(
      init=lambda p: jax.tree.map(jnp.zeros_like, p),
      update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
  run = lambda n: _run(tiny_policy, tiny_params, UpdateConfig(  # noqa: E731
      num_minibatches=1, micro_batch_size=2, length_buckets=n), loss_cfg,
      recorder, batch)
  full, m_full = run(1)
  cut, m_cut = run(2)
  for g_full, g_cut in zip(jax.tree.leaves(full.opt_state),
                           jax.tree.leaves(cut.opt_state)):
    scale = float(jnp.abs(g_full).max())
    np.testing.assert_allclose(g_cut, g_full, rtol=1e-5, atol=1e-5 * scale)
  for key in ("loss/loss", "loss/pg_loss", "loss/num_tokens",
              "loss/entropy"):
    np.testing.assert_allclose(m_cut[key], m_full[key], rtol=1e-5, err_msg=key)


def test_length_buckets_sort_rows_and_pick_the_smallest_bucket():
  targets = buckets.bucket_targets(LP, 24, 4, "blockwise")
  lengths = jnp.asarray([[3, 24, 0, 11, 5, 1, 12, 0]])    # [M=1, 8 rows]
  rows = make_rows(RolloutBatch(
      prompt_tokens=jnp.zeros((1, LP), jnp.int32),
      prompt_lengths=jnp.full((1,), LP, jnp.int32),
      tokens=jnp.broadcast_to(lengths[..., None], (1, 8, 24)),
      logprobs=jnp.zeros((1, 8, 24)), lengths=lengths,
      advantages=jnp.zeros((1, 8)), mask=jnp.ones((1, 8), bool)))
  order = buckets.row_order(rows.loss_mask, jnp.arange(8), 1,
                            by_length=True)               # one mini-batch
  ordered = jax.tree.map(lambda x: x[order], rows)
  assert ordered.targets[0, :, 0].tolist() == [24, 12, 11, 5, 3, 1, 0, 0]
  # The shuffle first, then the sort: ties keep the shuffled order.
  perm = jnp.asarray([7, 2, 0, 1, 3, 4, 5, 6])
  assert buckets.row_order(rows.loss_mask, perm, 2, by_length=False
                           ).tolist() == [[0, 1, 7, 2], [3, 4, 5, 6]]
  micro = jax.tree.map(lambda x: x[0].reshape(4, 2, *x.shape[2:]), ordered)
  index = [int(buckets.branch_index(micro.loss_mask[i], targets))
           for i in range(4)]
  assert index == [3, 2, 1, 0]     # longest 24 -> 24, 11 -> 11, 3 -> 3, skip
  # Every row at the maximum length: one bucket, the untrimmed micro-batch.
  full = jnp.ones((2, 24), bool)
  assert int(buckets.branch_index(full, targets)) == len(targets)
  assert buckets.cut(jax.tree.map(lambda x: x[0], micro), 24).targets.shape \
      == (2, 24)
  assert targets == (3, 11, 24)    # 19 (input 24 of 29) saves too little
  # Granules the buckets round to, and buckets that save too little.
  assert buckets.bucket_targets(32, 32, 4, "blockwise") == (9, 32)
  assert buckets.bucket_targets(40, 10, 4, "blockwise") == (10,)
  assert buckets.bucket_targets(1024, 16384, 4, "splash") == (
      2049, 4097, 8193, 16384)
  assert buckets.bucket_targets(32, 32, 1, "blockwise") == (32,)
