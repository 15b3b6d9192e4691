"""The dry run on the GPU compiler: what `sizing.dry_run` adds for
`--dry_run_topology=h100:8x1x8` (host code; no device is touched).

  * the programs the loop runs beyond those sized for memory: the refill
    decode (its first program and a segment at every suffix width the
    recipe can reach) and the evaluation's prefill and decode;
  * the attention backend each program compiles with;
  * compile failures as one line each (program, backend, the compiler's
    message) instead of a traceback, so a dry run lists them all;
  * the costs of the compiled programs (`aot.hlo_cost`), extrapolated in
    depth like the memory, and the step-time estimate built on them
    (`aot.estimate`).

It takes the dry run's program builder (`loop/programs.StepPrograms`) as
an argument (it never imports `sizing` or `loop/`): sizing keeps the memory
report, and both call in here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from brorl_jax.aot import estimate as est
from brorl_jax.aot import hlo_cost
from brorl_jax.model.attention_kernels import resolve_attention_backend
from brorl_jax.rollout import refill, sampling
from brorl_jax.rollout.sampler import Sampler, plan_chunks, refill_plan

REFILL_INIT = "refill first program"
REFILL_SEGMENT = "refill segment"
EVAL_PREFILL = "evaluation prefill"
EVAL_DECODE = "evaluation decode chunk"


def backends(model_cfg, platform: str) -> dict[str, str]:
  """{program kind: the attention it compiles with} on `platform`."""
  name = resolve_attention_backend(model_cfg.attention_backend, platform)
  full = name
  if name == "cudnn" and jnp.dtype(model_cfg.dtype).itemsize > 2:
    full = "pallas_gpu (cudnn has no float32 kernel)"
  suffix = ("pallas_gpu decode kernel" if name in ("cudnn", "pallas_gpu")
            else name)
  decode = f"prefix: XLA product; suffix: {suffix}"
  return {"prefill": full, "update": full, "diagnostics re-scoring": full,
          "decode": decode, "refill": decode, "evaluation prefill": full,
          "evaluation decode": decode, "evaluation refill": decode}


def backend_of(name: str, table: dict[str, str]) -> str:
  """The backend of program `name` (a key of sizing's lowered dict)."""
  for kind in sorted(table, key=len, reverse=True):
    if name.startswith(kind):
      return table[kind]
  return "?"


def refill_widths(sampler: Sampler) -> tuple[int, ...]:
  """Every suffix width a refill decode of `sampler` can compile."""
  c = sampler.cfg
  if refill.suffix_attention.reads_per_row(sampler.decode_backend):
    return (refill.suffix_width(0, c.segment_steps, c.max_new_tokens,
                                sampler.decode_backend),)
  bucket = -(-c.max_new_tokens // refill.WIDTH_BUCKETS)
  return tuple(sorted({min(c.max_new_tokens, k * bucket) for k in range(
      1, refill.WIDTH_BUCKETS + 1)}))


def refill_programs(b, sampler: Sampler | None = None, label: str = ""
                    ) -> dict[str, jax.stages.Lowered]:
  """The refill decode's programs for builder `b` (the dry run's
  `loop/programs.StepPrograms`): its first program once, then a segment at
  every width."""
  sampler = sampler or b.sampler
  c = sampler.cfg
  num_prompts = b.num_prompts
  pc, slots = refill_plan(num_prompts, c.n, c.max_decode_rows)
  part = b.prefill_part(pc, sampler=sampler)
  keys = jax.eval_shape(lambda: jax.vmap(jax.random.fold_in, (None, 0))(
      jax.random.key(0), jnp.arange(pc)))
  keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=b.rep)
  out = {}
  for width in refill_widths(sampler):
    # The segment's state as the first program at this width leaves it
    # (shapes and shardings): compiled, which is quick.
    init = sampler.lower_refill_init(part, keys, n=c.n, slots=slots,
                                     width=width)
    compiled = init.compile()
    state = jax.tree.map(
        lambda info, sh: jax.ShapeDtypeStruct(info.shape, info.dtype,
                                              sharding=sh),
        init.out_info, compiled.output_shardings)
    out.setdefault(f"{label}{REFILL_INIT} ({pc} prompts x {slots} slots)",
                   init)
    out[f"{label}{REFILL_SEGMENT} ({pc * slots} slots, suffix width "
        f"{width})"] = sampler.lower_refill_segment(
            b.sample_params, part, keys, state)
  return out


def eval_programs(b, eval_sampler_cfg) -> dict[str, jax.stages.Lowered]:
  """The evaluation's prefill and one decode program (chunk or refill) at
  its own sampler settings (n, max_new_tokens, max_decode_rows)."""
  sampler = Sampler(b.sampler.policy, eval_sampler_cfg, stop_ids=(0,),
                    pad_id=0, mesh_rules=b.sample_rules)
  out = {EVAL_PREFILL: b.prefill(sampler=sampler)}
  c = eval_sampler_cfg
  if c.refill:
    out.update(refill_programs(b, sampler, label="evaluation "))
  else:
    pc, gc = plan_chunks(b.num_prompts, c.n, c.max_decode_rows)
    out[f"{EVAL_DECODE} of {pc * gc} rows"] = b.decode(pc, gc,
                                                       sampler=sampler)
  return out


def failure_line(name: str, backend: str, error: BaseException,
                 where: str) -> str:
  """One line for a program that does not compile."""
  message = " ".join(str(error).split())
  if len(message) > 400:
    message = message[:400] + " ..."
  return (f"error: {name} does not compile for {where} (attention "
          f"{backend}): {type(error).__name__}: {message}")


def lerp_cost(a: hlo_cost.Cost, z: hlo_cost.Cost, x0: int, x1: int,
              x: int) -> hlo_cost.Cost:
  """Costs at depth x from depths x0 < x1 (linear per layer, as memory)."""
  def one(u, v):
    return u + (v - u) * (x - x0) / (x1 - x0)
  out = hlo_cost.Cost(flops=one(a.flops, z.flops),
                      bytes=one(a.bytes, z.bytes),
                      launches=one(a.launches, z.launches),
                      collective_bytes=one(a.collective_bytes,
                                           z.collective_bytes))
  for k in set(a.custom_bytes) | set(z.custom_bytes):
    out.custom_bytes[k] = one(a.custom_bytes.get(k, 0.0),
                              z.custom_bytes.get(k, 0.0))
  return out


@dataclasses.dataclass
class Costs:
  """Per-program costs at the model's depth: {name: (once, per step)};
  per step is None for programs without a dynamic loop."""

  table: dict[str, tuple[hlo_cost.Cost, hlo_cost.Cost | None]]

  @classmethod
  def of(cls, texts: dict[tuple[int, str], str], depths, depth) -> "Costs":
    def split(text):
      try:
        return hlo_cost.loop_costs(text)
      except ValueError:
        return hlo_cost.program_cost(text), None
    per = {k: split(t) for k, t in texts.items()}
    names = {n for _, n in per}
    table = {}
    for name in names:
      have = sorted(d for d, n in per if n == name)
      if have == [depth] or len(have) == 1:
        table[name] = per[have[-1], name]
        continue
      (a0, a1), (z0, z1) = per[have[0], name], per[have[1], name]
      table[name] = (lerp_cost(a0, z0, have[0], have[1], depth),
                     None if a1 is None else lerp_cost(a1, z1, have[0],
                                                       have[1], depth))
    return cls(table)

  def find(self, prefix: str):
    keys = [k for k in self.table if k.startswith(prefix)]
    return self.table[max(keys, key=len)] if keys else None


def step_estimate(cfg, model_cfg, costs: Costs, *, target, devices: int,
                  lengths: est.Lengths = est.Lengths(),
                  eff: est.Efficiency = est.Efficiency(),
                  refill_decode: bool | None = None) -> dict[str, Any]:
  """The estimate of one training step of `cfg` from the compiled costs
  (`refill_decode`: the decode to count, default the config's)."""
  c = cfg.rollout
  use_refill = c.refill if refill_decode is None else refill_decode
  prompts = cfg.advantage.prompts_to_sample(cfg.loop.prompts_per_step)
  kv = (2 * model_cfg.num_layers * model_cfg.num_kv_heads
        * model_cfg.head_dim * jnp.dtype(model_cfg.dtype).itemsize)
  drawn = lengths.draw(prompts, c.n, c.max_new_tokens)
  if use_refill:
    pc, slots = refill_plan(prompts, c.n, c.max_decode_rows)
    work = est.refill_work(drawn, pc, slots)
    (seg_once, step) = costs.find(REFILL_SEGMENT)
    init_once, _ = costs.find(REFILL_INIT)
    once = dataclasses.replace(init_once)
    once.add(seg_once, 1.0)
    decode = "refill"
  else:
    pc, gc = plan_chunks(prompts, c.n, c.max_decode_rows)
    work = est.fixed_chunk_work(drawn, pc, gc)
    once, step = costs.find(f"decode chunk of {pc * gc} rows")
    decode = "fixed chunks"
  kernel = sum(v for k, v in step.custom_bytes.items() if "triton" in k)
  update, _ = costs.find("update")
  prefill, _ = costs.find("prefill")
  notes = (
      f"decode: {decode} ({work.programs} program(s), {work.steps} steps); "
      "the compiled loop body is one step, its suffix kernel counted at "
      "each row's own length",
      "update: every micro-batch at the longest length bucket (an upper "
      "bound: shorter buckets cost less), skipped micro-batches counted",
      "collectives: overlapped with compute (not timed); host work "
      "(verifiers, logging) and the diagnostics not counted",
      f"lengths: lognormal, mean {lengths.mean_frac:.2f} x "
      f"{c.max_new_tokens} tokens, sigma {lengths.sigma}, "
      f"{lengths.capped:.0%} at the limit (drawn mean "
      f"{float(drawn.mean()):.0f}); no run of this recipe was measured")
  out = est.estimate(
      target=target, devices=devices, samples=prompts * c.n,
      prefill=prefill, decode_step=step, decode_once=once,
      suffix_kernel_bytes=kernel, work=work, kv_bytes_per_token=kv,
      update=update, eff=eff, lengths=lengths, notes=notes)
  out["decode"] = decode
  return out


def more_programs(b, cfg) -> dict[str, Any]:
  """{label: build() -> {program name: Lowered}}: the programs the loop
  runs besides prefill, fixed-chunk decode, update and diagnostics."""
  out = {REFILL_SEGMENT: lambda: refill_programs(b)}
  if cfg.eval.every > 0:
    out["evaluation"] = lambda: eval_programs(b, cfg.eval_sampler())
  return out


def _plugin_version() -> str:
  try:
    # Imported here: present only with the [gpu-aot] extra.
    from importlib import metadata
    return metadata.version("jax-cuda12-plugin")
  except Exception:  # noqa: BLE001
    return "?"


def gpu_summary(cfg, model_cfg, gpu, *, mem, texts, depths, depth, table,
                resident: float, budget: float, fits: bool, out
                ) -> dict[str, Any]:
  """The JSON keys a GPU dry run adds, and its report lines: the target,
  the compiler, each program's attention backend and peak, the refill's
  and the evaluation's peaks, and the step-time estimate."""
  gib = 2**30
  t = gpu.target
  at_depth = {}
  for (d, name), m in mem.items():
    if m is not None and (d == depth or d == max(depths)):
      at_depth.setdefault(name, {})[d] = m
  programs = {}
  for name, by_d in sorted(at_depth.items()):
    m = by_d[max(by_d)]
    programs[name] = {
        "attention": backend_of(name, table), "depth": max(by_d),
        "peak_gib": m.peak / gib, "temp_gib": m.temp / gib}
  extra_peaks = {}
  for name, m in mem.items():
    if m is None or name[0] != max(depths):
      continue
    for kind, key in ((REFILL_SEGMENT, "peak_refill_gib"),
                      ("evaluation", "peak_evaluation_gib")):
      if name[1].startswith(kind) or (kind == "evaluation"
                                      and "evaluation" in name[1]):
        extra_peaks[key] = max(extra_peaks.get(key, 0.0),
                               (resident + _lerped(mem, name[1], depths,
                                                   depth)) / gib)
  costs = Costs.of(texts, depths, depth)
  estimate = step_estimate(cfg, model_cfg, costs, target=t,
                           devices=gpu.num_devices)
  estimate["paper_samples_per_s"] = dict(est.PAPER_SAMPLES_PER_S)
  # The other decode at the same rows, from its own compiled program.
  other = step_estimate(cfg, model_cfg, costs, target=t,
                        devices=gpu.num_devices,
                        refill_decode=not cfg.rollout.refill)
  estimate["other_decode"] = {k: other[k] for k in (
      "decode", "decode_s", "decode_steps", "generation_samples_per_s")}
  for key, v in extra_peaks.items():
    out(f"{key[5:-4]} phase peak {v:.2f} GiB (compiled program + resident "
        "state)")
  out(f"estimate ({t.name} roofline from the XLA:GPU programs' FLOPs and "
      f"bytes; {estimate['decode']}): prefill {estimate['prefill_s']:.1f} "
      f"s, decode {estimate['decode_s']:.0f} s, update "
      f"{estimate['update_s']:.0f} s, step {estimate['step_s']:.0f} s; "
      f"generation {estimate['generation_samples_per_s']:.1f} samples/s "
      "(the paper on 64 H100s: BroRL 72.4, ProRL 36.5 samples/s); with "
      f"{other['decode']} instead: decode {other['decode_s']:.0f} s, "
      f"{other['generation_samples_per_s']:.1f} samples/s")
  return {
      "target": {"kind": t.kind, "name": t.name, "source": t.source,
                 "topology": str(gpu), "devices": gpu.num_devices,
                 "memory_gib": t.memory_bytes / gib,
                 "memory_bandwidth_gb_s": t.bandwidth / 1e9,
                 "bf16_peak_tflop_s": t.bf16_flops / 1e12},
      "compiler": (f"XLA:GPU (jax {jax.__version__}, jax-cuda12-plugin "
                   f"{_plugin_version()}), ahead of time, no GPU"),
      "attention_backends": {n: p["attention"] for n, p in programs.items()},
      "programs": programs, **extra_peaks,
      "fits_all_programs": all(v * gib <= budget
                               for v in extra_peaks.values()),
      # Every phase's peak, the refill's and the evaluation's included.
      "fits": bool(fits) and all(v * gib <= budget
                                 for v in extra_peaks.values()),
      "estimate": estimate}


def _lerped(mem, name: str, depths, depth: int) -> float:
  """A program's peak at the model's depth (linear from two depths)."""
  have = [d for d in depths if mem.get((d, name)) is not None]
  if len(have) == 1:
    return mem[have[0], name].peak
  a, z = mem[have[0], name], mem[have[1], name]
  return a.lerp(z, have[0], have[1], depth).peak
