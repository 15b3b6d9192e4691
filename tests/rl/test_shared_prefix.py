"""The shared-prefix update equals the repeated-rows update.

Same rows, same micro-batches (one slot order), each prompt computed once
per slot against every rollout its own `prompt ++ response` row: loss,
metrics and every gradient within 1e-5 (f32), with a KL reference, unequal
groups (adaptive allocation's invalid rollouts), token- and sequence-mean,
length and prompt buckets on and off, on 1 device and on 8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from brorl_jax import checkpointing
from brorl_jax.model.sharding import TRAIN_RULES, MeshRules, make_mesh, reshard
from brorl_jax.rl import buckets, losses
from brorl_jax.rl import slots as slots_lib
from brorl_jax.rl import train_state as ts_lib
from brorl_jax.rl.batch import RolloutBatch, make_rows
from brorl_jax.rl.logprobs import prefixed_logprobs, response_logprobs
from brorl_jax.rl.update import (UpdateConfig, batch_shardings,
                                  compile_update, make_update_fn)

P, G, LP, T = 2, 8, 12, 9

# An "optimizer" whose state is the last gradient it saw (params unchanged).
RECORDER = optax.GradientTransformation(
    init=lambda p: jax.tree.map(jnp.zeros_like, p),
    update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _batch(vocab, seed=0):
  """Unequal groups: group 0 has 8 rollouts, group 1 has 5 (the rest are
  adaptive allocation's padding: no tokens, masked); short prompts (4 and
  11 of 12 columns, so a prompt bucket of 6 can hold one of them)."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(3, vocab, (P, LP)).astype(np.int32)
  prompt_len = np.array([4, 11], np.int32)
  prompt[np.arange(LP)[None] < (LP - prompt_len)[:, None]] = 0
  lengths = rng.integers(1, T + 1, (P, G)).astype(np.int32)
  lengths[0, 3] = T
  valid = np.ones((P, G), bool)
  valid[1, 5:] = False
  lengths[~valid] = 0
  return RolloutBatch(
      prompt_tokens=jnp.asarray(prompt), prompt_lengths=jnp.asarray(prompt_len),
      tokens=jnp.asarray(rng.integers(3, vocab, (P, G, T)), jnp.int32),
      logprobs=jnp.asarray(-rng.uniform(1, 7, (P, G, T)), jnp.float32),
      lengths=jnp.asarray(lengths),
      advantages=jnp.asarray(rng.normal(size=(P, G)), jnp.float32),
      mask=jnp.asarray(valid & (rng.uniform(size=(P, G)) > 0.15)))


def _state(params):
  state = ts_lib.TrainState.create(params, RECORDER, with_reference=True)
  # A reference that differs from the policy: a non-zero KL and gradient.
  return state.replace(ref_params=jax.tree.map(lambda x: x * 1.02,
                                               state.ref_params))


def _assert_equal(a, b):
  (state_a, m_a), (state_b, m_b) = a, b
  for (path, g_a), g_b in zip(jax.tree_util.tree_leaves_with_path(
      state_a.opt_state), jax.tree.leaves(state_b.opt_state)):
    scale = float(jnp.abs(g_a).max())
    assert scale > 0, path
    np.testing.assert_allclose(g_b, g_a, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert set(m_a) == set(m_b)
  for key in m_a:
    np.testing.assert_allclose(m_b[key], m_a[key], rtol=1e-5, atol=1e-7,
                               err_msg=key)
  assert float(m_a["loss/kl_ref"]) > 0 and float(m_a["loss/num_tokens"]) > 0


@pytest.mark.parametrize("aggregation,length_buckets", [
    ("token_mean", 2), ("sequence_mean", 1)])
def test_shared_prefix_update_equals_repeated_rows(tiny_policy, tiny_params,
                                                   aggregation,
                                                   length_buckets):
  batch = _batch(tiny_policy.cfg.vocab_size)
  loss_cfg = losses.LossConfig(aggregation=aggregation, kl_coef=0.1)

  def run(shared):
    cfg = UpdateConfig(num_minibatches=2, micro_batch_size=4,
                       length_buckets=length_buckets, shared_prefix=shared,
                       prompt_buckets=2 if length_buckets > 1 else 1)
    fn = jax.jit(make_update(tiny_policy, cfg, loss_cfg))
    return fn(_state(tiny_params), batch, jax.random.key(3))
  _assert_equal(run(False), run(True))


def make_update(policy, cfg, loss_cfg):
  return make_update_fn(policy, cfg, loss_cfg, RECORDER, temperature=0.9)


def test_shared_prefix_update_equals_repeated_rows_on_8_devices(
    tiny_policy, tiny_params):
  """Sequence-mean with length buckets, the rows over 8 devices (4 slots
  of 2 over data 2 x fsdp 4), against the 1-device repeated rows."""
  batch = _batch(tiny_policy.cfg.vocab_size, seed=1)
  loss_cfg = losses.LossConfig(aggregation="sequence_mean", kl_coef=0.1)
  cfg = UpdateConfig(num_minibatches=1, micro_batch_size=8, length_buckets=2,
                     prompt_buckets=1)
  repeated = jax.jit(make_update(
      tiny_policy, UpdateConfig(num_minibatches=1, micro_batch_size=8,
                                length_buckets=2, shared_prefix=False),
      loss_cfg))(_state(tiny_params), batch, jax.random.key(5))
  rules = MeshRules(make_mesh((2, 4, 1)), TRAIN_RULES)
  state = _state(tiny_params)
  shardings = tiny_policy.shardings(rules)
  state_sh = ts_lib.state_shardings(
      tiny_policy.abstract_params(), shardings, RECORDER,
      with_reference=True, replicated=rules.replicated())
  state = reshard(state, state_sh)
  batch = reshard(batch, batch_shardings(rules, batch))
  abstract = lambda tree: checkpointing.abstract_with_shardings(  # noqa: E731
      jax.eval_shape(lambda: tree), jax.tree.map(lambda x: x.sharding, tree))
  fn = compile_update(tiny_policy, cfg, loss_cfg, RECORDER, temperature=0.9,
                      mesh_rules=rules, state=abstract(state),
                      batch=abstract(batch))
  _assert_equal(repeated, fn(state, batch, jax.random.key(5)))


def test_prefixed_logprobs_equal_repeated_rows(tiny_policy, tiny_params):
  """The re-scoring's forward, cut to prompt width 6 and 5 targets."""
  batch = _batch(tiny_policy.cfg.vocab_size)
  rows = jnp.asarray([[3, 1, 0], [9, 12, 14]], jnp.int32)   # 2 slots of 3
  sub = slots_lib.cut(slots_lib.gather(batch, rows), LP, 5)
  kw = dict(temperature=0.9, vocab_chunk=128, seq_chunk=4)
  logp, ent = jax.jit(lambda p: prefixed_logprobs(tiny_policy, p, sub, **kw))(
      tiny_params)
  full = jax.tree.map(lambda x: x[rows.reshape(-1)], make_rows(batch))
  full = buckets.cut(full, 5)
  ref, ref_ent = response_logprobs(tiny_policy, tiny_params, full.inputs,
                                   full.valid, full.targets, **kw)
  m = np.asarray(sub.flat(sub.response_valid))
  assert m.sum() > 10
  np.testing.assert_allclose(np.where(m, logp, 0), np.where(m, ref, 0),
                             atol=1e-5)
  np.testing.assert_allclose(np.where(m, ent, 0), np.where(m, ref_ent, 0),
                             atol=1e-5)


def test_slot_order_keeps_groups_together_and_sorts_by_length():
  # 2 groups of 4, slots of 2: group 0 needs [3, 0, 5, 1], group 1 [0, 0,
  # 2, 0] (its rollouts 0, 1, 3 do not train).
  need = jnp.asarray([[3, 0, 5, 1], [0, 0, 2, 0]], jnp.int32)
  key = jax.random.key(0)
  order = slots_lib.slot_order(need, key, 1, 2, shuffle=False, by_length=True)
  # Each prompt's rows re-cut longest first ([2, 0] of need 5 and 3), then
  # slots by their longest row; the slot with nothing to train last.
  assert order.tolist() == [[[2, 0], [6, 4], [3, 1], [5, 7]]]
  # Without buckets: groups in order, dead rollouts last within each group,
  # the slot with nothing to train at the end.
  order = slots_lib.slot_order(need, key, 2, 2, shuffle=False,
                               by_length=False)
  assert order.tolist() == [[[0, 2], [3, 1]], [[6, 4], [5, 7]]]
  # Shuffled: every row exactly once, slots from one prompt.
  for seed in range(3):
    order = np.asarray(slots_lib.slot_order(
        need, jax.random.key(seed), 2, 2, shuffle=True, by_length=True))
    assert sorted(order.reshape(-1).tolist()) == list(range(8))
    assert (order // 4 == order[..., :1] // 4).all()
  assert slots_lib.slot_rows(64, 32) == 32 and slots_lib.slot_rows(64, 512) \
      == 64 and slots_lib.slot_rows(8, 12) == 4


def test_slots_branch_index_picks_prompt_width_and_bucket():
  widths, targets = (6, 12), (4, 9)
  need = jnp.asarray([[3, 0], [2, 1]], jnp.int32)
  lengths = jnp.asarray([4, 11], jnp.int32)
  assert int(buckets.slots_branch_index(need, lengths, widths, targets)) == \
      1 + 1 * 2 + 0                                      # width 12, bucket 4
  # A slot that does not train does not set the width.
  need = jnp.asarray([[3, 5], [0, 0]], jnp.int32)
  assert int(buckets.slots_branch_index(need, lengths, widths, targets)) == \
      1 + 0 * 2 + 1                                      # width 6, bucket 9
  assert int(buckets.slots_branch_index(jnp.zeros((2, 2), jnp.int32),
                                        lengths, widths, targets)) == 0
  assert buckets.prompt_widths(1024, 2, "splash") == (512, 1024)
  assert buckets.prompt_widths(32, 3, "blockwise") == (8, 16, 32)
  assert buckets.prompt_widths(12, 2, "blockwise") == (8, 12)
  assert buckets.prompt_widths(32, 1, "blockwise") == (32,)
