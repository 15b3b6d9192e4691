"""Per-device memory before a run: `python -m brorl_jax.train --config C
--dry_run`.

Builds the configured mesh and compiles, ahead of time and from abstract
shapes only (no parameter is ever materialized), the three programs that
hold memory during an RL step:

  * the sampler's prefill of the step's P prompts,
  * one decode chunk (`rollout.max_decode_rows` rows of P x G), at two row
    counts, which gives the memory per decoded row,
  * the update (mini-batches x micro-batches, state donated),

and reads their compiled memory analysis. Devices are whatever JAX has: the
accelerators of this machine, CPU devices faked to the target's count
(`XLA_FLAGS=--xla_force_host_platform_device_count=64`: CPU buffer
assignment stands in for the accelerator's), or, with `--dry_run_topology
v5p:4x4x2` and libtpu installed, the TPU compiler itself through JAX's
ahead-of-time topologies. Deep models compile at two small depths (1 and
2 layers; 2 and 4 with remat, whose first layer is special) and every
compiled figure is extrapolated linearly in the layer count (parameters,
KV caches and saved activations grow per layer; the largest transient does
not), which keeps a 64-device compile of a 1.5B model to minutes on a
laptop. XLA's CPU scheduler does not honour remat (it keeps every layer's
intermediates), so on CPU the update's temporaries of a remat model are the
2-layer compile plus the block inputs remat saves per further layer.
Parameters, optimizer state and rollout buffers are computed from their
shardings (labelled analytic; exact for what they cover).

The update is compiled at its longest length bucket alone
(`StepPrograms.update` says what the other `lax.switch` branches would
add), on the TPU compiler at the model's full depth (its remat temporaries
are not linear in depth, and its compile time barely grows with it), and
every program is lowered first and then compiled two at a time
(`loop/programs.py`: the compile side, from the run's builder, so the dry
run sizes the loop's own optimizer, state layout and sampler; this module
is the report). The TPU compiler
spends nearly all its time in per-instruction code generation after buffer
assignment: each bucket branch costs as much as the first, a deeper model
barely more (BroRL, v5p-64: the four-bucket update took 602 s at 2 layers
and 594 s at 4, the longest bucket alone 233 s and 259 s, two at a time;
194 s and 220 s once the update gathered its rows per micro-batch).

The report gives the peak of the sampling phase and of the update phase,
and the largest `max_decode_rows` whose sampling peak fits the device
memory (`--device_memory_gb`; default: the TPU's HBM, the GPU's JAX limit,
or 80 GB, an H100, on CPU).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from brorl_jax import aot_sizing
from brorl_jax.aot import devices as devices_lib
from brorl_jax.loop import programs
from brorl_jax.loop.programs import GiB, CompiledStep
from brorl_jax.rollout.config import plan_chunks, refill_plan


def per_device_bytes(tree: Any) -> float:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return float(total)


def dry_run(cfg, *, device_memory_gb: float | None = None,
            topology: str | None = None, layers: int = 0,
            json_path: str | None = None,
            out: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiles the step's programs for `cfg` and reports per-device memory.

  Args:
    cfg: the validated `RunConfig`.
    device_memory_gb: memory per device, GiB (default: see module doc).
      On GPUs give what JAX may use: total x XLA_PYTHON_CLIENT_MEM_FRACTION.
    topology: a TPU topology for ahead-of-time compilation (libtpu needed),
      e.g. "v5p:4x4x2", or a GPU one (the CUDA plugin, `aot/topology.py`),
      e.g. "h100:8x1x8"; None uses `jax.devices()`.
    layers: model depth to compile: 0 = the full depth for shallow models,
      else compiles at 1 and 2 layers (2 and 4 with remat) extrapolated to
      the full depth; k >= the depth compiles the full model; a smaller k
      extrapolates from compiles at 1 (2 with remat) and k layers.
    json_path: also write the summary (the Returns' JSON keys) here.
    out: where the report's lines go.

  Returns:
    The summary written to `json_path`: per-device GiB
    "device_memory_gib", "peak_prefill_gib", "peak_decode_gib",
    "peak_update_gib", "peak_diagnostics_gib"; "max_decode_rows_fit";
    "fits" (every peak <= device memory); "compile_s"; "sources" {key:
    "compiled" | "analytic" | "sum"}; plus (not in the JSON)
    "max_decode_rows" (= max_decode_rows_fit), "decode_plan",
    "figures": [(name, GiB, source)], ...
  """
  start = time.perf_counter()
  jax.config.update("jax_threefry_partitionable", True)

  def log(msg):
    print(f"[dry_run] {msg}", file=sys.stderr, flush=True)

  step = programs.compile_step(cfg, topology=topology, layers=layers,
                               log=log)
  if step.failures:     # the GPU compiler's: every one, a line each
    for line in step.failures:
      out(line)
    raise SystemExit(1)
  memory_gib, memory_src = ((device_memory_gb, "--device_memory_gb")
                            if device_memory_gb else
                            devices_lib.default_memory_gib(step.devices,
                                                           topology))
  report = memory_report(cfg, step, memory_gib * GiB)
  _print_report(cfg, step, report, memory_gib, memory_src, out)
  summary = _summary(cfg, step, report, memory_gib,
                     time.perf_counter() - start)
  if step.gpu:
    summary.update(aot_sizing.gpu_summary(
        cfg, step.model_cfg, step.gpu, mem=step.raw, texts=step.texts,
        depths=step.depths, depth=step.model_cfg.num_layers,
        table=step.table, resident=report["state_bytes"],
        budget=report["budget"], fits=summary["fits"], out=out))
  if json_path:
    pathlib.Path(json_path).write_text(json.dumps(summary, indent=1) + "\n")
    out(f"wrote {json_path}")
  r = report
  return {**summary, "max_decode_rows": r["max_rows"],
          "decode_plan": r["plan"], "fit_rows": r["fit_rows"],
          "refill_slots": r["slots"],
          "sampling_peak_gib": r["peaks"]["peak_decode_gib"] / GiB,
          "update_peak_gib": r["peaks"]["peak_update_gib"] / GiB,
          "prefill_peak_gib": r["peaks"]["peak_prefill_gib"] / GiB,
          "per_row_bytes": r["slope"],
          "figures": [(n, v / GiB, s) for n, v, s in r["figures"]
                      if v is not None],
          "compiled_label": step.label, "mesh": dict(step.mesh.shape)}


def memory_report(cfg, step: CompiledStep, budget: float) -> dict[str, Any]:
  """Every figure of the report (bytes per device), its peaks and the
  decode-row limit that fits `budget` bytes.

  Compiled figures come from `step`; the resident state, the sampling copy
  and the rollout buffers from their shardings (analytic: exact for what
  they cover); the peaks are sums of what the loop holds at once.
  """
  full, m, compiled = step.full, step.mem, step.label
  model_cfg, depth = step.model_cfg, step.model_cfg.num_layers
  num_prompts = full.num_prompts
  # ---- analytic figures (from shardings) -----------------------------------
  st = full.state
  params = per_device_bytes(st.params)
  opt = per_device_bytes(st.opt_state)
  ref = per_device_bytes(st.ref_params) if st.ref_params is not None else 0.0
  counters = per_device_bytes((st.step, st.updates, st.skipped))
  sample_copy = per_device_bytes(full.sample_params)
  c = cfg.rollout
  g, lp, t = c.n, c.max_prompt_len, c.max_new_tokens
  r = full.sample_rules
  buf = lambda p, dtype: per_device_bytes(full._sds(  # noqa: E731
      r, (p, g, t), dtype, ("batch", "group", None)))
  # Chunk outputs, then their concatenation ([P, G, T] tokens + logprobs).
  rollouts = buf(num_prompts, jnp.int32) + buf(num_prompts, jnp.float32)
  first_probs = per_device_bytes(full._sds(
      r, (num_prompts, model_cfg.vocab_size), jnp.float32,
      ("batch", "act_vocab")))
  kv_item = jnp.dtype(model_cfg.dtype).itemsize
  kv_row = 2 * depth * t * model_cfg.num_kv_heads * model_cfg.head_dim * kv_item
  prompt_kv = 2 * depth * num_prompts * lp * model_cfg.num_kv_heads * \
      model_cfg.head_dim * kv_item / max(step.mesh.size, 1)

  # ---- per decoded row (compiled, two chunk sizes) -------------------------
  rows = sorted(m.decode)
  big = m.decode[rows[-1]]
  if len(rows) == 2:
    slope = (m.decode[rows[1]].peak - m.decode[rows[0]].peak) / (
        rows[1] - rows[0])
    slope_src = compiled
  else:
    row_shards = num_prompts * g * t * 4 / max(buf(num_prompts, jnp.int32), 1)
    slope = kv_row / row_shards
    slope_src = "analytic"
  state_bytes = params + opt + ref + counters
  fixed_sampling = (state_bytes + m.prefill.out + 2 * rollouts
                    + big.peak - slope * rows[-1])
  sampling_peak = fixed_sampling + slope * rows[-1]
  prefill_peak = state_bytes + m.prefill.peak
  # What the loop (loop/trainer.py) holds when: the sampling copy is
  # deleted before the update (the step's rollouts and first-token
  # probabilities stay for the diagnostics); the diagnostics re-score before
  # the update under the old state, and after it next to a new sampling copy
  # and the kept prompts' prefill (`StepDiagnostics.after_update`).
  held = rollouts + first_probs
  update_peak = m.update.peak + held
  diag_peak, rescore = 0.0, m.rescore
  if rescore is not None:
    rest_of_state = opt + ref + counters          # params: rescore's args
    batch_bytes = per_device_bytes(full.batch())
    diag_peak = max(
        rescore.peak + rest_of_state + held,                     # before
        m.prefill.peak + state_bytes + batch_bytes + held,       # prefill
        rescore.peak + rest_of_state + sample_copy + m.prefill.out + held)

  fit_rows = int((budget - fixed_sampling) // slope) if slope > 0 else 0
  plan = (plan_chunks(num_prompts, g, fit_rows) if fit_rows >= 1 else None)
  # The refill decode holds one KV row per slot, as a chunk row does.
  slots = refill_plan(num_prompts, g, fit_rows) if fit_rows >= 1 else None
  update_src, cpu_upper = step.update_label, step.cpu_upper
  figures = [
      ("resident through the step", None, ""),
      ("  parameters, train layout", params, "analytic"),
      ("  optimizer state (AdamW mu, nu)", opt, "analytic"),
      ("  reference parameters (KL)", ref, "analytic"),
      ("  parameters, sampling copy", sample_copy, "analytic"),
      (f"sampling: {num_prompts} prompts x {g} rollouts, Lp {lp}, T {t}",
       None, ""),
      ("  prefill: prompt KV + first-token logits", m.prefill.out, compiled),
      ("    (prompt KV alone, if spread over all devices)", prompt_kv,
       "analytic"),
      ("  prefill: temporaries", m.prefill.temp, compiled),
      (f"  decode chunk of {rows[-1]} rows: KV cache, buffers, "
       "temporaries", big.temp + big.out, compiled),
      ("  KV cache per decoded row (whole row, unsharded)", kv_row,
       "analytic"),
      ("  memory per decoded row, per device", slope, slope_src),
      ("  rollout buffers: chunk outputs + assembled [P, G, T]",
       2 * rollouts, "analytic"),
      ("  peak while decoding", sampling_peak, "sum"),
      (f"update: {cfg.loop.prompts_per_step * g} rows in "
       f"{cfg.update.num_minibatches} mini-batches of micro-batches of "
       f"{cfg.update.micro_batch_size}", None, ""),
      ("  arguments (state + rollout batch)", m.update.args, update_src),
      ("  temporaries (activations, gradients)", m.update.temp,
       step.update_temp_label),
      *([("    (CPU compile extrapolated: remat not scheduled, upper "
          "bound)", cpu_upper, update_src)] if cpu_upper is not None else []),
      ("  outputs not aliased to the donated state",
       m.update.out - m.update.alias, update_src),
      ("  + rollouts, first-token probs held meanwhile (the sampling "
       "copy is freed)", held, "analytic"),
      ("  peak while updating", update_peak, "sum"),
      *([(f"diagnostics: {full.rescored_rows} rollouts re-scored before "
          "and after the update, kept prompts re-prefilled", None, ""),
         ("  re-scoring: temporaries", rescore.temp, compiled),
         ("  peak of the diagnostics (after the update: new sampling copy "
          "+ prefill)", diag_peak, "sum")] if rescore is not None else []),
  ]
  return {
      "figures": figures, "slope": slope, "slope_src": slope_src,
      "chunk_rows": rows[-1], "fit_rows": fit_rows, "plan": plan,
      "max_rows": plan[0] * plan[1] if plan else 0, "slots": slots,
      "budget": budget, "num_prompts": num_prompts,
      "state_bytes": state_bytes,
      "peaks": {"peak_prefill_gib": prefill_peak,
                "peak_decode_gib": sampling_peak,
                "peak_update_gib": update_peak,
                "peak_diagnostics_gib": diag_peak}}


def _print_report(cfg, step: CompiledStep, report: dict, memory_gib: float,
                  memory_src: str, out: Callable[[str], None]) -> None:
  """The report's lines: the figures' table, the peaks, the row limit."""
  model_cfg, mesh, figures = step.model_cfg, step.mesh, report["figures"]
  peaks, budget = report["peaks"], report["budget"]
  plan, max_rows, fit_rows = (report["plan"], report["max_rows"],
                              report["fit_rows"])
  num_prompts, g, c = report["num_prompts"], cfg.rollout.n, cfg.rollout
  n_params = model_cfg.num_params()
  out(f"dry run: {len(step.devices)} {step.platform} devices, mesh "
      + " ".join(f"{k}={v}" for k, v in mesh.shape.items())
      + f"; model {n_params / 1e9:.2f}B parameters, {model_cfg.num_layers} "
      f"layers ({step.model_source}), params {model_cfg.param_dtype}, "
      f"compute {model_cfg.dtype}")
  big_figure = max(v for _, v, _ in figures if v is not None)
  unit, scale = ("GiB", GiB) if big_figure >= GiB else ("MiB", 2**20)
  out(f"{'per-device memory':<66}{unit:>9}  source")
  for name, value, src in figures:
    out(name if value is None else f"{name:<66}{value / scale:>9.3f}  {src}")
  update_peak, diag_peak = peaks["peak_update_gib"], peaks[
      "peak_diagnostics_gib"]
  out(f"prefill phase peak {peaks['peak_prefill_gib'] / GiB:.2f} GiB, decode "
      f"phase peak {peaks['peak_decode_gib'] / GiB:.2f} GiB (at "
      f"max_decode_rows={c.max_decode_rows}, chunks of "
      f"{report['chunk_rows']} rows), update phase peak "
      f"{update_peak / GiB:.2f} GiB, diagnostics peak "
      f"{diag_peak / GiB:.2f} GiB")
  out(f"device memory: {memory_gib:.1f} GiB ({memory_src})")
  if plan:
    chunks = num_prompts * g // max_rows
    out(f"largest max_decode_rows that fits: {max_rows} ({plan[0]} prompts "
        f"x {plan[1]} rollouts per chunk, {chunks} chunk(s) per step; "
        f"memory allows {fit_rows} rows)")
  else:
    out("largest max_decode_rows that fits: none: the resident state and "
        "one decode row already exceed the device memory")
  slots = report["slots"]
  if plan and c.refill:
    out(f"refill decode: {slots[0] * slots[1]} slots fit ({slots[0]} "
        f"prompts x {slots[1]} slots each, max_decode_rows="
        f"{min(fit_rows, num_prompts * g)})")
  if update_peak > budget:
    out(f"warning: the update needs {update_peak / GiB:.1f} GiB > "
        f"{memory_gib:.1f} GiB: lower algo.micro_batch_size, shard more "
        "(mesh.shape fsdp / tensor), or shorten the sequences")
  if diag_peak > budget:
    out(f"warning: the diagnostics need {diag_peak / GiB:.1f} GiB > "
        f"{memory_gib:.1f} GiB: lower diagnostics.rescore_rollouts")


def _summary(cfg, step: CompiledStep, report: dict, memory_gib: float,
             seconds: float) -> dict[str, Any]:
  """The JSON summary (GiB per device, fits, sources)."""
  peaks, budget = report["peaks"], report["budget"]
  word = lambda src: src.split(" ")[0] if src else ""  # noqa: E731
  return {
      "device_memory_gib": memory_gib,
      **{k: v / GiB for k, v in peaks.items()},
      "max_decode_rows_fit": report["max_rows"],
      "fits": all(v <= budget for v in peaks.values()),
      "compile_s": seconds,
      "sources": {"device_memory_gib": "analytic",
                  **{k: "sum" for k in peaks},
                  "max_decode_rows_fit": word(report["slope_src"])},
      "figures": {n.strip(): {"gib": v / GiB, "source": word(s)}
                  for n, v, s in report["figures"] if v is not None},
      "compiled": step.label, "platform": step.platform,
      "devices": len(step.devices), "mesh": dict(step.mesh.shape),
      "configured_max_decode_rows": cfg.rollout.max_decode_rows,
      "micro_batch_size": cfg.update.micro_batch_size,
      "sample_param_dtype": str(jnp.dtype(
          cfg.loop.sample_dtype(step.model_cfg)))}
