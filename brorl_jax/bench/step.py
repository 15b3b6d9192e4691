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
    slower than the full-scores attention).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from brorl_jax import cli, run_config
from brorl_jax.train import Preemption, Trainer


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


class _Run:
  """A Trainer driven one iteration at a time."""

  def __init__(self, config_path: str, workdir: pathlib.Path, overrides):
    cli.add_config_root(["--config", config_path])  # its `from configs ...`
    spec = importlib.util.spec_from_file_location("bench_config",
                                                  config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for key, value in overrides.items():
      node = c
      *parents, last = key.split(".")
      for p in parents:
        node = node[p]
      node[last] = value
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
  print(f"diagnostics overhead (diagnostics.every = {cfg.diagnostics.every},"
        f" mean of {args.steps} steps): "
        f"{100 * results['diag_overhead']:+.1f}% of the step")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
  return results
