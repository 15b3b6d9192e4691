"""RL step benchmark: `python -m brorl_jax.bench step [--json PATH]`.

Runs the demo config's RL iterations (warm start and evaluation off, a
fresh model, dynamic sampling off: a fresh model solves nothing, and the
update skips the micro-batches of dropped groups, so with it on there would
be no update to time) and reports, from the same run:
  * time per phase (sample, score wait, update, diagnostics) and tokens/s;
  * the update's achieved FLOP/s (its model FLOPs, counted as in MFU
    accounting: 6 x matmul parameters x tokens + attention, over its
    measured time; XLA's cost analysis counts a scan body once, so it cannot
    be used for the micro-batch loop) against a 1024^3 f32 matmul measured
    in the same process -> `update_flops_ratio`;
  * the diagnostics' cost at the config's `diagnostics.every`: mean step
    time against the same iterations with `diagnostics.every = 0`
    (interleaved with the diagnostics-on run) -> `diag_overhead`;
  * the update's time with the configured `model.attention_backend` over
    the same iterations with `reference` (full `[T, T]` scores), both with
    diagnostics off and interleaved -> `update_backend_ratio` (<= 1: no
    slower than the full-scores attention);
  * the update's length buckets (`algo.length_buckets`): one update of the
    demo model on 64 rows of up to 512 response tokens whose lengths are
    seeded and long-tailed (mean a quarter of 512, four at 512), with the
    default buckets over the same rows all at 512 (one bucket), interleaved
    -> `update_trim_ratio` (issue 19's bar: <= 0.5), with both compiled
    updates' temporary bytes (the buckets share one program: its peak is the
    largest bucket's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import tempfile
import time

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from brorl_jax import cli, run_config
from brorl_jax.rl import update as update_lib
from brorl_jax.rl.batch import RolloutBatch
from brorl_jax.rl.train_state import TrainState
from brorl_jax.loop.trainer import Preemption, Trainer

# The length-bucket case: [P, G] rows of up to TRIM_T response tokens.
TRIM_P, TRIM_G, TRIM_T, TRIM_MICRO = 8, 8, 512, 8


def _flops(trainer) -> float:
  """Model FLOPs of one update (forward + backward, every padded position).

  Per token: 6 x the matmul parameters (q/k/v/o, MLP, unembedding; the
  embedding lookup is not a matmul) plus 12 x layers x heads x head dim x
  keys for attention (scores and values, forward and backward, over the full
  masked length as executed); a reference forward adds its forward share.
  """
  m = trainer.exp.model_cfg
  c = trainer.cfg
  d, h = m.embed_dim, m.head_dim
  matmul = m.num_layers * (d * h * (m.num_heads + 2 * m.num_kv_heads)
                           + m.num_heads * h * d + 3 * d * m.mlp_dim)
  matmul += d * m.vocab_size
  seq = c.rollout.max_prompt_len + c.rollout.max_new_tokens - 1
  rows = c.loop.prompts_per_step * c.rollout.n
  per_token = 6 * matmul + 12 * m.num_layers * m.num_heads * h * seq
  if c.loss.kl_coef > 0:
    per_token += 2 * matmul + 4 * m.num_layers * m.num_heads * h * seq
  return float(per_token * seq * rows)


def _matmul_flops_per_s(reps: int = 20) -> float:
  a = jnp.ones((1024, 1024), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  for _ in range(3):
    f(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * 1024**3 / statistics.median(times)


def _long_tailed_batch(vocab: int, prompt_len: int) -> RolloutBatch:
  """Seeded rows: exponential response lengths, a few at TRIM_T, mean
  about TRIM_T / 4 (RL's long tail: most responses short, some truncated)."""
  rng = np.random.default_rng(0)
  p, g, t = TRIM_P, TRIM_G, TRIM_T
  rows = p * g
  at_max = rows // 16
  # The other rows' exponential mean makes the overall mean ~ t / 4.
  scale = (rows * t / 4 - at_max * t) / (rows - at_max)
  lengths = np.minimum(np.ceil(rng.exponential(scale, rows)), t)
  lengths[rng.choice(rows, at_max, replace=False)] = t
  return RolloutBatch(
      prompt_tokens=jnp.asarray(rng.integers(3, vocab, (p, prompt_len)),
                                jnp.int32),
      prompt_lengths=jnp.full((p,), prompt_len, jnp.int32),
      tokens=jnp.asarray(rng.integers(3, vocab, (p, g, t)), jnp.int32),
      logprobs=jnp.asarray(-rng.uniform(1, 7, (p, g, t)), jnp.float32),
      lengths=jnp.asarray(lengths.reshape(p, g), jnp.int32),
      advantages=jnp.asarray(rng.normal(size=(p, g)), jnp.float32),
      mask=jnp.ones((p, g), bool))


def _update_trim(trainer, reps: int) -> dict:
  """The update with the default length buckets over the same rows padded
  to TRIM_T (one bucket): times interleaved, temporaries compiled."""
  cfg = trainer.cfg
  batch = _long_tailed_batch(trainer.exp.model_cfg.vocab_size,
                             cfg.rollout.max_prompt_len)
  params = trainer.policy.init(jax.random.key(0))
  state = TrainState.create(params, trainer.optimizer,
                            with_reference=cfg.loss.kl_coef > 0)
  arms = {}
  for name, n in (("trimmed", update_lib.UpdateConfig().length_buckets),
                  ("padded", 1)):
    ucfg = dataclasses.replace(cfg.update, num_minibatches=1,
                               micro_batch_size=TRIM_MICRO, length_buckets=n)
    fn = jax.jit(update_lib.make_update_fn(
        trainer.policy, ucfg, cfg.loss, trainer.optimizer,
        temperature=cfg.rollout.logprob_temperature))
    arms[name] = fn.lower(state, batch, jax.random.key(0)).compile()
  temp = {k: int(f.memory_analysis().temp_size_in_bytes)
          for k, f in arms.items()}
  times = {k: [] for k in arms}
  for i in range(reps + 1):                  # the first is a warm-up
    for name, fn in arms.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, batch, jax.random.key(i)))
      if i:
        times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"update_trim_ratio": med["trimmed"] / med["padded"],
          "update_trim": {
              "seconds": med, "temp_bytes": temp,
              "rows": TRIM_P * TRIM_G, "max_new_tokens": TRIM_T,
              "micro_batch_size": TRIM_MICRO,
              "mean_response_len": float(batch.lengths.mean()),
              "rows_at_max": int((batch.lengths == TRIM_T).sum()),
              "length_buckets": update_lib.UpdateConfig().length_buckets,
              "timed_calls": reps}}


class _Run:
  """A Trainer driven one iteration at a time."""

  def __init__(self, config_path: str, workdir: pathlib.Path, overrides):
    cli.add_config_root(["--config", config_path])  # its `from configs ...`
    spec = importlib.util.spec_from_file_location("bench_config",
                                                  config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = cli.set_keys(module.get_config(), overrides)
    self.trainer = Trainer(run_config.load(c), workdir)
    self.preempt = Preemption()
    self.state, self.iter, self.meta = self.trainer.init_state(self.preempt)
    self.step = 0

  def iterate(self) -> dict:
    out = self.trainer.iteration(self.state, next(self.iter), self.step,
                                 self.meta, self.preempt)
    self.state, metrics = out
    self.step += 1
    return metrics

  def close(self):
    self.preempt.restore()
    self.trainer.pool.close()
    self.trainer.checkpointer.close()
    self.trainer.writer.close()


def main(argv: list[str]) -> dict:
  parser = argparse.ArgumentParser(prog="python -m brorl_jax.bench step")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--config", default="configs/demo_cpu.py")
  parser.add_argument("--steps", type=int, default=8,
                      help="timed iterations per arm (after 2 warm-up ones)")
  parser.add_argument("--trim_reps", type=int, default=2,
                      help="timed updates per arm of update_trim_ratio")
  args = parser.parse_args(argv)
  base = {"warmstart.steps": 0, "logging.progress": "off",
          "logging.tensorboard": False, "logging.archive_rollouts": False,
          "data.synthetic.eval": 0,
          "algo.advantage.dynamic_sampling": False}
  results: dict = {"config": args.config, "device": jax.devices()[0].platform}
  with tempfile.TemporaryDirectory() as tmp:
    on = _Run(args.config, pathlib.Path(tmp) / "on", base)
    off = _Run(args.config, pathlib.Path(tmp) / "off",
               {**base, "diagnostics.every": 0})
    # The same steps with the full-scores attention (`reference`): the
    # configured backend's update time against it.
    ref = _Run(args.config, pathlib.Path(tmp) / "ref",
               {**base, "diagnostics.every": 0,
                "model.attention_backend": "reference"})
    runs = (on, off, ref)
    for _ in range(2):                       # compile, warm up
      for r in runs:
        r.iterate()
    rows_on, rows_off, rows_ref = [], [], []
    for _ in range(args.steps):              # interleaved: same load
      for r, rows in zip(runs, (rows_on, rows_off, rows_ref)):
        rows.append(r.iterate())
    update_flops = _flops(on.trainer)
    trim = _update_trim(off.trainer, args.trim_reps)
    cfg = on.trainer.cfg
    backend = on.trainer.sampler.decode_backend   # 'auto' resolved
    for r in runs:
      r.close()

  def med(rows, key):
    return statistics.median(r[key] for r in rows)

  def mean(rows, key):
    return statistics.fmean(r[key] for r in rows)

  phases = {k: med(rows_on, f"time/{k}") for k in
            ("sample_s", "score_s", "update_s", "diag_s", "step_s")}
  matmul = _matmul_flops_per_s()
  achieved = update_flops / phases["update_s"]
  results.update({
      "phases_s": phases,
      # Realized diagnostics run every `diagnostics.every` steps: their cost
      # is a mean over the steps, not a median.
      "mean_step_s": mean(rows_on, "time/step_s"),
      "mean_step_s_without_diagnostics": mean(rows_off, "time/step_s"),
      "generated_tokens_per_step": med(rows_on, "rollout/generated_tokens"),
      "sample_tokens_per_s": med(rows_on, "throughput/tokens_per_s"),
      "step_tokens_per_s": med(rows_on, "rollout/generated_tokens")
      / phases["step_s"],
      "update_flops": update_flops,
      "update_flops_per_s": achieved,
      "matmul_flops_per_s": matmul,
      "update_flops_ratio": achieved / matmul,
      "settings": {"prompts_per_step": cfg.loop.prompts_per_step,
                   "n": cfg.rollout.n,
                   "max_new_tokens": cfg.rollout.max_new_tokens,
                   "diagnostics_every": cfg.diagnostics.every,
                   "timed_steps": args.steps},
  })
  results["update_backend_ratio"] = (med(rows_off, "time/update_s") /
                                     med(rows_ref, "time/update_s"))
  results["update_backend"] = backend
  results.update(trim)
  results["diag_overhead"] = (results["mean_step_s"] /
                              results["mean_step_s_without_diagnostics"] - 1.0)
  print(f"per phase (median of {args.steps} steps): " + ", ".join(
      f"{k} {v:.3f}" for k, v in phases.items()))
  print(f"tokens/s: sampling {results['sample_tokens_per_s']:.0f}, whole "
        f"step {results['step_tokens_per_s']:.0f}")
  print(f"update: {update_flops / 1e9:.1f} GFLOP in {phases['update_s']:.3f}"
        f" s = {achieved / 1e9:.1f} GFLOP/s vs matmul {matmul / 1e9:.1f} "
        f"GFLOP/s -> ratio {results['update_flops_ratio']:.2f}")
  print(f"update time, attention backend {backend!r} over 'reference': "
        f"{results['update_backend_ratio']:.2f}")
  print(f"update with length buckets over the same rows at "
        f"{TRIM_T} tokens: {results['update_trim_ratio']:.2f} (mean response "
        f"{trim['update_trim']['mean_response_len']:.0f} tokens)")
  print(f"diagnostics overhead (diagnostics.every = {cfg.diagnostics.every},"
        f" mean of {args.steps} steps): "
        f"{100 * results['diag_overhead']:+.1f}% of the step")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
  return results
