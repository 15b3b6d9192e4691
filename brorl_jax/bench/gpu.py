"""GPU check: `python -m brorl_jax.bench gpu [--json PATH] [--tiny]`.

What a lent GPU (one H100: about 8 minutes) tells, in one process:

  1. `kernels`: the attention kernels against the float32 reference at the
     recipes' shapes (`kernel_checks.cases("full")`, the checks of
     `tests/hardware/`), outputs and gradients, each case's verdict, errors
     and seconds -> `kernels_passed` / `kernels_failed`.
  2. `decode`: the shared-prefix sampler's useful tokens/s on random
     weights of the 1.5B recipes' shape (`qwen2_1p5b`) in bf16, with the
     GPU decode kernel (`auto` on GPU: cuDNN prefill, the Pallas decode
     kernel), at N = 512 (1 prompt) and N = 16 (32 prompts), 512 rollouts
     either way, prompt 256, up to 1,024 new tokens drawn long-tailed as in
     `bench sampler`'s refill comparison (`skewed_lengths`), 256 decode rows:
     fixed chunks and the refill decode (`rollout.refill`), each after a
     short compile run -> `decode_tokens_per_s`.
  3. `update`: one update step of the same model (f32 parameters, bf16
     compute, remat; 8 rows of 512 + 1,537 tokens, i.e. 2,048 inputs, one
     micro-batch, AdamW), timed after its compile -> achieved model TFLOP/s
     (6 x matmul parameters x tokens + attention, as `bench step` counts)
     `update_tflops_per_s`.
  Beside each measured time: the expected one from the compiled program's
  `cost_analysis()` (FLOPs and bytes of one decode step, or of the update)
  against the device's published bf16 peak and memory bandwidth (a
  roofline at 100 % efficiency; `expected_seconds`). The dry run's own
  step-time estimate (issue 28, from the same compiled programs) should
  replace `expected_seconds` once it lands.

`--tiny` runs every part at toy shapes so that CI checks the whole command
on CPU (the `tiny` model; two of the reduced kernel cases in Pallas
interpret mode, tests/hardware runs them all; decode and update with the
CPU's backend, `auto`, in float32); its figures mean nothing. A part that
fails is recorded (`errors`) and the others still run; parts past
`--budget_s` are skipped (`skipped`). Every key of `KEYS` is written
either way. Exit status 1 if any kernel check failed or any part failed or
was skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from brorl_jax.bench import kernel_checks
from brorl_jax.bench.sampler import NO_STOP, skewed_lengths
from brorl_jax.model.config import model_config
from brorl_jax.model.transformer import Policy
from brorl_jax.rl import losses
from brorl_jax.rl import update as update_lib
from brorl_jax.rl.batch import RolloutBatch
from brorl_jax.rl.train_state import TrainState
from brorl_jax.rollout import Sampler, SamplerConfig, sampling
from brorl_jax.rollout.sampler import plan_chunks, refill_plan

KEYS = ("device", "device_kind", "jax", "jaxlib", "tiny", "sizes", "peaks",
        "kernels", "kernels_passed", "kernels_failed", "decode",
        "decode_tokens_per_s", "update", "update_tflops_per_s",
        "part_seconds", "total_seconds", "budget_s", "skipped", "errors",
        "ok", "estimate_source")
# Dense bf16 FLOP/s and memory bytes/s from NVIDIA's data sheets, by a
# substring of `device_kind` (first match wins).
PUBLISHED_PEAKS = (("H100 PCIe", 756e12, 2.0e12), ("H100", 989.4e12, 3.35e12),
                   ("H200", 989.4e12, 4.8e12))


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The shapes of a run (`FULL` on a GPU, `TINY` for CPU)."""

  preset: str
  kernel_cases: str
  groups: tuple[int, ...]
  rollouts: int
  prompt_len: int
  new_tokens: int
  decode_rows: int
  segment_steps: int
  update_rows: int
  update_prompt_len: int
  update_new_tokens: int
  update_reps: int
  dtype: str = "bfloat16"


# The update's inputs are 512 + 1,537 - 1 = 2,048 tokens: cuDNN's training
# kernel takes even lengths only (the recipes' odd 17,407 are in `kernels`).
FULL = Sizes("qwen2_1p5b", "full", (512, 16), 512, 256, 1024, 256, 256,
             8, 512, 1537, 3)
# One refill segment of all 16 steps: one suffix width to compile on CPU.
# float32: XLA:CPU of jax 0.11.2 fails to run one of the bf16 decode's
# bf16 x bf16 -> f32 dots ("Unsupported element type for DotThunk::Execute").
TINY = Sizes("tiny", "smoke", (512, 16), 512, 8, 16, 64, 16, 8, 8, 9, 2,
             dtype="float32")


# ---- expected times ----------------------------------------------------------

def device_peaks(device) -> dict:
  """bf16 FLOP/s and memory bytes/s of `device`: published for the GPUs in
  `PUBLISHED_PEAKS`, else measured here (a bf16 matmul, a copy)."""
  kind = getattr(device, "device_kind", "")
  for name, flops, bw in PUBLISHED_PEAKS:
    if name in kind:
      return {"flops_per_s": flops, "bytes_per_s": bw,
              "source": f"published ({name})"}
  n = 1024
  a = jnp.ones((n, n), jnp.bfloat16)
  mm = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  x = jnp.ones((16 * 2**20,), jnp.float32)
  cp = jax.jit(lambda x: x * 2)
  best_mm, best_cp = _best(lambda: mm(a)), _best(lambda: cp(x))
  return {"flops_per_s": 2 * n**3 / best_mm,
          "bytes_per_s": 2 * x.nbytes / best_cp,
          "source": "measured (bf16 matmul 1024^3, f32 copy 64 MiB)"}


def _best(fn, reps: int = 5) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def cost(compiled) -> dict:
  """FLOPs and bytes accessed of a compiled program (XLA's cost analysis;
  a while loop's body counts once)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):      # older jax: one dict per program
    ca = ca[0] if ca else {}
  return {"flops": float(ca.get("flops", 0.0)),
          "bytes": float(ca.get("bytes accessed", 0.0))}


def expected_seconds(c: dict, peaks: dict) -> float:
  """Roofline time of a program's cost at the device's peaks (100 %)."""
  return max(c["flops"] / peaks["flops_per_s"],
             c["bytes"] / peaks["bytes_per_s"])


def matmul_params(m) -> int:
  """Parameters that enter matmuls per token (not the embedding lookup)."""
  d, h = m.embed_dim, m.head_dim
  per_layer = (d * h * (m.num_heads + 2 * m.num_kv_heads)
               + m.num_heads * h * d + 3 * d * m.mlp_dim)
  return m.num_layers * per_layer + d * m.vocab_size


def update_model_flops(m, rows: int, seq: int) -> float:
  """Forward + backward model FLOPs of `rows` rows of `seq` tokens: 6 x
  matmul parameters per token plus attention over the full masked length
  (scores and values, forward and backward), as `bench step` counts."""
  per_token = 6 * matmul_params(m) + 12 * m.num_layers * m.num_heads * (
      m.head_dim * seq)
  return float(per_token * seq * rows)


# ---- parts -------------------------------------------------------------------

def run_kernels(sizes: Sizes, results: dict) -> None:
  verdicts = []
  for case in kernel_checks.cases(sizes.kernel_cases):
    v = kernel_checks.run(case)
    print(f"  {'ok  ' if v['ok'] else 'FAIL'} {v['message']} "
          f"({v['seconds']:.1f} s)", flush=True)
    verdicts.append(v)
  results["kernels"] = verdicts
  results["kernels_passed"] = sum(v["ok"] for v in verdicts)
  results["kernels_failed"] = sum(not v["ok"] for v in verdicts)


def _decode_policy(sizes: Sizes, backend: str) -> Policy:
  mcfg = model_config(sizes.preset, {
      "dtype": sizes.dtype, "param_dtype": sizes.dtype,
      "attention_backend": backend})
  need = sizes.prompt_len + sizes.new_tokens
  return Policy.create(mcfg.replace(max_position_embeddings=max(
      mcfg.max_position_embeddings, need)))


def run_decode(sizes: Sizes, backend: str, peaks: dict, results: dict,
               over_budget) -> None:
  policy = _decode_policy(sizes, backend)
  params = policy.init(jax.random.key(0))
  vocab, lp, t = policy.cfg.vocab_size, sizes.prompt_len, sizes.new_tokens
  rng = np.random.default_rng(0)
  out, flat = {}, {}
  results["decode"], results["decode_tokens_per_s"] = out, flat
  for n in sizes.groups:
    p = sizes.rollouts // n
    prompts = rng.integers(3, vocab, (p, lp)).astype(np.int32)
    plen = np.full((p,), lp, np.int32)
    limits = skewed_lengths(rng, (p, n), t)
    useful = int(limits.sum())
    res = {"prompts": p, "n": n, "useful_tokens": useful,
           "mean_length": float(limits.mean()),
           "capped": int((limits == t).sum())}
    out[f"N{n}"] = res
    samplers = {}
    for mode in ("fixed", "refill"):
      flat[f"N{n}_{mode}"] = None
      if over_budget(f"decode N{n} {mode}"):
        continue
      sampler = Sampler(policy, SamplerConfig(
          n=n, max_prompt_len=lp, max_new_tokens=t,
          max_decode_rows=sizes.decode_rows, refill=mode == "refill",
          segment_steps=sizes.segment_steps), stop_ids=NO_STOP, pad_id=0)
      samplers[mode] = sampler
      t0 = time.perf_counter()       # compiles: every row stops at 2 tokens
      warm = sampler.generate(params, prompts, plen, jax.random.key(0),
                              length_limits=np.full((p, n), 2, np.int32))
      jax.block_until_ready(warm.tokens)
      warm_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      ro = sampler.generate(params, prompts, plen, jax.random.key(1),
                            length_limits=limits)
      jax.block_until_ready(ro.tokens)
      sec = time.perf_counter() - t0
      if not (np.asarray(ro.lengths) == limits).all():
        raise AssertionError(f"decode N={n} {mode}: the stop rule was not "
                             "kept (lengths differ from the limits)")
      if mode == "fixed":
        pc, gc_ = plan_chunks(p, n, sizes.decode_rows)
        rows = pc * gc_
      else:
        pc, slots = refill_plan(p, n, sizes.decode_rows)
        rows = pc * slots
      total = int(ro.total_slots)
      res[mode] = {"seconds": sec, "compile_and_warmup_s": warm_s,
                   "useful_tokens_per_s": useful / sec,
                   "rows_per_step": rows, "decode_steps": total // rows,
                   "slot_utilization": 1 - int(ro.finished_slots) / total}
      flat[f"N{n}_{mode}"] = useful / sec
      print(f"  decode N={n} {mode}: {useful / sec:.0f} useful tokens/s "
            f"({sec:.2f} s, {total // rows} steps; compile run "
            f"{warm_s:.1f} s)", flush=True)
    if "fixed" in samplers:
      _decode_estimate(samplers["fixed"], params, prompts, plen, limits,
                       peaks, res, policy.cfg)
  del params
  gc.collect()


def _decode_estimate(sampler, params, prompts, plen, limits, peaks, res,
                     mcfg) -> None:
  """Expected seconds per decode step from the fixed-chunk program's cost
  (its loop body counts once), times each mode's measured steps."""
  p, n = limits.shape
  pc, gc_ = plan_chunks(p, n, sampler.cfg.max_decode_rows)
  prefill = sampler.prefill(params, prompts, plen)
  part = jax.tree.map(lambda x: x[:pc], prefill)
  keys = sampling.row_keys(jax.random.key(1), jnp.arange(pc),
                           jnp.arange(gc_))
  compiled = sampler.lower_decode(
      params, part, keys, group=gc_,
      limits=jnp.asarray(limits[:pc, :gc_], jnp.int32)).compile()
  c = cost(compiled)
  step_s = expected_seconds(c, peaks)
  res["decode_step"] = {**c, "rows": pc * gc_, "expected_s": step_s,
                        # 2 x matmul parameters per row: what one step
                        # must do at least (cost_analysis's should be ~it).
                        "model_flops": 2.0 * matmul_params(mcfg) * pc * gc_}
  for mode in ("fixed", "refill"):
    if mode in res:
      r = res[mode]
      r["expected_s"] = step_s * r["decode_steps"]
      r["expected_tokens_per_s"] = res["useful_tokens"] / max(
          r["expected_s"], 1e-12)
      r["measured_over_expected"] = r["seconds"] / max(r["expected_s"],
                                                       1e-12)


def run_update(sizes: Sizes, backend: str, peaks: dict, results: dict
               ) -> None:
  mcfg = model_config(sizes.preset, {
      "dtype": sizes.dtype, "param_dtype": "float32", "remat": True,
      "attention_backend": backend})
  lp, t, rows = (sizes.update_prompt_len, sizes.update_new_tokens,
                 sizes.update_rows)
  mcfg = mcfg.replace(max_position_embeddings=max(
      mcfg.max_position_embeddings, lp + t))
  policy = Policy.create(mcfg)
  optimizer = optax.adamw(1e-6)
  state = TrainState.create(policy.init(jax.random.key(0)), optimizer,
                            with_reference=False)
  rng = np.random.default_rng(0)
  vocab = mcfg.vocab_size
  batch = RolloutBatch(
      prompt_tokens=jnp.asarray(rng.integers(3, vocab, (1, lp)), jnp.int32),
      prompt_lengths=jnp.full((1,), lp, jnp.int32),
      tokens=jnp.asarray(rng.integers(3, vocab, (1, rows, t)), jnp.int32),
      logprobs=jnp.asarray(-rng.uniform(1, 7, (1, rows, t)), jnp.float32),
      lengths=jnp.full((1, rows), t, jnp.int32),
      advantages=jnp.asarray(rng.normal(size=(1, rows)), jnp.float32),
      mask=jnp.ones((1, rows), bool))
  ucfg = update_lib.UpdateConfig(num_minibatches=1, micro_batch_size=rows,
                                 length_buckets=1)
  fn = jax.jit(update_lib.make_update_fn(policy, ucfg, losses.LossConfig(),
                                         optimizer, temperature=1.0),
               donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = fn.lower(state, batch, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  times, metrics = [], None
  for i in range(sizes.update_reps + 1):          # the first is a warm-up
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, jax.random.key(i))
    jax.block_until_ready(metrics)
    if i:
      times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  flops = update_model_flops(mcfg, rows, lp + t - 1)
  c = cost(compiled)
  expected = expected_seconds(c, peaks)
  skipped = int(metrics["optim/skipped"])
  results["update"] = {
      "rows": rows, "tokens_per_row": lp + t - 1, "seconds": sec,
      "compile_s": compile_s, "timed_calls": len(times),
      "model_flops": flops, "tflops_per_s": flops / sec / 1e12,
      "xla_flops": c["flops"], "xla_bytes": c["bytes"],
      "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
      "expected_s": expected,
      "expected_tflops_per_s": flops / max(expected, 1e-12) / 1e12,
      "skipped_minibatches": skipped,
      "loss": float(metrics["loss/loss"])}
  results["update_tflops_per_s"] = flops / sec / 1e12
  print(f"  update: {sec:.3f} s for {flops / 1e12:.2f} TFLOP -> "
        f"{flops / sec / 1e12:.1f} TFLOP/s (expected {expected:.3f} s; "
        f"compile {compile_s:.0f} s)", flush=True)
  if skipped:
    raise AssertionError("the update skipped its mini-batch: its loss or "
                         "gradient was not finite")


# ---- command -----------------------------------------------------------------

def main(argv: list[str]) -> dict:
  parser = argparse.ArgumentParser(prog="python -m brorl_jax.bench gpu")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--tiny", action="store_true",
                      help="toy shapes, every part (CPU: checks the command)")
  parser.add_argument("--budget_s", "--budget-s", type=float, default=None,
                      help="skip the parts that would start after this many "
                           "seconds (default 450: the check's bar is 8 "
                           "minutes on one H100; 3600 with --tiny)")
  parser.add_argument("--attention_backend", "--attention-backend",
                      default="auto", help="model.attention_backend of the "
                      "decode and update parts (auto: cuDNN and the Pallas "
                      "decode kernel on a GPU, blockwise on CPU)")
  args = parser.parse_args(argv)
  sizes = TINY if args.tiny else FULL
  if args.budget_s is None:
    args.budget_s = 3600.0 if args.tiny else 450.0
  backend = args.attention_backend
  device = jax.devices()[0]
  if jax.config.jax_compilation_cache_dir is None:
    # The decode estimate re-lowers the decode program the run compiled:
    # through the persistent cache that is a load, not a second compile.
    jax.config.update("jax_compilation_cache_dir",
                      tempfile.mkdtemp(prefix="brorl_bench_gpu_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  start = time.perf_counter()
  results: dict = {k: None for k in KEYS}
  results.update({
      "device": device.platform, "device_kind": device.device_kind,
      "jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
      "tiny": args.tiny, "sizes": dataclasses.asdict(sizes),
      "attention_backend": backend, "budget_s": args.budget_s,
      "skipped": [], "errors": {}, "part_seconds": {},
      "estimate_source": "bench.gpu.expected_seconds: cost_analysis FLOPs "
      "and bytes at the device's peaks (100 %); to be replaced by the dry "
      "run's step-time estimate (issue 28)"})
  results["peaks"] = device_peaks(device)

  def over_budget(what: str) -> bool:
    if time.perf_counter() - start > args.budget_s:
      results["skipped"].append(what)
      print(f"  skipped {what}: past --budget_s {args.budget_s:.0f}",
            flush=True)
      return True
    return False

  parts = (("kernels", lambda: run_kernels(sizes, results)),
           ("decode", lambda: run_decode(sizes, backend, results["peaks"],
                                         results, over_budget)),
           ("update", lambda: run_update(sizes, backend, results["peaks"],
                                         results)))
  for name, part in parts:
    if name != "decode" and over_budget(name):
      continue
    print(f"{name}:", flush=True)
    t0 = time.perf_counter()
    try:
      part()
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [""])[0][:300]
      results["errors"][name] = f"{type(e).__name__}: {first}"
      print(f"  {name} failed: {results['errors'][name]}", flush=True)
    results["part_seconds"][name] = time.perf_counter() - t0
  results["total_seconds"] = time.perf_counter() - start
  results["ok"] = (not results["errors"] and not results["skipped"]
                   and results["kernels_failed"] == 0)
  print(f"kernels: {results['kernels_passed']} passed, "
        f"{results['kernels_failed']} failed; decode useful tokens/s "
        + ", ".join(f"{k} {v:.0f}" if v is not None else f"{k} -"
                    for k, v in (results["decode_tokens_per_s"] or {}).items())
        + f"; update {results['update_tflops_per_s'] or 0:.1f} TFLOP/s; "
        f"{results['total_seconds']:.0f} s")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
  if not results["ok"]:
    sys.exit(1)
  return results
