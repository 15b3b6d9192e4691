"""The group sampler against full forwards, references and statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brorl_jax.config import ConfigError
from brorl_jax.model import attention as attn_lib
from brorl_jax.model.sharding import (SAMPLE_RULES, MeshRules, make_mesh,
                                      reshard)
from brorl_jax.model.transformer import positions_from_valid
from brorl_jax.rollout import Sampler, SamplerConfig, sampling
from brorl_jax.rollout.shared_prefix import SharedPrefixAttention
from tests.model import cached_attention
from tests.rollout import suffix_layout

LP, T = 10, 8


def _prompts(rng, lengths, vocab, lp=LP, pad=0):
  tokens = np.full((len(lengths), lp), pad, np.int32)
  for i, n in enumerate(lengths):
    tokens[i, lp - n:] = rng.integers(3, vocab, n)
  return tokens, np.asarray(lengths, np.int32)


def _sampler(policy, stop_ids=(1,), mesh_rules=None, **kw):
  cfg = SamplerConfig(**{"max_prompt_len": LP, "max_new_tokens": T, **kw})
  return Sampler(policy, cfg, stop_ids=stop_ids, pad_id=0,
                 mesh_rules=mesh_rules)


def _full_logits(policy, params, tokens, valid):
  model = policy.bind(params)
  hidden, _ = model(tokens, positions_from_valid(valid),
                    attn_lib.FullAttention(valid))
  return model.logits(hidden)


def test_greedy_equals_argmax_of_full_forward(tiny_policy, tiny_params):
  rng = np.random.default_rng(0)
  tokens, lengths = _prompts(rng, [10, 4, 7], tiny_policy.cfg.vocab_size)
  sampler = _sampler(tiny_policy, stop_ids=(10_000,), greedy=True, n=2)
  out = sampler.generate(tiny_params, tokens, lengths, jax.random.key(0))
  full = jax.jit(_full_logits, static_argnums=0)
  for p in range(3):
    seq = list(tokens[p, LP - lengths[p]:])
    for _ in range(T):
      x = jnp.asarray([seq], jnp.int32)
      logits = full(tiny_policy, tiny_params, x, jnp.ones_like(x, bool))
      seq.append(int(jnp.argmax(logits[0, -1])))
    want = np.asarray(seq[lengths[p]:])
    for g in range(2):
      np.testing.assert_array_equal(np.asarray(out.tokens[p, g]), want)
  assert not np.asarray(out.stopped).any()
  assert (np.asarray(out.lengths) == T).all()


def test_shared_prefix_equals_repeated_cache(tiny_cfg):
  rng = np.random.default_rng(1)
  p, g, lp, t, k, h, n = 2, 3, 6, 5, 2, 8, 4
  prefix_k = jnp.asarray(rng.normal(size=(p, lp, k, h)), jnp.float32)
  prefix_v = jnp.asarray(rng.normal(size=(p, lp, k, h)), jnp.float32)
  suffix_k = jnp.asarray(rng.normal(size=(p, g, t, k, h)), jnp.float32)
  suffix_v = jnp.asarray(rng.normal(size=(p, g, t, k, h)), jnp.float32)
  valid = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6], bool)
  q = jnp.asarray(rng.normal(size=(p * g, 1, n, h)), jnp.float32)
  new_k = jnp.asarray(rng.normal(size=(p * g, 1, k, h)), jnp.float32)
  new_v = jnp.asarray(rng.normal(size=(p * g, 1, k, h)), jnp.float32)
  step = 3
  layout = SharedPrefixAttention
  out, (_, _, sk, sv) = SharedPrefixAttention(valid, jnp.int32(step))(
      q, new_k, new_v, (*layout.prefix_layout(prefix_k, prefix_v),
                        *suffix_layout.to_suffix_layout(suffix_k, suffix_v)))
  sk, sv = suffix_layout.from_suffix_layout(sk, sv, p)
  # Reference: every rollout gets its own copy of the prompt's cache.
  rep = lambda x: jnp.repeat(x, g, axis=0)  # noqa: E731
  keys = jnp.concatenate([rep(prefix_k), sk.reshape(p * g, t, k, h)], 1)
  vals = jnp.concatenate([rep(prefix_v), sv.reshape(p * g, t, k, h)], 1)
  mask = jnp.concatenate([rep(valid), jnp.broadcast_to(
      jnp.arange(t) <= step, (p * g, t))], 1)[:, None, :]
  ref, _ = cached_attention.attend_lse(q, keys, vals, mask)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(sk[:, :, step].reshape(p * g, k, h),
                                new_k[:, 0])


def test_logprobs_match_full_forward(tiny_policy, tiny_params):
  rng = np.random.default_rng(2)
  tokens, lengths = _prompts(rng, [10, 5], tiny_policy.cfg.vocab_size)
  temp = 0.7
  sampler = _sampler(tiny_policy, stop_ids=(10_000,), n=3, temperature=temp)
  out = sampler.generate(tiny_params, tokens, lengths, jax.random.key(3))
  seqs = np.concatenate([np.repeat(tokens, 3, 0),
                         np.asarray(out.tokens).reshape(6, T)], axis=1)
  valid = np.concatenate([np.repeat(np.arange(LP)[None] >= LP - lengths[:,
                                    None], 3, 0), np.ones((6, T), bool)], 1)
  logits = _full_logits(tiny_policy, tiny_params, jnp.asarray(seqs),
                        jnp.asarray(valid))
  logp = jax.nn.log_softmax(logits / temp, -1)[:, LP - 1:-1]
  want = np.take_along_axis(np.asarray(logp), seqs[:, LP:, None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs).reshape(6, T), want,
                             atol=1e-4, rtol=1e-4)
  # First-token distribution: softmax of the same temperature-scaled logits.
  first = np.asarray(jax.nn.softmax(logits[::3, LP - 1] / temp, -1))
  np.testing.assert_allclose(np.asarray(out.first_probs), first, atol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.6),
                                         (8, 0.8)])
def test_first_token_distribution_chi_square(tiny_policy, tiny_params, top_k,
                                             top_p):
  scipy_stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(4)
  tokens, lengths = _prompts(rng, [6], tiny_policy.cfg.vocab_size)
  temp, n = 0.5, 4096
  sampler = _sampler(tiny_policy, stop_ids=(10_000,), n=n, temperature=temp,
                     top_k=top_k, top_p=top_p, max_new_tokens=1)
  out = sampler.generate(tiny_params, tokens, lengths, jax.random.key(5))
  probs = np.asarray(out.first_probs[0], np.float64)
  order = np.argsort(-probs)
  keep = np.zeros_like(probs, bool)
  cand = order[:top_k] if top_k else order
  mass = np.cumsum(probs[cand] / probs[cand].sum())
  nucleus = cand[:np.searchsorted(mass, top_p) + 1] if top_p < 1 else cand
  keep[nucleus] = True
  expected = np.where(keep, probs, 0) / probs[keep].sum()
  counts = np.bincount(np.asarray(out.tokens[0, :, 0]), minlength=len(probs))
  assert counts[~keep].sum() == 0, "sampled a token outside top-k/top-p"
  # Pool rare tokens so every expected count is >= 5.
  big = expected * n >= 5
  obs = np.append(counts[big], counts[~big & keep].sum())
  exp = np.append(expected[big], expected[~big & keep].sum()) * n
  obs, exp = obs[exp > 0], exp[exp > 0]
  _, pvalue = scipy_stats.chisquare(obs, exp)
  assert pvalue > 1e-3, (pvalue, obs, exp)


def test_stop_tokens_end_rows(tiny_policy, tiny_params):
  rng = np.random.default_rng(6)
  tokens, lengths = _prompts(rng, [10, 3], tiny_policy.cfg.vocab_size)
  # Greedy continuation, then declare two of its tokens stop tokens.
  free = _sampler(tiny_policy, stop_ids=(10_000,), greedy=True, n=1)
  cont = np.asarray(free.generate(tiny_params, tokens, lengths,
                                  jax.random.key(0)).tokens[:, 0])
  stops = (int(cont[0, 2]), int(cont[1, 5]))
  sampler = _sampler(tiny_policy, stop_ids=stops, greedy=True, n=1)
  out = sampler.generate(tiny_params, tokens, lengths, jax.random.key(0))
  toks, lens = np.asarray(out.tokens[:, 0]), np.asarray(out.lengths[:, 0])
  for p in range(2):
    first_stop = min(i for i in range(T) if cont[p, i] in stops)
    assert lens[p] == first_stop + 1
    np.testing.assert_array_equal(toks[p, :lens[p]], cont[p, :lens[p]])
    assert (toks[p, lens[p]:] == 0).all()
    assert (np.asarray(out.logprobs[p, 0, lens[p]:]) == 0).all()
  assert np.asarray(out.stopped).all()


def test_mesh_independent_draws(tiny_policy, tiny_params):
  rng = np.random.default_rng(7)
  tokens, lengths = _prompts(rng, [10, 6, 3, 9], tiny_policy.cfg.vocab_size)
  ref_s = _sampler(tiny_policy, stop_ids=(10_000,), n=4, temperature=1.0)
  ref = ref_s.generate(tiny_params, tokens, lengths, jax.random.key(9))
  ref_g = _sampler(tiny_policy, stop_ids=(10_000,), n=4, greedy=True
                   ).generate(tiny_params, tokens, lengths, jax.random.key(9))
  for shape in [(8, 1, 1), (2, 2, 2), (4, 1, 2)]:
    rules = MeshRules(make_mesh(shape), SAMPLE_RULES)
    params = reshard(tiny_params, tiny_policy.shardings(rules))
    for greedy, want in [(False, ref), (True, ref_g)]:
      s = _sampler(tiny_policy, stop_ids=(10_000,), n=4, mesh_rules=rules,
                   temperature=1.0, greedy=greedy)
      got = s.generate(params, tokens, lengths, jax.random.key(9))
      np.testing.assert_array_equal(np.asarray(got.tokens),
                                    np.asarray(want.tokens))
      np.testing.assert_allclose(np.asarray(got.logprobs),
                                 np.asarray(want.logprobs), atol=1e-5)


def test_batch_composition_and_chunking_do_not_matter(tiny_policy,
                                                      tiny_params):
  rng = np.random.default_rng(8)
  tokens, lengths = _prompts(rng, [10, 2, 7], tiny_policy.cfg.vocab_size)
  together = _sampler(tiny_policy, stop_ids=(10_000,), greedy=True, n=2
                      ).generate(tiny_params, tokens, lengths,
                                 jax.random.key(0))
  for p in range(3):
    alone = _sampler(tiny_policy, stop_ids=(10_000,), greedy=True, n=2
                     ).generate(tiny_params, tokens[p:p + 1],
                                lengths[p:p + 1], jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(alone.tokens[0]),
                                  np.asarray(together.tokens[p]))
  # Sampling: chunked decoding (1 prompt x 2 rollouts a chunk) draws the same.
  full = _sampler(tiny_policy, stop_ids=(10_000,), n=4)
  chunked = _sampler(tiny_policy, stop_ids=(10_000,), n=4, max_decode_rows=2)
  a = full.generate(tiny_params, tokens, lengths, jax.random.key(1))
  b = chunked.generate(tiny_params, tokens, lengths, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_early_stop_and_straggler_accounting(tiny_policy, tiny_params):
  rng = np.random.default_rng(9)
  tokens, lengths = _prompts(rng, [8], tiny_policy.cfg.vocab_size)
  free = _sampler(tiny_policy, stop_ids=(10_000,), greedy=True, n=1)
  cont = np.asarray(free.generate(tiny_params, tokens, lengths,
                                  jax.random.key(0)).tokens[0, 0])
  s = _sampler(tiny_policy, stop_ids=(int(cont[1]),), greedy=True, n=2)
  out = s.generate(tiny_params, tokens, lengths, jax.random.key(0))
  assert np.asarray(out.lengths).tolist() == [[2, 2]]
  # Both rows end at step 1: the loop stops there, no finished-row slots.
  assert int(out.total_slots) == 2 and int(out.finished_slots) == 0
  s = _sampler(tiny_policy, stop_ids=(int(cont[1]),), greedy=True, n=2,
               early_stop=False)
  out = s.generate(tiny_params, tokens, lengths, jax.random.key(0))
  assert int(out.total_slots) == 2 * (T - 1)
  assert int(out.finished_slots) == 2 * (T - 2)


def test_bad_input_errors(tiny_policy, tiny_params):
  with pytest.raises(ConfigError, match="rollout.n"):
    SamplerConfig(n=0)
  with pytest.raises(ConfigError, match="rollout.temperature"):
    SamplerConfig(temperature=-1.0)
  with pytest.raises(ConfigError, match="rollout.top_p"):
    SamplerConfig(top_p=0.0)
  with pytest.raises(ConfigError, match="rollout.top_k"):
    SamplerConfig(top_k=-2)
  with pytest.raises(ConfigError, match="eval.top_p"):
    SamplerConfig(top_p=1.5, section="eval")
  s = _sampler(tiny_policy)
  tokens = np.ones((3, LP), np.int32)
  with pytest.raises(ValueError, match="prompt 1 has 11 tokens"):
    s.generate(tiny_params, tokens, np.array([3, 11, 2]), jax.random.key(0))
  with pytest.raises(ValueError, match="left-padded to rollout.max_prompt_len"):
    s.generate(tiny_params, np.ones((3, LP + 2), np.int32),
               np.array([3, 3, 2]), jax.random.key(0))


def test_remat_policy_decodes(tiny_cfg, tiny_params):
  """Training configs enable remat; the sampler decodes without it."""
  from brorl_jax.model.transformer import Policy
  policy = Policy.create(tiny_cfg.replace(remat=True))
  rng = np.random.default_rng(10)
  tokens, lengths = _prompts(rng, [5, 9], tiny_cfg.vocab_size)
  out = _sampler(policy, stop_ids=(10_000,), greedy=True, n=2).generate(
      tiny_params, tokens, lengths, jax.random.key(0))
  ref = _sampler(Policy.create(tiny_cfg), stop_ids=(10_000,), greedy=True,
                 n=2).generate(tiny_params, tokens, lengths,
                               jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))


def test_inverse_cdf_draws_follow_the_weights():
  scipy_stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(5)
  # 600 entries: three blocks of 256 (the last one padded), a third zero.
  w = rng.random(600).astype(np.float32)
  w[rng.random(600) < 0.33] = 0.0
  n = 200_000
  u = jax.random.uniform(jax.random.key(6), (n,))
  idx = np.asarray(jax.jit(sampling.inverse_cdf)(
      jnp.broadcast_to(jnp.asarray(w), (n, 600)), u))
  counts = np.bincount(idx, minlength=600)
  assert counts[w == 0].sum() == 0
  p = w[w > 0] / w.sum()
  chi2 = ((counts[w > 0] - n * p) ** 2 / (n * p)).sum()
  assert scipy_stats.chi2.sf(chi2, (w > 0).sum() - 1) > 1e-3
  # A target at the very end of the mass, or rounding past it, never lands
  # on a zero-weight entry or the block padding.
  edge = np.zeros((3, 600), np.float32)
  edge[0, 5] = edge[1, 599] = 1.0
  edge[2, 300] = 1e-30
  got = sampling.inverse_cdf(jnp.asarray(edge),
                             jnp.asarray([1 - 2**-24] * 2 + [0.0]))
  np.testing.assert_array_equal(np.asarray(got), [5, 599, 300])
