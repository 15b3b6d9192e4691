"""The supervised warm start: row layout, counts, loss, learning, errors."""

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from brorl_jax import run_config
from brorl_jax import warmstart
from brorl_jax.loop import evaluator as evaluator_lib
from brorl_jax.loop import experiment
from brorl_jax.config import ConfigError
from brorl_jax.data.prompts import DataConfig, PromptPipeline
from brorl_jax.model import attention as attn_lib
from brorl_jax.model.sharding import reshard
from brorl_jax.model.transformer import positions_from_valid


def tiny_config(**sections) -> ml_collections.ConfigDict:
  """A tiny arithmetic run: 200 training and 14 held-out prompts."""
  c = {
      "seed": 0,
      "model": {"preset": "tiny", "dtype": "float32", "remat": False},
      "data": {"synthetic": {"task": "arithmetic", "train": 200, "eval": 14,
                             "difficulty": [1]},
               "instruction": ""},
      "rollout": {"prompts_per_step": 8, "n": 4, "max_prompt_len": 64,
                  "max_new_tokens": 24},
      "rewards": {"num_workers": 1},
      "eval": {"n": 4, "k": (1, 2, 4)},
      "init": {"tokenizer_vocab_size": 350},
  }
  c.update(sections)
  return ml_collections.ConfigDict(c)


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
  cfg = run_config.load(tiny_config())
  return experiment.build(cfg, tmp_path_factory.mktemp("warm"))


def test_config_validation():
  with pytest.raises(ConfigError, match="'warmstart.steps'"):
    warmstart.WarmstartConfig(steps=-1)
  with pytest.raises(ConfigError, match="'warmstart.max_solution_len'"):
    warmstart.WarmstartConfig(max_solution_len=1)
  with pytest.raises(ConfigError, match="'warmstart.schedule'"):
    warmstart.WarmstartConfig(schedule="linear")
  with pytest.raises(ConfigError, match="'warmstart.seed'"):
    warmstart.WarmstartConfig(seed=-1)
  with pytest.raises(ConfigError, match="'warmstart.lr'"):
    run_config.load(tiny_config(warmstart={"steps": 3, "lr": 1e-3}))
  cfg = run_config.load(tiny_config(warmstart={"steps": 3, "batch_size": 4}))
  assert cfg.warmstart == warmstart.WarmstartConfig(steps=3, batch_size=4)


def test_pack_rows_layout():
  ex = warmstart.SolutionSet(
      prompts=[np.array([11, 12]), np.array([21, 22, 23])],
      solutions=[np.array([5, 6, 3]), np.array([7, 3])],
      files=(), counts={})
  rows = warmstart.pack_rows(ex, np.array([0, 1, -1]), prompt_len=3,
                             solution_len=3, pad_id=0)
  # prompt (left-padded to 3) ++ response[:-1], the response right-padded
  # to 3, as rl.batch.make_rows lays out rollouts; row 1's eos is an input
  # whose own prediction (of padding) is masked out of the loss.
  np.testing.assert_array_equal(rows["inputs"], [[0, 11, 12, 5, 6],
                                                 [21, 22, 23, 7, 3],
                                                 [0, 11, 12, 5, 6]])
  np.testing.assert_array_equal(rows["valid"], [[0, 1, 1, 1, 1],
                                                [1, 1, 1, 1, 1],
                                                [0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(rows["targets"], [[5, 6, 3], [7, 3, 0],
                                                  [5, 6, 3]])
  # The filler row (-1) copies example 0 but counts for nothing.
  np.testing.assert_array_equal(rows["mask"], [[1, 1, 1], [1, 1, 0],
                                               [0, 0, 0]])


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_solution_examples_tokenize_like_rl_and_count_skips(exp, tmp_path):
  rows = [
      {"prompt": "What is 1 + 2?", "answer": "3", "verifier": "math",
       "meta": {"solution": "1 + 2 = 3. \\boxed{3}"}},
      {"prompt": "What is 2 + 2?", "answer": "4", "verifier": "math"},
      {"prompt": "What is 3 + 2?", "answer": "5", "verifier": "math",
       "meta": {"solution": "3 + 2 = 5. " * 20 + "\\boxed{5}"}},
      {"prompt": "What is 9 " + "+ 1 " * 40 + "?", "answer": "49",
       "verifier": "math", "meta": {"solution": "\\boxed{49}"}},
  ]
  path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
  pipeline = PromptPipeline(
      DataConfig(train_files=(str(path),), instruction=" Box it."),
      exp.tokenizer, max_prompt_len=40, prompts_per_step=1)
  ex = warmstart.solution_examples(pipeline, "train", max_solution_len=40)
  assert ex.counts == {"records": 4, "no_solution": 1, "long_prompt": 1,
                       "long_solution": 1, "kept": 1}
  assert ex.files == (str(path),)
  tok = exp.tokenizer
  want = tok.encode(tok.apply_chat_template(
      [{"role": "user", "content": "What is 1 + 2? Box it."}]))
  np.testing.assert_array_equal(ex.prompts[0], want)
  np.testing.assert_array_equal(
      ex.solutions[0], tok.encode("1 + 2 = 3. \\boxed{3}") + [tok.eos_id])


def _full_forward_ce(exp, params, examples):
  """Mean -log p of solution tokens with full [B, L, V] logits (reference)."""
  policy = exp.policy

  @jax.jit
  def token_nll(params, tokens):
    valid = jnp.ones(tokens.shape, bool)
    model = policy.bind(params)
    hidden, _ = model(tokens, positions_from_valid(valid),
                      attn_lib.FullAttention(valid))
    logp = jax.nn.log_softmax(model.logits(hidden), -1)
    return -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]

  total, count = 0.0, 0
  for p, s in zip(examples.prompts, examples.solutions):
    seq = jnp.asarray(np.concatenate([p, s])[None], jnp.int32)
    nll = np.asarray(token_nll(params, seq))[0]
    total += nll[len(p) - 1:].sum()       # positions predicting the solution
    count += len(s)
  return total / count


def _greedy_pass1(exp, pool, params):
  ev = evaluator_lib.Evaluator(exp, pool, greedy=True)
  sampling = reshard(params, exp.param_shardings(sampling=True))
  return ev.evaluate(sampling, 0, evaluator_lib.eval_key(0))["eval/pass@1"]


@pytest.mark.slow  # ~25 s on 2 shared cores
def test_warm_start_lowers_heldout_loss_and_raises_pass1(exp):
  params = exp.initial_params()
  cfg = warmstart.WarmstartConfig(steps=300, batch_size=32,
                                  learning_rate=3e-3, warmup_steps=20,
                                  log_every=100, eval_every=150)
  logged = []
  with exp.reward_pool() as pool:
    before = _greedy_pass1(exp, pool, params)
    t0 = time.perf_counter()
    new, metrics = warmstart.run_warmstart(
        exp, params, cfg, log_fn=lambda step, m: logged.append((step, m)))
    seconds = time.perf_counter() - t0
    after = _greedy_pass1(exp, pool, new)
  print(f"warm start: held-out CE "
        f"{metrics['warmstart/heldout_loss_before']:.3f} -> "
        f"{metrics['warmstart/heldout_loss_after']:.3f}, greedy pass@1 "
        f"{before:.3f} -> {after:.3f}, {seconds:.1f} s")
  # The loss is the cross-entropy a plain full forward gives.
  heldout = warmstart.solution_examples(exp.pipeline(), "eval",
                                        max_solution_len=128)
  assert metrics["warmstart/heldout_loss_before"] == pytest.approx(
      _full_forward_ce(exp, params, heldout), rel=1e-4)
  assert metrics["warmstart/heldout_loss_after"] == pytest.approx(
      _full_forward_ce(exp, new, heldout), rel=1e-4)
  assert metrics["warmstart/heldout_loss_after"] < (
      0.2 * metrics["warmstart/heldout_loss_before"])
  assert metrics["warmstart/loss"] < 0.5
  # 14 held-out prompts: pass@1 moves by 1/14 with the attention's summation
  # order (3/14 with the reference backend, 2/14 with blockwise, at the same
  # held-out loss 0.31); the loss bars above carry the check.
  assert before == 0.0 and after >= 2 / 14 - 1e-9
  assert metrics["warmstart/examples"] == 200
  assert metrics["warmstart/skipped_updates"] == 0
  assert [s for s, _ in logged] == [100, 150, 200, 300]
  assert set(logged[0][1]) == {"warmstart/loss", "warmstart/grad_norm",
                               "warmstart/lr"}
  assert set(logged[1][1]) == {"warmstart/heldout_loss"}
  # The caller's parameters are not consumed.
  assert np.isfinite(np.asarray(jax.tree.leaves(params)[0])).all()


def test_deterministic_and_off(exp):
  params = exp.initial_params()
  cfg = warmstart.WarmstartConfig(steps=3, batch_size=8, log_every=3)
  a, ma = warmstart.run_warmstart(exp, params, cfg)
  b, mb = warmstart.run_warmstart(exp, params, cfg)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert ma["warmstart/loss"] == mb["warmstart/loss"]
  assert not np.array_equal(np.asarray(jax.tree.leaves(a)[0]),
                            np.asarray(jax.tree.leaves(params)[0]))
  # The result is in the training layout.
  assert jax.tree.leaves(a)[0].sharding == jax.tree.leaves(
      exp.param_shardings())[0]
  same, metrics = warmstart.run_warmstart(
      exp, params, warmstart.WarmstartConfig(steps=0))
  assert same is params and metrics == {}


def test_warmstart_seed_fixes_the_base_model(tmp_path):
  """With `warmstart.seed` set, runs that differ in `seed` warm-start the
  same model (initialization and example order); unset, they do not."""
  def warm(seed, ws_seed):
    ws = {"steps": 2, "batch_size": 8, "log_every": 2}
    if ws_seed is not None:
      ws["seed"] = ws_seed
    e = experiment.build(run_config.load(tiny_config(seed=seed, warmstart=ws)),
                         tmp_path / f"{seed}_{ws_seed}")
    init = e.initial_params()
    out, _ = warmstart.run_warmstart(e, init, e.cfg.warmstart)
    return [np.asarray(x) for x in jax.tree.leaves((init, out))]

  fixed_a, fixed_b = warm(0, 7), warm(1, 7)
  for x, y in zip(fixed_a, fixed_b):
    np.testing.assert_array_equal(x, y)
  free_a, free_b = warm(0, None), warm(1, None)
  assert not all(np.array_equal(x, y) for x, y in zip(free_a, free_b))
  # Unset, the warm start takes the run's seed: seed 7 twice is the same run.
  for x, y in zip(warm(7, None), fixed_a):
    np.testing.assert_array_equal(x, y)


def test_records_without_solutions_give_a_clear_error(tmp_path):
  rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1),
           "verifier": "math"} for i in range(50)]
  path = _write_jsonl(tmp_path / "plain.jsonl", rows)
  cfg = run_config.load(tiny_config(
      data={"train_files": (str(path),), "instruction": ""},
      init={"tokenizer_vocab_size": 300}))
  exp = experiment.build(cfg, tmp_path / "run")
  with pytest.raises(warmstart.WarmstartError) as e:
    warmstart.run_warmstart(exp, exp.initial_params(),
                            warmstart.WarmstartConfig(steps=5))
  msg = str(e.value)
  assert str(path) in msg and "meta.solution" in msg
  assert "warmstart.steps=0" in msg and "50 training records" in msg


def test_should_stop_abandons_the_warm_start_between_steps(exp):
  logged = []                     # warm-start steps done
  out = warmstart.run_warmstart(
      exp, exp.initial_params(),
      warmstart.WarmstartConfig(steps=1000, batch_size=8, log_every=1),
      log_fn=lambda step, m: logged.append(step),
      should_stop=lambda: len(logged) >= 2)   # SIGTERM after step 2
  assert out is None
  assert logged == [1, 2]         # abandoned before step 3
