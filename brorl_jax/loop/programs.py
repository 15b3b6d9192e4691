"""The dry run's compile side: the step's programs, from the run's builder,
lowered from abstract shapes and compiled ahead of time.

`compile_step` builds the configured mesh (the devices JAX has, or a TPU
topology's), lowers the programs that hold memory during an RL step from
`build.RunBuild` (the same optimizer, state layout and sampler the loop
uses) and compiles them two at a time:

  * the sampler's prefill of the step's prompts,
  * one decode chunk at two row counts (the memory per decoded row),
  * the update at its longest length bucket,
  * the diagnostics' re-scoring,
  * on the GPU compiler, every other program the loop runs
    (`aot_sizing.more_programs`: the refill decode, the evaluation's),

at two small depths extrapolated linearly in the layer count when the model
is deep (`sizing.py`'s docstring says why each choice). It returns their
compiled memory (`Mem`) and the labels saying where each figure comes from;
`sizing.py` turns them into the report.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from brorl_jax import aot_sizing
from brorl_jax.aot import devices as devices_lib
from brorl_jax.loop import build as build_lib
from brorl_jax.loop.build import PolicySource, RunBuild
from brorl_jax.model.sharding import make_mesh
from brorl_jax.rl import diagnostics as diag_lib
from brorl_jax.rl.batch import RolloutBatch
from brorl_jax.rl.update import lower_update
from brorl_jax.rollout import sampling
from brorl_jax.rollout.config import plan_chunks
from brorl_jax.rollout.sampler import Prefill, Sampler
from brorl_jax.rollout.shared_prefix import SharedPrefixAttention

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Mem:
  """A compiled program's per-device memory (bytes).

  Attributes:
    args: arguments; out: outputs; alias: outputs aliasing donated args;
    temp: the compiler's scratch peak.
  """

  args: float
  out: float
  alias: float
  temp: float

  @classmethod
  def of(cls, compiled) -> "Mem":
    m = compiled.memory_analysis()
    if m is None:
      raise RuntimeError("this backend gives no memory analysis")
    return cls(m.argument_size_in_bytes, m.output_size_in_bytes,
               m.alias_size_in_bytes, m.temp_size_in_bytes)

  @property
  def peak(self) -> float:
    return self.args + self.out - self.alias + self.temp

  def lerp(self, other: "Mem", x0: float, x1: float, x: float) -> "Mem":
    """Extrapolates to depth x >= x1 from compiles at depths x0 < x1.

    Linear through (x0, self) and (x1, other) where a figure grows with
    depth. Where it shrinks (a scheduler that chose another plan at the
    deeper compile, e.g. the TPU's remat scheduling at 2 vs 4 layers), the
    larger of the two compiled figures is kept: memory does not fall with
    depth, and a straight line would go negative.
    """
    def one(a, b):
      slope = max(b - a, 0.0) / (x1 - x0)
      return max(a, b) + slope * (x - x1)
    return Mem(*(one(a, b) for a, b in zip(
        dataclasses.astuple(self), dataclasses.astuple(other))))


def model_config(cfg) -> tuple[Any, str]:
  """(the policy's ModelConfig, where it came from): `init.path`'s when it
  is readable here (only its config file is read), else the config's
  `model` section."""
  path = cfg.init.path
  source = None if path is None else PolicySource.find(path)
  if source is not None:
    return build_lib.model_config(cfg, source), path
  note = "the config's model section"
  if path is not None:
    note += f" (init.path {path} is not readable here)"
  return cfg.model, note


@dataclasses.dataclass
class Programs:
  """Compiled memory of one model depth (or extrapolated to the full one)."""

  prefill: Mem
  decode: dict[int, Mem]          # rows per chunk -> decode chunk
  update: Mem | None
  rescore: Mem | None             # diagnostics' re-scoring (None: off)


class StepPrograms:
  """The step's programs of one run at one model depth, lowered from the
  builder's abstract state, sampling copy and sampler."""

  def __init__(self, cfg, model_cfg, mesh, num_layers: int):
    self.cfg = cfg
    cfg.update.check_rows(cfg.loop.prompts_per_step * cfg.rollout.n)
    self.build = RunBuild.create(
        cfg, model_cfg.replace(num_layers=num_layers), mesh=mesh)
    self.policy = self.build.policy
    self.train_rules = self.build.mesh_train
    self.sample_rules = self.build.mesh_sample
    self.rep = self.train_rules.replicated()
    self.state = self.build.abstract_state
    self.sample_params = self.build.abstract_sample_params
    # No tokenizer in a dry run: the stop and pad ids are placeholders
    # (they change no shape).
    self.sampler = self.build.make_sampler(stop_ids=(0,), pad_id=0)

  def _sds(self, rules, shape, dtype, axes):
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=rules.sharding(axes, shape))

  @property
  def num_prompts(self) -> int:
    return self.build.prompts_to_sample()

  def prefill(self, sampler: Sampler | None = None) -> jax.stages.Lowered:
    sampler = sampler or self.sampler
    p, lp = self.num_prompts, sampler.cfg.max_prompt_len
    r = self.sample_rules
    tokens = self._sds(r, (p, lp), jnp.int32, ("batch", None))
    lengths = self._sds(r, (p,), jnp.int32, ("batch",))
    # The sampler's own program, lowered from abstract arguments.
    return sampler.lower_prefill(self.sample_params, tokens, lengths)

  def decode(self, pc: int, gc: int, sampler: Sampler | None = None
             ) -> jax.stages.Lowered:
    sampler = sampler or self.sampler
    part = self.prefill_part(pc, sampler)
    keys = jax.eval_shape(lambda: sampling.row_keys(
        jax.random.key(0), jnp.arange(pc), jnp.arange(gc)))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=self.rep)
    return sampler.lower_decode(self.sample_params, part, keys, group=gc)

  def prefill_part(self, pc: int, sampler: Sampler | None = None) -> Prefill:
    """The prefill's outputs for `pc` prompts, abstract."""
    sampler = sampler or self.sampler
    mc, r = self.policy.cfg, self.sample_rules
    lp, dt = sampler.cfg.max_prompt_len, jnp.dtype(mc.dtype)
    # The prompt KV in the layouts the prefill stores it in.
    fresh = jax.ShapeDtypeStruct((pc, lp, mc.num_kv_heads, mc.head_dim), dt)
    k_shape, v_shape = (x.shape for x in jax.eval_shape(
        SharedPrefixAttention.prefix_layout, fresh, fresh))
    kv = lambda shape: tuple(self._sds(  # noqa: E731
        r, shape, dt, ("batch", "act_kv", None, None))
                             for _ in range(mc.num_layers))
    part = Prefill(
        k=kv(k_shape), v=kv(v_shape),
        valid=self._sds(r, (pc, lp), jnp.bool_, ("batch", None)),
        lengths=self._sds(r, (pc,), jnp.int32, ("batch",)),
        logits=self._sds(r, (pc, mc.vocab_size), jnp.float32,
                         ("batch", "act_vocab")))
    return part

  def batch(self) -> RolloutBatch:
    """The update's (and the diagnostics') batch: P groups, rows split
    over the data axes."""
    c = self.cfg
    p, g = c.loop.prompts_per_step, c.rollout.n
    lp, t = c.rollout.max_prompt_len, c.rollout.max_new_tokens
    shapes = RolloutBatch(
        prompt_tokens=((p, lp), jnp.int32), prompt_lengths=((p,), jnp.int32),
        tokens=((p, g, t), jnp.int32), logprobs=((p, g, t), jnp.float32),
        lengths=((p, g), jnp.int32), advantages=((p, g), jnp.float32),
        mask=((p, g), jnp.bool_))
    return jax.tree.map(
        lambda s: self._sds(self.train_rules, s[0], s[1],
                            ("batch",) + (None,) * (len(s[0]) - 1)),
        shapes, is_leaf=lambda s: isinstance(s, tuple) and len(s) == 2
        and isinstance(s[0], tuple))

  def update(self) -> jax.stages.Lowered:
    """The loop's update with its longest length bucket alone.

    The loop compiles one `lax.switch` branch per bucket
    (`rl/buckets.py`); a switch runs one branch at a time, and every
    tensor of a shorter bucket's branch is a shorter copy of the longest
    one's. On the CPU the whole switch's temporaries equal the longest
    branch's within 0.1 % (tested); on the TPU compiler each further
    branch costs as much compile time as the first, and the whole switch
    held 2.6 % more temporaries than its longest branch in the one
    comparison made (README, Known limitations).
    """
    c = self.cfg
    return lower_update(
        self.policy, dataclasses.replace(c.update, length_buckets=1),
        c.loss, self.build.optimizer,
        temperature=c.rollout.logprob_temperature,
        mesh_rules=self.train_rules, state=self.state, batch=self.batch())

  @property
  def rescored_rows(self) -> int:
    """Rollouts the diagnostics re-score per step (0: diagnostics off)."""
    c = self.cfg
    if c.diagnostics.every <= 0:
      return 0
    return min(c.diagnostics.rescore_rollouts,
               c.loop.prompts_per_step * c.rollout.n)

  def rescore(self) -> jax.stages.Lowered | None:
    """The diagnostics' re-scoring program, as the train loop jits it."""
    c, k = self.cfg, self.rescored_rows
    if k == 0:
      return None
    fn = diag_lib.jit_rescore(
        self.policy, mesh_rules=self.train_rules,
        temperature=c.rollout.logprob_temperature,
        vocab_chunk=c.update.vocab_chunk, seq_chunk=c.update.seq_chunk)
    rows = jax.ShapeDtypeStruct((k,), jnp.int32, sharding=self.rep)
    return fn.lower(self.state.params, self.batch(), rows)


# Programs compiled at once. XLA's compilers release the GIL, and the TPU
# compiler's passes keep about one core busy (BroRL's v5p programs: 117 %
# CPU alone on an idle 2-core machine), so two compiles side by side use a
# second core. Each compile holds its own working memory (a few GB for the
# 1.5B recipes on the TPU compiler): more at once would only add memory.
COMPILE_WORKERS = min(2, os.cpu_count() or 1)


def compile_all(lowered: dict, log: Callable[[str], None],
                texts: dict | None = None,
                failed: Callable | None = None) -> dict:
  """Compiles `{(depth, name): Lowered | None}`, `COMPILE_WORKERS` at a
  time in the given order (longest first packs best), logging each one's
  wall time; returns `{key: Mem | None}`. With `texts`, keeps each
  compiled program's HLO text there; with `failed(key, error)`, a program
  that does not compile is reported to it (its Mem is None)."""
  def compile_one(key):
    t = time.perf_counter()
    try:
      compiled = lowered[key].compile()
    except Exception as e:  # noqa: BLE001 (any compiler error is reported)
      if failed is None:
        raise
      failed(key, e)
      return None
    result = Mem.of(compiled)
    if texts is not None:
      texts[key] = compiled.as_text()
    log(f"{key[0]} layer(s): {key[1]} compiled in "
        f"{time.perf_counter() - t:.0f} s (arguments {result.args / GiB:.3f}"
        f" GiB, temporaries {result.temp / GiB:.3f} GiB)")
    return result
  with concurrent.futures.ThreadPoolExecutor(COMPILE_WORKERS) as pool:
    futures = {k: pool.submit(compile_one, k) for k, v in lowered.items()
               if v is not None}
    return {k: futures[k].result() if k in futures else None
            for k in lowered}


def row_plans(num_prompts: int, group: int, max_rows: int):
  """Two distinct decode-chunk plans (pc, gc): the configured one and one
  with about half its rows, for the memory per row."""
  first = plan_chunks(num_prompts, group, max_rows)
  rows = first[0] * first[1]
  for r in (rows // 2, rows // 4, rows * 2):
    second = plan_chunks(num_prompts, group, max(r, 1))
    if second[0] * second[1] != rows:
      return first, second
  return first, None


@dataclasses.dataclass
class CompiledStep:
  """The step's compiled memory at the full depth, and its provenance.

  Attributes:
    devices: the devices compiled for; platform: "CPU", "GPU" or "TPU".
    mesh: the configured mesh over them.
    model_cfg / model_source: the policy's config and where it came from.
    full: the step's programs at the full depth (abstract state, shapes).
    mem: the compiled (or extrapolated) memory of each program.
    label: "compiled (<backend>[; depths, extrapolated])".
    update_label / update_temp_label: where the update's figures (and its
      temporaries, on CPU with remat an estimate) come from.
    cpu_upper: the CPU-compiled remat temporaries the estimate replaced.
    depths: the depths compiled; raw: `{(depth, program): Mem | None}` as
      compiled.
    gpu: the GPU topology (None: not the GPU compiler); texts: the
      compiled HLO per program, and table: each program kind's attention
      backend (GPU only); failures: one line per program that did not
      lower or compile (GPU only: elsewhere a failure raises).
  """

  devices: Any
  platform: str
  mesh: Any
  model_cfg: Any
  model_source: str
  full: StepPrograms
  mem: Programs
  label: str
  update_label: str
  update_temp_label: str
  cpu_upper: float | None
  depths: tuple[int, ...]
  raw: dict
  gpu: Any = None
  texts: dict | None = None
  table: dict | None = None
  failures: list[str] = dataclasses.field(default_factory=list)


def compile_step(cfg, *, topology: str | None = None, layers: int = 0,
                 log: Callable[[str], None] = print) -> CompiledStep:
  """Lowers and compiles the step's programs for `cfg` (see `dry_run`'s
  `topology` and `layers`)."""
  devices, gpu = devices_lib.target_devices(topology)
  mesh = make_mesh(cfg.mesh.shape, devices)
  model_cfg, model_source = model_config(cfg)
  depth = model_cfg.num_layers
  # With remat the first layer is special (a 2-layer model already holds a
  # recomputed forward beside a backward); from 2 layers on, each adds only
  # the block input remat saves. The TPU scheduler's temporaries are not
  # monotone in depth either (ProRL arm, v5p: 30.3 / 43.8 / 30.9 GiB at 2 /
  # 3 / 4 layers), so remat models extrapolate from 2 and 4 layers.
  first, second = (2, 4) if model_cfg.remat else (1, 2)
  if layers >= depth or (layers == 0 and depth <= second + 1):
    depths = (depth,)
  else:
    depths = (first, max(layers, second))
  platform = ("GPU" if gpu else "TPU" if topology
              else devices[0].platform.upper())
  backend = (f"XLA:GPU compiler, {gpu.target.name}, topology {gpu} (ahead "
             "of time)" if gpu else
             f"TPU compiler, topology {topology} (ahead of time)" if topology
             else f"{platform} backend")
  if depths == (depth,):
    label = f"compiled ({backend})"
  else:
    label = (f"compiled ({backend}; {depths[0]}+{depths[1]} layers, "
             f"extrapolated to {depth})")

  # Every program of every depth is lowered first (tracing holds the GIL),
  # then compiled side by side (`compile_all`).
  t0 = time.perf_counter()
  lowered, plans, failures = {}, None, []
  table = aot_sizing.backends(model_cfg, platform.lower())
  where = str(gpu or topology or platform)

  def failed(key, error):
    failures.append(aot_sizing.failure_line(
        f"{key[1]} ({key[0]} layers)", aot_sizing.backend_of(key[1], table),
        error, where))

  def lower(key, build):
    try:
      lowered[key] = build()
    except Exception as e:  # noqa: BLE001 (lowering runs kernel checks)
      if not gpu:
        raise
      failed(key, e)
  full = StepPrograms(cfg, model_cfg, mesh, depth)
  # The TPU compiler's update temporaries are not linear in depth (BroRL,
  # v5p-64, longest bucket: 6.24 / 5.97 / 6.75 / 9.70 GiB at 2 / 4 / 8 /
  # 16 layers), while its compile time barely grows with depth (106 s at
  # 8 layers, 140 s at 16, alone): there the update compiles whole.
  update_depths = (depth,) if platform == "TPU" else depths
  if update_depths != depths:
    lower((depth, "update"), full.update)
  for d in depths:
    b = full if d == depth else StepPrograms(cfg, model_cfg, mesh, d)
    plans = [p for p in row_plans(b.num_prompts, cfg.rollout.n,
                                  cfg.rollout.max_decode_rows) if p]
    if update_depths == depths:
      lower((d, "update"), b.update)
    lower((d, "diagnostics re-scoring"), b.rescore)
    lower((d, "prefill"), b.prefill)
    for pc, gc in plans:
      lower((d, f"decode chunk of {pc * gc} rows"),
            lambda pc=pc, gc=gc: b.decode(pc, gc))
    if gpu:   # every program the loop runs, on the GPU compiler
      for name, build in aot_sizing.more_programs(b, cfg).items():
        try:
          lowered.update({(d, n): x for n, x in build().items()})
        except Exception as e:  # noqa: BLE001 (reported with the others)
          failed((d, name), e)
  log(f"lowered {sum(x is not None for x in lowered.values())} programs "
      f"({'+'.join(map(str, depths))} layers; the update at "
      f"{'+'.join(map(str, update_depths))}) in "
      f"{time.perf_counter() - t0:.0f} s; compiling them, "
      f"{COMPILE_WORKERS} at a time")
  # The slowest programs first (the updates, then the re-scorings).
  kinds = ("update", "diagnostics re-scoring", "prefill", "decode")
  rank = lambda k: next((i for i, n in enumerate(kinds)  # noqa: E731
                         if k[1].startswith(n)), len(kinds))
  texts = {} if gpu else None
  mem = compile_all(dict(sorted(lowered.items(),
                                key=lambda kv: rank(kv[0]))), log, texts,
                    failed if gpu else None)
  if failures:
    return CompiledStep(
        devices=devices, platform=platform, mesh=mesh, model_cfg=model_cfg,
        model_source=model_source, full=full, mem=None, label=label,
        update_label="", update_temp_label="", cpu_upper=None,
        depths=depths, raw=mem, gpu=gpu, texts=texts, table=table,
        failures=failures)
  progs = {d: Programs(
      mem[d, "prefill"],
      {pc * gc: mem[d, f"decode chunk of {pc * gc} rows"] for pc, gc in plans},
      mem.get((d, "update")), mem[d, "diagnostics re-scoring"])
           for d in depths}
  if len(depths) == 1:
    m = progs[depth]
  else:
    a, z = progs[depths[0]], progs[depths[1]]
    ext = lambda x, y: x.lerp(y, depths[0], depths[1], depth)  # noqa: E731
    m = Programs(ext(a.prefill, z.prefill),
                 {r: ext(a.decode[r], z.decode[r]) for r in a.decode},
                 (ext(a.update, z.update) if update_depths == depths
                  else mem[depth, "update"]),
                 a.rescore and ext(a.rescore, z.rescore))
  # The update is compiled at its longest length bucket
  # (`StepPrograms.update`).
  update_label = (f"{label}, longest length bucket" if update_depths == depths
                  else f"compiled ({backend}; {depth} layers, longest length "
                  "bucket)")
  update_temp_label, cpu_upper = update_label, None
  if platform == "CPU" and model_cfg.remat and len(depths) == 2:
    # XLA's CPU scheduler is not memory-aware: it runs the rematerialized
    # forwards early and keeps every layer's intermediates alive, so the
    # compiled CPU update grows by a whole layer's working set per layer
    # (a TPU compile adds only the saved block input). Estimate: the
    # 2-layer compile (two layers' working sets, an upper bound of one
    # backward beside one recomputed forward) + the block inputs remat
    # saves for every further layer.
    mb = cfg.update.micro_batch_size
    rows_dev = full.train_rules.sharding(("batch",), (mb,)).shard_shape(
        (mb,))[0]
    seq = cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens - 1
    saved = rows_dev * seq * model_cfg.embed_dim * jnp.dtype(
        model_cfg.dtype).itemsize
    cpu_upper = m.update.temp
    m.update = dataclasses.replace(
        m.update, temp=progs[2].update.temp + (depth - 2) * saved)
    update_temp_label = ("compiled 2 layers (CPU, longest length bucket) + "
                         "analytic remat-saved block inputs")
  return CompiledStep(
      devices=devices, platform=platform, mesh=mesh, model_cfg=model_cfg,
      model_source=model_source, full=full, mem=m, label=label,
      update_label=update_label, update_temp_label=update_temp_label,
      cpu_upper=cpu_upper, depths=depths, raw=mem, gpu=gpu, texts=texts,
      table=table)
