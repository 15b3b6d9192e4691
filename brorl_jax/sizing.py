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

The update is compiled at its longest length bucket alone (`_Builder.update`
says what the other `lax.switch` branches would add), on the TPU compiler
at the model's full depth (its remat temporaries are not linear in depth,
and its compile time barely grows with it), and every program is lowered
first and then compiled two at a time (`_compile_all`). The TPU compiler
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

import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from brorl_jax import aot_sizing, checkpointing, hf
from brorl_jax.aot import topology as gpu_topology
from brorl_jax.model.sharding import (SAMPLE_RULES, TRAIN_RULES, MeshRules,
                                      make_mesh)
from brorl_jax.model.transformer import Policy
from brorl_jax.rl import diagnostics as diag_lib
from brorl_jax.rl import train_state as ts_lib
from brorl_jax.rl.batch import RolloutBatch
from brorl_jax.rl.update import lower_update
from brorl_jax.rollout import sampling
from brorl_jax.rollout.sampler import (Prefill, Sampler, plan_chunks,
                                      refill_plan)
from brorl_jax.rollout.shared_prefix import SharedPrefixAttention

GiB = 2**30
# HBM per chip (GB) of TPU generations, by topology-name prefix.
TPU_HBM_GB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
DEFAULT_GB = 80.0  # H100


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


def per_device_bytes(tree: Any) -> float:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return float(total)


def _tpu_devices(topology: str):
  try:
    # Imported here: inside the try, so a JAX without it reports below.
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu",
                                        topology_name=topology).devices
  except Exception as e:  # ImportError, or libtpu missing / bad name
    raise SystemExit(
        f"error: --dry_run_topology={topology}: JAX cannot describe this TPU "
        f"topology here ({type(e).__name__}: {str(e).splitlines()[0]}). "
        "Install libtpu (pip install -e '.[tpu]') and name it as "
        "'<generation>:<chips x y z>', e.g. v5p:4x4x2 for a v5p-64 slice "
        "(32 chips, 64 TensorCores)") from None


@dataclasses.dataclass
class _Programs:
  """Compiled memory of one model depth."""

  prefill: Mem
  decode: dict[int, Mem]          # rows per chunk -> decode chunk
  update: Mem | None
  rescore: Mem | None             # diagnostics' re-scoring (None: off)


class _Builder:
  """Abstract shapes and shardings of one run at one model depth."""

  def __init__(self, cfg, model_cfg, mesh, num_layers: int):
    self.cfg = cfg
    self.policy = Policy.create(model_cfg.replace(num_layers=num_layers))
    self.train_rules = MeshRules(mesh, TRAIN_RULES)
    self.sample_rules = MeshRules(mesh, SAMPLE_RULES)
    self.rep = self.train_rules.replicated()
    samples = cfg.loop.prompts_per_step * cfg.rollout.n
    cfg.update.check_rows(samples)
    self.optimizer = ts_lib.make_optimizer(cfg.optim, samples)
    abstract = self.policy.abstract_params()
    with_sh = checkpointing.abstract_with_shardings
    self.params = with_sh(abstract, self.policy.shardings(self.train_rules))
    # The sampling copy: the sampling layout, in rollout.param_dtype (the
    # train loop's reshard casts it).
    sample_dtype = jnp.dtype(cfg.loop.sample_dtype(self.policy.cfg))
    self.sample_params = with_sh(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            a.shape, sample_dtype if jnp.issubdtype(a.dtype, jnp.floating)
            else a.dtype), abstract),
        self.policy.shardings(self.sample_rules))
    with_reference = cfg.loss.kl_coef > 0
    state_sh = ts_lib.state_shardings(
        abstract, self.policy.shardings(self.train_rules), self.optimizer,
        with_reference=with_reference, replicated=self.rep)
    self.state = with_sh(jax.eval_shape(lambda p: ts_lib.TrainState.create(
        p, self.optimizer, with_reference=with_reference), abstract),
                         state_sh)
    # Decoding needs no rematerialization (no backward pass); and nnx.remat
    # inside the decode while_loop fails to trace (flax TraceContextError),
    # so the sampler is sized without it.
    sample_policy = Policy.create(self.policy.cfg.replace(remat=False))
    self.sampler = Sampler(sample_policy, cfg.rollout, stop_ids=(0,),
                           pad_id=0, mesh_rules=self.sample_rules)

  def _sds(self, rules, shape, dtype, axes):
    return jax.ShapeDtypeStruct(shape, dtype,
                                sharding=rules.sharding(axes, shape))

  def prefill(self, sampler: Sampler | None = None) -> jax.stages.Lowered:
    sampler = sampler or self.sampler
    p, lp = self.num_prompts, sampler.cfg.max_prompt_len
    r = self.sample_rules
    tokens = self._sds(r, (p, lp), jnp.int32, ("batch", None))
    lengths = self._sds(r, (p,), jnp.int32, ("batch",))
    # The sampler's own program, lowered from abstract arguments.
    return sampler.lower_prefill(self.sample_params, tokens, lengths)

  @property
  def num_prompts(self) -> int:
    return self.cfg.advantage.prompts_to_sample(self.cfg.loop.prompts_per_step)

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
    batch = jax.tree.map(
        lambda s: self._sds(self.train_rules, s[0], s[1],
                            ("batch",) + (None,) * (len(s[0]) - 1)),
        shapes, is_leaf=lambda s: isinstance(s, tuple) and len(s) == 2
        and isinstance(s[0], tuple))
    return batch

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
        c.loss, self.optimizer,
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


def _compile_all(lowered: dict, log: Callable[[str], None],
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


def _row_plans(num_prompts: int, group: int, max_rows: int):
  """Two distinct decode-chunk plans (pc, gc): the configured one and one
  with about half its rows, for the memory per row."""
  first = plan_chunks(num_prompts, group, max_rows)
  rows = first[0] * first[1]
  for r in (rows // 2, rows // 4, rows * 2):
    second = plan_chunks(num_prompts, group, max(r, 1))
    if second[0] * second[1] != rows:
      return first, second
  return first, None


def _model_config(cfg) -> tuple[Any, str]:
  """The policy's ModelConfig: from `init.path` when it exists here (only
  config.json is read), else the config's `model` section."""
  path = cfg.init.path
  numerics = dict(param_dtype=cfg.model.param_dtype, dtype=cfg.model.dtype,
                  remat=cfg.model.remat,
                  attention_backend=cfg.model.attention_backend)
  if path is not None and (pathlib.Path(path)
                           / checkpointing.MODEL_CONFIG_FILE).exists():
    return (checkpointing.load_model_config(pathlib.Path(path))
            .replace(**numerics), path)
  if path is not None and (pathlib.Path(path) / "config.json").exists():
    raw = json.loads((pathlib.Path(path) / "config.json").read_text())
    return hf.config_from_hf(raw, param_dtype=numerics["param_dtype"],
                             dtype=numerics["dtype"]).replace(
                                 remat=cfg.model.remat,
                                 attention_backend=numerics[
                                     "attention_backend"]), path
  note = "the config's model section"
  if path is not None:
    note += f" (init.path {path} is not readable here)"
  return cfg.model, note


def _gpu_topology(topology: str | None):
  """The GPU topology `topology` names (None: none, or a TPU's name)."""
  if not topology:
    return None
  try:
    return gpu_topology.parse(topology)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None


def gpu_devices(gpu):
  """The compile-only devices of a GPU topology (exit 2 naming the fix)."""
  try:
    return gpu_topology.devices(gpu)
  except RuntimeError as e:
    print(f"error: --dry_run_topology={gpu}: {e}", file=sys.stderr)
    raise SystemExit(2) from None


def _default_memory_gib(devices, topology: str | None) -> tuple[float, str]:
  gpu = _gpu_topology(topology)
  if gpu:
    return (gpu.target.memory_bytes / GiB,
            f"{gpu.target.name}, {gpu.target.source}")
  if topology:
    gen = re.split(r"[:-]", topology)[0].lower()
    if gen in TPU_HBM_GB:
      return TPU_HBM_GB[gen], f"{gen} HBM per chip"
  stats = getattr(devices[0], "memory_stats", lambda: None)()
  if stats and stats.get("bytes_limit"):
    return stats["bytes_limit"] / GiB, "this device's JAX memory limit"
  return DEFAULT_GB, "an H100's 80 GiB (set --device_memory_gb)"


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
      e.g. "v5p:4x4x2"; None uses `jax.devices()`.
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
  gpu = _gpu_topology(topology)
  devices = (gpu_devices(gpu) if gpu else
             _tpu_devices(topology) if topology else jax.devices())
  mesh = make_mesh(cfg.mesh.shape, devices)
  model_cfg, model_source = _model_config(cfg)
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
    compiled = f"compiled ({backend})"
  else:
    compiled = (f"compiled ({backend}; {depths[0]}+{depths[1]} layers, "
                f"extrapolated to {depth})")

  def log(msg):
    print(f"[dry_run] {msg}", file=sys.stderr, flush=True)

  # Every program of every depth is lowered first (tracing holds the GIL),
  # then compiled side by side (`_compile_all`).
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
  full = _Builder(cfg, model_cfg, mesh, depth)
  # The TPU compiler's update temporaries are not linear in depth (BroRL,
  # v5p-64, longest bucket: 6.24 / 5.97 / 6.75 / 9.70 GiB at 2 / 4 / 8 /
  # 16 layers), while its compile time barely grows with depth (106 s at
  # 8 layers, 140 s at 16, alone): there the update compiles whole.
  update_depths = (depth,) if platform == "TPU" else depths
  if update_depths != depths:
    lower((depth, "update"), full.update)
  for d in depths:
    b = full if d == depth else _Builder(cfg, model_cfg, mesh, d)
    num_prompts = b.num_prompts
    plans = [p for p in _row_plans(num_prompts, cfg.rollout.n,
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
  mem = _compile_all(dict(sorted(lowered.items(),
                                 key=lambda kv: rank(kv[0]))), log, texts,
                     failed if gpu else None)
  if failures:
    for line in failures:
      out(line)
    raise SystemExit(1)
  progs = {d: _Programs(
      mem[d, "prefill"],
      {pc * gc: mem[d, f"decode chunk of {pc * gc} rows"] for pc, gc in plans},
      mem.get((d, "update")), mem[d, "diagnostics re-scoring"])
           for d in depths}
  if len(depths) == 1:
    m = progs[depth]
  else:
    a, z = progs[depths[0]], progs[depths[1]]
    ext = lambda x, y: x.lerp(y, depths[0], depths[1], depth)  # noqa: E731
    m = _Programs(ext(a.prefill, z.prefill),
                  {r: ext(a.decode[r], z.decode[r]) for r in a.decode},
                  (ext(a.update, z.update) if update_depths == depths
                   else mem[depth, "update"]),
                  a.rescore and ext(a.rescore, z.rescore))
  # The update is compiled at its longest length bucket (`_Builder.update`).
  update_src = (f"{compiled}, longest length bucket" if update_depths == depths
                else f"compiled ({backend}; {depth} layers, longest length "
                "bucket)")
  update_temp_src, cpu_upper = update_src, None
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
    update_temp_src = ("compiled 2 layers (CPU, longest length bucket) + "
                       "analytic remat-saved block inputs")

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
      model_cfg.head_dim * kv_item / max(mesh.size, 1)

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

  memory_gib, memory_src = ((device_memory_gb, "--device_memory_gb")
                            if device_memory_gb else
                            _default_memory_gib(devices, topology))
  budget = memory_gib * GiB
  fit_rows = int((budget - fixed_sampling) // slope) if slope > 0 else 0
  plan = (plan_chunks(num_prompts, g, fit_rows) if fit_rows >= 1 else None)
  max_rows = plan[0] * plan[1] if plan else 0

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
       update_temp_src),
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
  n_params = model_cfg.num_params()
  out(f"dry run: {len(devices)} {platform} devices, mesh "
      + " ".join(f"{k}={v}" for k, v in mesh.shape.items())
      + f"; model {n_params / 1e9:.2f}B parameters, {depth} layers "
      f"({model_source}), params {model_cfg.param_dtype}, compute "
      f"{model_cfg.dtype}")
  big_figure = max(v for _, v, _ in figures if v is not None)
  unit, scale = ("GiB", GiB) if big_figure >= GiB else ("MiB", 2**20)
  out(f"{'per-device memory':<66}{unit:>9}  source")
  for name, value, src in figures:
    out(name if value is None else f"{name:<66}{value / scale:>9.3f}  {src}")
  out(f"prefill phase peak {prefill_peak / GiB:.2f} GiB, decode phase peak "
      f"{sampling_peak / GiB:.2f} GiB (at max_decode_rows="
      f"{c.max_decode_rows}, chunks of {rows[-1]} rows), update phase peak "
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
  # The refill decode holds one KV row per slot, as a chunk row does.
  slots = refill_plan(num_prompts, g, fit_rows) if fit_rows >= 1 else None
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
  peaks = {"peak_prefill_gib": prefill_peak, "peak_decode_gib": sampling_peak,
           "peak_update_gib": update_peak,
           "peak_diagnostics_gib": diag_peak}
  word = lambda src: src.split(" ")[0] if src else ""  # noqa: E731
  summary = {
      "device_memory_gib": memory_gib,
      **{k: v / GiB for k, v in peaks.items()},
      "max_decode_rows_fit": max_rows,
      "fits": all(v <= budget for v in peaks.values()),
      "compile_s": time.perf_counter() - start,
      "sources": {"device_memory_gib": "analytic",
                  **{k: "sum" for k in peaks},
                  "max_decode_rows_fit": word(slope_src)},
      "figures": {n.strip(): {"gib": v / GiB, "source": word(s)}
                  for n, v, s in figures if v is not None},
      "compiled": compiled, "platform": platform, "devices": len(devices),
      "mesh": dict(mesh.shape),
      "configured_max_decode_rows": c.max_decode_rows,
      "micro_batch_size": cfg.update.micro_batch_size,
      "sample_param_dtype": str(jnp.dtype(
          cfg.loop.sample_dtype(model_cfg)))}
  if gpu:
    summary.update(aot_sizing.gpu_summary(
        cfg, model_cfg, gpu, mem=mem, texts=texts, depths=depths,
        depth=depth, table=table, resident=state_bytes, budget=budget,
        fits=summary["fits"], out=out))
  if json_path:
    pathlib.Path(json_path).write_text(json.dumps(summary, indent=1) + "\n")
    out(f"wrote {json_path}")
  return {**summary, "max_decode_rows": max_rows, "decode_plan": plan,
          "fit_rows": fit_rows, "refill_slots": slots,
          "sampling_peak_gib": sampling_peak / GiB,
          "update_peak_gib": update_peak / GiB,
          "prefill_peak_gib": prefill_peak / GiB,
          "per_row_bytes": slope,
          "figures": [(n, v / GiB, s) for n, v, s in figures
                      if v is not None],
          "compiled_label": compiled, "mesh": dict(mesh.shape)}
