"""Benchmark of the reward pool: throughput, and scoring hidden behind decode.

    python -m brorl_jax.bench verifiers [--json PATH]

1. Throughput: items/s of the `math` and `code` verifiers against the number
   of workers (1, 2, 4 by default). Items are distinct (no verdict cache
   hits): math completions of ~1.5 kB whose boxed answer is right in
   another form (so math-verify, not the string match, decides) or wrong;
   code completions with 5 stdin tests each, run in the sandbox.
2. Overlap: while the pool scores a chunk asynchronously, the main process
   runs a JAX decode; hidden = (t_score_alone + t_decode_alone -
   t_overlapped) / t_score_alone (1.0: scoring is free). The decode is a
   callable (`measure_overlap(..., decode=...)`): by default a jitted loop
   of matmuls shaped like a small transformer's decode step, run for about
   as long as the scoring; the real sampler's decode can be passed instead.
   Decode threads and workers are pinned to disjoint cores where there are
   enough; the >= 0.9 target is reported only where that leaves the decode
   at least 2 cores of its own (not on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from typing import Any, Callable, Sequence

from brorl_jax.rewards import RewardPool, VerifyItem

TARGET_HIDDEN = 0.9


# ----------------------------------------------------------------- items

_FILLER = ("We simplify step by step, checking each intermediate quantity "
           "against the constraints of the problem. ")


def math_items(n: int, seed: int) -> list[VerifyItem]:
  """`n` distinct math items, half right (in another form), half wrong."""
  rng = random.Random(seed)
  items = []
  for i in range(n):
    a, b = sorted(rng.sample(range(2, 999), 2))
    k = rng.randint(2, 9)
    kind = i % 4
    if kind == 0:
      gold, right, wrong = (f"\\frac{{{a}}}{{{b}}}",
                            f"\\frac{{{a * k}}}{{{b * k}}}",
                            f"\\frac{{{a + 1}}}{{{b}}}")
    elif kind == 1:
      gold, right, wrong = (f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}",
                            f"{a + 1}\\sqrt{{{b}}}")
    elif kind == 2:
      gold, right, wrong = (f"({a}, {b}]", f"\\left({a},{b}\\right]",
                            f"[{a}, {b}]")
    else:
      gold, right, wrong = (f"x^2 + {a + b}x + {a * b}", f"(x+{a})(x+{b})",
                            f"(x+{a})(x-{b})")
    answer = right if i % 2 == 0 else wrong
    completion = (_FILLER * 15 + f"Hence the answer is $\\boxed{{{answer}}}$.")
    items.append(VerifyItem(completion, gold, "math"))
  return items


_PROGRAMS = {
    "sum": ("n = int(input())\nprint(sum(map(int, input().split())))",
            lambda xs: f"{len(xs)}\n{' '.join(map(str, xs))}\n",
            lambda xs: str(sum(xs))),
    "max": ("input()\nprint(max(map(int, input().split())))",
            lambda xs: f"{len(xs)}\n{' '.join(map(str, xs))}\n",
            lambda xs: str(max(xs))),
    "sorted": ("input()\nprint(*sorted(map(int, input().split())))",
               lambda xs: f"{len(xs)}\n{' '.join(map(str, xs))}\n",
               lambda xs: " ".join(map(str, sorted(xs)))),
}


def code_items(n: int, seed: int, tests_per_item: int = 5
               ) -> list[VerifyItem]:
  """`n` distinct code items with stdin tests; every third is wrong."""
  rng = random.Random(seed)
  names = sorted(_PROGRAMS)
  items = []
  for i in range(n):
    source, make_input, make_output = _PROGRAMS[names[i % len(names)]]
    cases = [[rng.randint(-99, 99) for _ in range(rng.randint(1, 20))]
             for _ in range(tests_per_item)]
    if i % 3 == 2:
      source = source.replace("print(", "print(1 + ", 1)
    tests = {"inputs": [make_input(c) for c in cases],
             "outputs": [make_output(c) for c in cases]}
    items.append(VerifyItem(f"Solution:\n```python\n{source}\n```", "",
                            "code", tests=tests))
  return items


# ---------------------------------------------------------------- decode

def matmul_decode(batch: int = 32, d_model: int = 512, d_ff: int = 2048,
                  layers: int = 4, context: int = 128, seed: int = 0
                  ) -> Callable[[int], None]:
  """A stand-in decode: `steps` steps of a small transformer's matmuls.

  Each step and layer does what one decode step does per token row: an
  attention read over a `context`-long KV cache ([B, D] x [B, C, D]) and a
  SwiGLU MLP ([B, D] x [D, F] twice, [B, F] x [F, D]), with a data
  dependence between steps: one jitted `fori_loop` over steps of a `scan`
  over layers.

  Returns:
    `decode(steps)`, which runs and blocks until the result is ready.
  """
  # Imported here: only this default decode needs JAX; the throughput
  # measurement runs without it.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  def normal(shape, scale):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * scale)
  params = {
      "gate": normal((layers, d_model, d_ff), d_model ** -0.5),   # [L, D, F]
      "up": normal((layers, d_model, d_ff), d_model ** -0.5),     # [L, D, F]
      "down": normal((layers, d_ff, d_model), d_ff ** -0.5),      # [L, F, D]
      "k": normal((layers, batch, context, d_model), 1.0),        # [L, B, C, D]
      "v": normal((layers, batch, context, d_model), 1.0),        # [L, B, C, D]
  }
  x0 = normal((batch, d_model), 1.0)                              # [B, D]

  def layer(x, p):
    scores = jnp.einsum("bd,bcd->bc", x, p["k"]) * d_model ** -0.5  # [B, C]
    x = x + jnp.einsum("bc,bcd->bd", jax.nn.softmax(scores), p["v"])
    x = x + (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6), None

  @jax.jit
  def run(steps, x, params):
    step = lambda _, x: jax.lax.scan(layer, x, params)[0]  # noqa: E731
    return jax.lax.fori_loop(0, steps, step, x)

  def decode(steps: int) -> None:
    jax.block_until_ready(run(steps, x0, params))

  decode(1)  # compile
  return decode


# --------------------------------------------------------------- measure

def _pin_this_process(cpus: Sequence[int]) -> None:
  """Pins every thread of this process (XLA's pool included) to `cpus`."""
  for tid in os.listdir("/proc/self/task"):
    try:
      os.sched_setaffinity(int(tid), cpus)
    except OSError:
      pass  # a thread that just exited


def throughput(verifier: str, workers: int, n: int, seed: int
               ) -> dict[str, Any]:
  """Items/s of `verifier` items through a pool of `workers`."""
  make = math_items if verifier == "math" else code_items
  with RewardPool(num_workers=workers) as pool:
    assert pool.wait_ready(), "reward workers did not start"
    pool.score(make(2 * workers, seed + 1))  # warm each worker
    items = make(n, seed)
    start = time.perf_counter()
    results = pool.score(items)
    seconds = time.perf_counter() - start
  statuses = [r.status for r in results]
  return {"verifier": verifier, "workers": workers, "items": n,
          "seconds": seconds, "items_per_s": n / seconds,
          "mean_reward": sum(r.reward for r in results) / n,
          "not_ok": len(statuses) - statuses.count("ok")}


def measure_overlap(pool: RewardPool, make_items: Callable[[int], list],
                    decode: Callable[[], Any], repeats: int = 2
                    ) -> dict[str, float]:
  """Times scoring alone, decode alone, and both at once; medians.

  Args:
    pool: a started pool.
    make_items: seed -> a fresh batch of distinct items.
    decode: runs one decode chunk and blocks until it is done.
    repeats: measurements of each (the median is reported).

  Returns:
    t_score_alone, t_decode_alone, t_overlapped (s) and hidden.
  """
  t_score, t_decode, t_both = [], [], []
  for r in range(repeats):
    start = time.perf_counter()
    pool.score(make_items(3 * r))
    t_score.append(time.perf_counter() - start)
    start = time.perf_counter()
    decode()
    t_decode.append(time.perf_counter() - start)
    batch = make_items(3 * r + 1)
    start = time.perf_counter()
    future = pool.submit(batch)  # scoring this chunk ...
    decode()                     # ... while decoding the next
    future.result()
    t_both.append(time.perf_counter() - start)
  s, d, o = (statistics.median(t) for t in (t_score, t_decode, t_both))
  return {"t_score_alone": s, "t_decode_alone": d, "t_overlapped": o,
          "hidden": (s + d - o) / s}


def overlap(workers: int, n: int, seed: int,
            decode: Callable[[], Any] | None = None) -> dict[str, Any]:
  """The overlap measurement for `workers`, pinned where cores allow."""
  cores = sorted(os.sched_getaffinity(0))
  pinned = len(cores) - workers >= 1
  worker_cpus = cores[-workers:] if pinned else None
  decode_cpus = cores[:-workers] if pinned else cores
  _pin_this_process(decode_cpus)
  try:
    with RewardPool(num_workers=workers, cpus=worker_cpus) as pool:
      assert pool.wait_ready(), "reward workers did not start"
      pool.score(math_items(2 * workers, seed + 99))
      make = lambda s: math_items(n, seed + 1000 * workers + s)  # noqa: E731
      if decode is None:
        # Calibrate the stand-in to run about as long as the scoring.
        run = matmul_decode()
        start = time.perf_counter()
        pool.score(make(-1))
        t_score = time.perf_counter() - start
        steps = 20
        for _ in range(2):
          start = time.perf_counter()
          run(steps)
          steps = max(1, round(steps * t_score / (time.perf_counter()
                                                  - start)))
        decode = lambda: run(steps)  # noqa: E731
      result = measure_overlap(pool, make, decode)
  finally:
    _pin_this_process(cores)
  return {"workers": workers, "items": n, "pinned": pinned,
          "decode_cpus": decode_cpus, "worker_cpus": worker_cpus or cores,
          **result,
          "target": TARGET_HIDDEN if pinned and len(decode_cpus) >= 2
                    else None}


# ------------------------------------------------------------------ main

def _table(report: dict[str, Any]) -> str:
  lines = [f"verifier throughput ({report['cores']} cores, shared)",
           f"{'verifier':<9}{'workers':>8}{'items':>7}{'seconds':>9}"
           f"{'items/s':>9}{'reward':>8}{'not ok':>7}"]
  for row in report["throughput"]:
    lines.append(f"{row['verifier']:<9}{row['workers']:>8}{row['items']:>7}"
                 f"{row['seconds']:>9.2f}{row['items_per_s']:>9.1f}"
                 f"{row['mean_reward']:>8.2f}{row['not_ok']:>7}")
  lines += ["", "scoring hidden behind decode (math items)",
            f"{'workers':>7}{'pinned':>8}{'score_s':>9}{'decode_s':>9}"
            f"{'both_s':>8}{'hidden':>8}{'target':>8}"]
  for row in report["overlap"]:
    target = "-" if row["target"] is None else f"{row['target']:.2f}"
    lines.append(f"{row['workers']:>7}{str(row['pinned']):>8}"
                 f"{row['t_score_alone']:>9.2f}{row['t_decode_alone']:>9.2f}"
                 f"{row['t_overlapped']:>8.2f}{row['hidden']:>8.2f}"
                 f"{target:>8}")
  return "\n".join(lines)


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str], decode: Callable[[], Any] | None = None
         ) -> dict[str, Any]:
  """Runs the benchmark; prints a table; returns (and maybe writes) JSON.

  Args:
    argv: command-line arguments after `verifiers`.
    decode: the decode to overlap with (default: the matmul stand-in).

  Returns:
    The report: throughput rows and overlap rows.
  """
  parser = argparse.ArgumentParser(
      prog="python -m brorl_jax.bench verifiers", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--json", default=None, help="write the report here")
  parser.add_argument("--workers", type=_ints, default=[1, 2, 4],
                      help="pool sizes for throughput, e.g. 1,2,4")
  parser.add_argument("--overlap_workers", "--overlap-workers", type=_ints,
                      default=[1, 2],
                      help="pool sizes for the overlap measurement")
  parser.add_argument("--math_items", "--math-items", type=int, default=1500,
                      help="math items per throughput run")
  parser.add_argument("--code_items", "--code-items", type=int, default=48,
                      help="code items per throughput run")
  parser.add_argument("--overlap_items", "--overlap-items", type=int,
                      default=800,
                      help="math items per overlap measurement")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(list(argv))
  report: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)),
                            "throughput": [], "overlap": []}
  for workers in args.workers:
    report["throughput"].append(
        throughput("math", workers, args.math_items, args.seed))
    report["throughput"].append(
        throughput("code", workers, args.code_items, args.seed))
  for workers in args.overlap_workers:
    report["overlap"].append(
        overlap(workers, args.overlap_items, args.seed, decode))
  print(_table(report))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return report


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  main(sys.argv[1:])
