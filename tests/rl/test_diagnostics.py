"""The diagnostics' re-scoring: rollouts drawn as a few of each of several
prompts, scored with each prompt computed once, equal to the repeated rows;
on a mesh, rows split over the data axes, values equal to the single-device
computation."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from brorl_jax.model.sharding import TRAIN_RULES, MeshRules, make_mesh, reshard
from brorl_jax.rl import diagnostics
from brorl_jax.rl.batch import RolloutBatch, make_rows
from brorl_jax.rl.logprobs import response_logprobs
from brorl_jax.rl.update import batch_shardings

P, G, LP, T, S = 2, 8, 6, 5, 8


def _batch(vocab):
  rng = np.random.default_rng(0)
  return RolloutBatch(
      prompt_tokens=jnp.asarray(rng.integers(3, vocab, (P, LP)), jnp.int32),
      prompt_lengths=jnp.asarray([6, 3], jnp.int32),
      tokens=jnp.asarray(rng.integers(3, vocab, (P, G, T)), jnp.int32),
      logprobs=jnp.zeros((P, G, T), jnp.float32),
      lengths=jnp.asarray(rng.integers(1, T + 1, (P, G)), jnp.int32),
      advantages=jnp.zeros((P, G), jnp.float32),
      mask=jnp.ones((P, G), bool))


def test_rescore_splits_rows_over_the_mesh(tiny_policy, tiny_params):
  kw = dict(temperature=0.9, vocab_chunk=128, seq_chunk=T)
  rb = _batch(tiny_policy.cfg.vocab_size)
  rows = diagnostics.pick_rows(jax.random.key(1), S, P, G)
  # 4 of each prompt (as many prompts as there are), distinct rollouts.
  assert diagnostics.rescore_layout(S, P) == (2, 4)
  assert sorted(np.asarray(rows) // G) == [0] * 4 + [1] * 4
  assert len(set(np.asarray(rows).tolist())) == S
  ref = diagnostics.jit_rescore(tiny_policy, **kw)(tiny_params, rb, rows)
  # The repeated rows `prompt ++ response`, summed over each response.
  full = jax.tree.map(lambda x: x[rows], make_rows(rb))
  logp, _ = response_logprobs(tiny_policy, tiny_params, full.inputs,
                              full.valid, full.targets, **kw)
  in_resp = np.arange(T)[None] < np.asarray(rb.lengths).reshape(-1)[rows,
                                                                     None]
  np.testing.assert_allclose(ref, np.where(in_resp, logp, 0).sum(-1),
                             rtol=1e-5, atol=1e-5)
  # 7 rows of 2 prompts: 4 + 3 (the last prompt's surplus dropped).
  assert diagnostics.rescore_layout(7, P) == (2, 4)
  seven = diagnostics.jit_rescore(tiny_policy, **kw)(
      tiny_params, rb, rows[:7])
  np.testing.assert_allclose(seven, ref[:7], rtol=1e-5, atol=1e-5)
  rules = MeshRules(make_mesh((2, 4, 1)), TRAIN_RULES)
  fn = diagnostics.jit_rescore(tiny_policy, mesh_rules=rules, **kw)
  params = reshard(tiny_params, tiny_policy.shardings(rules))
  rb = reshard(rb, batch_shardings(rules, rb))
  got = fn(params, rb, rows)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
  assert got.sharding.is_fully_replicated
  # Each of the 8 devices scores 1 of the 8 rows: its logits tiles are
  # [1, T, 128], never the [8, T, 128] of every row.
  hlo = fn.lower(params, rb, rows).compile().as_text()
  assert re.search(rf"f32\[1,{T},128\]", hlo)
  assert not re.search(rf"f32\[{S},{T},128\]", hlo)
