"""Attention backend benchmark: `python -m brorl_jax.bench attention`.

For the config's model (the demo's by default), one update micro-batch's
forward + backward (the update's `response_logprobs`, chunked over the
vocabulary, and its gradient with respect to the parameters):
  * compiled temporary bytes (`memory_analysis()`, nothing is run) of 1 row
    at T = 1024 and T = 8192 for each CPU-runnable backend, and their ratio
    `mem_ratio_8k_1k` for the platform's default backend (linear growth
    reads ~8, full [T, T] scores ~64);
  * forward + backward time per token of `blockwise` against `reference`,
    measured in this process, interleaved (same load), at 8 rows x 1024,
    1 row x 4096 and the config's own micro-batch (rows x row length)
    -> `speedup_vs_reference` (> 1: blockwise is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from brorl_jax import cli, run_config
from brorl_jax.model.attention_kernels import resolve_attention_backend
from brorl_jax.model.transformer import Policy
from brorl_jax.rl.logprobs import response_logprobs

# Backends whose compiled program runs on a CPU host (the Pallas kernels
# only in interpret mode, far too slow to size at 8k; cuDNN needs a GPU).
CPU_BACKENDS = ("reference", "blockwise")
MEM_LENGTHS = (1024, 8192)


def _load(path: str):
  cli.add_config_root(["--config", path])  # its `from configs ...`
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return run_config.load(module.get_config())


def _grad_fn(model_cfg, update_cfg, backend: str):
  """jitted (params, rows) -> d(sum of response log-probs)/d params."""
  policy = Policy.create(model_cfg.replace(attention_backend=backend))

  def loss(params, inputs, valid, targets):
    logp, _ = response_logprobs(
        policy, params, inputs, valid, targets, temperature=1.0,
        vocab_chunk=update_cfg.vocab_chunk, seq_chunk=update_cfg.seq_chunk,
        with_entropy=False)
    return logp.sum()

  return policy, jax.jit(jax.grad(loss))


def _rows(rows: int, t: int, vocab: int):
  """Rows of t tokens (a quarter of them prompt, its first half padding),
  predicting the last half: the update's row layout."""
  inputs = jax.random.randint(jax.random.key(0), (rows, t), 0, vocab)
  pos = jnp.arange(t)[None]
  valid = jnp.broadcast_to(pos >= t // 8, (rows, t))
  targets = inputs[:, t // 2:]
  return inputs, valid, targets


def _temp_bytes(model_cfg, update_cfg, backend: str, t: int) -> int:
  policy, fn = _grad_fn(model_cfg, update_cfg, backend)
  args = jax.eval_shape(lambda: _rows(1, t, model_cfg.vocab_size))
  compiled = fn.lower(policy.abstract_params(), *args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def _time_per_token(model_cfg, update_cfg, rows: int, t: int,
                    reps: int) -> dict[str, float]:
  """Median forward + backward seconds per token, backends interleaved."""
  fns, params = {}, None
  for backend in CPU_BACKENDS:
    policy, fn = _grad_fn(model_cfg, update_cfg, backend)
    params = policy.init(jax.random.key(1)) if params is None else params
    fns[backend] = fn
  data = _rows(rows, t, model_cfg.vocab_size)
  for fn in fns.values():                    # compile, warm up
    jax.block_until_ready(fn(params, *data))
  times = {b: [] for b in fns}
  for _ in range(reps):
    for backend, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, *data))
      times[backend].append(time.perf_counter() - t0)
  return {b: statistics.median(v) / (rows * t) for b, v in times.items()}


def main(argv: list[str]) -> dict:
  parser = argparse.ArgumentParser(prog="python -m brorl_jax.bench attention")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--config", default="configs/demo_cpu.py")
  parser.add_argument("--reps", type=int, default=5,
                      help="timed forward+backward runs per backend and case")
  args = parser.parse_args(argv)
  cfg = _load(args.config)
  model_cfg = cfg.model.replace(max_position_embeddings=max(
      cfg.model.max_position_embeddings, max(MEM_LENGTHS)))
  default = resolve_attention_backend("auto", jax.default_backend())
  results: dict = {"config": args.config, "device": jax.default_backend(),
                   "default_backend": default, "dtype": model_cfg.dtype,
                   "remat": model_cfg.remat}

  temp = {b: {str(t): _temp_bytes(model_cfg, cfg.update, b, t)
              for t in MEM_LENGTHS} for b in CPU_BACKENDS}
  results["temp_bytes_1_row"] = temp
  lo, hi = (str(t) for t in MEM_LENGTHS)
  ratios = {b: temp[b][hi] / temp[b][lo] for b in CPU_BACKENDS}
  results["mem_ratio_8k_1k"] = ratios[default]
  results["mem_ratio_8k_1k_by_backend"] = ratios
  for b in CPU_BACKENDS:
    print(f"{b}: 1 row temporaries {temp[b][lo] / 2**20:.1f} MiB at T={lo}, "
          f"{temp[b][hi] / 2**20:.1f} MiB at T={hi} -> ratio "
          f"{ratios[b]:.1f}")

  seq = cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens - 1
  cases = {"8x1024": (8, 1024), "1x4096": (1, 4096),
           f"config {cfg.update.micro_batch_size}x{seq}":
           (cfg.update.micro_batch_size, seq)}
  timing = {}
  for name, (rows, t) in cases.items():
    per_token = _time_per_token(model_cfg, cfg.update, rows, t, args.reps)
    speedup = per_token["reference"] / per_token["blockwise"]
    timing[name] = {"s_per_token": per_token,
                    "speedup_vs_reference": speedup}
    print(f"fwd+bwd {name}: reference {1e6 * per_token['reference']:.1f} "
          f"us/token, blockwise {1e6 * per_token['blockwise']:.1f} us/token "
          f"-> speedup {speedup:.2f}")
  results["time"] = timing
  results["settings"] = {"reps": args.reps, "mem_lengths": MEM_LENGTHS}
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
  return results
