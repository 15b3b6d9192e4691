"""The in-mesh group sampler: prefill each prompt once, decode G rollouts.

  prompts [P, Lp] --prefill (jit)--> prompt KV [P, Lp, K, H] per layer,
                                     first-token distribution [P, V]
  for each decode chunk of Pc prompts x Gc rollouts (<= max_decode_rows rows;
  the group is split first, so a chunk normally holds every prompt):
    decode (jit, lax.while_loop) with shared-prefix attention -> tokens,
    log-probs [Pc, Gc, T]; stops early once every row of the chunk is done.

Chunks are dispatched asynchronously, so the host can score chunk i while the
device decodes chunk i + 1 (`Sampler.chunks`).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from brorl_jax.config import check
from brorl_jax.model import attention as attn_lib
from brorl_jax.model import attention_kernels
from brorl_jax.model.sharding import MeshRules, activation_rules, constrain
from brorl_jax.model.transformer import Policy, positions_from_valid
from brorl_jax.rollout import refill, sampling, suffix_attention
from brorl_jax.rollout.config import SamplerConfig, plan_chunks, refill_plan
from brorl_jax.rollout.shared_prefix import SharedPrefixAttention


@struct.dataclass
class Prefill:
  """The prompts' shared state after one prefill.

  Attributes:
    k, v: per layer, RoPE applied: keys [P, K, H, Lp], values [P, K, Lp, H]
      (`SharedPrefixAttention.prefix_layout`).
    valid: [P, Lp] bool, real prompt tokens (left padding False).
    lengths: [P] int32 prompt lengths.
    logits: [P, V] float32 next-token logits at the last prompt position.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  lengths: jax.Array
  logits: jax.Array


@struct.dataclass
class Rollouts:
  """Sampled rollouts.

  Attributes:
    tokens: [P, G, T] int32; `pad_id` after a row's end.
    logprobs: [P, G, T] float32 log-probs of the sampled tokens under
      softmax(logits / temperature); 0 after a row's end.
    lengths: [P, G] int32 generated tokens, the stop token included.
    stopped: [P, G] bool, ended by a stop token (False: truncated at T).
    first_probs: [P, V] float32 pre-update distribution of the first
      response token, softmax(logits / temperature) (mass-balance input).
    finished_slots: int32, decode row-steps spent on rows already done.
    total_slots: int32, all decode row-steps executed.
  """

  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  stopped: jax.Array
  first_probs: jax.Array
  finished_slots: jax.Array
  total_slots: jax.Array


@struct.dataclass
class _DecodeState:
  t: jax.Array                    # index of the last sampled token
  tokens: jax.Array               # [Pc, Gc, T]
  logprobs: jax.Array             # [Pc, Gc, T]
  lengths: jax.Array              # [Pc, Gc]
  done: jax.Array                 # [Pc, Gc]
  suffix_k: tuple[jax.Array, ...]  # per layer [Pc*Gc, K, H, T]
  suffix_v: tuple[jax.Array, ...]  # per layer [Pc*Gc, K, T, H]
  finished_slots: jax.Array


def ended_by_stop(tokens: jax.Array, lengths: jax.Array, stop: jax.Array
                  ) -> jax.Array:
  """[..] bool: the row's last token is a stop token (else: truncated)."""
  last = jnp.take_along_axis(tokens, (lengths - 1)[..., None], -1)[..., 0]
  return jnp.isin(last, stop)


class Sampler:
  """Generates G rollouts per prompt with shared-prefix decoding.

  Args:
    policy: the model definition.
    cfg: sampling settings.
    stop_ids: token ids that end a rollout (eos, end-of-turn, ...).
    pad_id: id written after a rollout's end (masks come from lengths).
    mesh_rules: mesh + sampling rule table (None: single device).
  """

  def __init__(self, policy: Policy, cfg: SamplerConfig, *,
               stop_ids: Sequence[int], pad_id: int,
               mesh_rules: MeshRules | None = None):
    check(len(stop_ids) > 0, f"{cfg.section}.stop_ids",
          "at least one stop token is needed")
    total = cfg.max_prompt_len + cfg.max_new_tokens
    check(total <= policy.cfg.max_position_embeddings,
          f"{cfg.section}.max_new_tokens",
          f"max_prompt_len + max_new_tokens = {total} exceeds the model's "
          f"max_position_embeddings {policy.cfg.max_position_embeddings}")
    # Decoding keeps no activations for a backward pass: rematerialization
    # would only add recompute (and nnx.remat cannot run in the decode
    # while_loop's trace). The parameter tree is the same.
    self.policy = (Policy.create(policy.cfg.replace(remat=False))
                   if policy.cfg.remat else policy)
    self.cfg = cfg
    self.stop_ids = tuple(int(i) for i in stop_ids)
    self.pad_id = int(pad_id)
    self.mesh_rules = mesh_rules
    devices = (jax.devices() if mesh_rules is None
               else mesh_rules.mesh.devices.flat)
    platform = next(iter(devices)).platform
    self.decode_backend = attention_kernels.resolve_attention_backend(
        policy.cfg.attention_backend, platform)
    # A GPU/TPU kernel asked for on CPU runs its exact program interpreted
    # (slow; for tests).
    self._interpret = platform == "cpu"
    self._prefill = jax.jit(self._prefill_fn)
    self._decode = jax.jit(self._decode_fn, static_argnames=("group",))
    self._refill_init = jax.jit(self._refill_init_fn,
                                static_argnames=("n", "slots", "width"))
    self._refill_segment = jax.jit(self._refill_segment_fn,
                                   donate_argnames=("state",))
    self._fit_width = jax.jit(self._fit_width_fn,
                              static_argnames=("width", "axis", "lead"))
    self._refill_extent = jax.jit(refill.RefillState.extent)
    # Jitted: traced eagerly, the nested vmaps cost ~10 ms of host time per
    # chunk (measured at N = 64).
    self._row_keys = jax.jit(sampling.row_keys)
    self._prompt_keys = jax.jit(jax.vmap(jax.random.fold_in, (None, 0)))

  # ---- device code ---------------------------------------------------------

  def _prefill_fn(self, params, tokens, lengths) -> Prefill:
    with activation_rules(self.mesh_rules):
      model = self.policy.bind(params)
      lp = tokens.shape[1]
      valid = jnp.arange(lp)[None, :] >= (lp - lengths)[:, None]
      hidden, kv = model(
          tokens, positions_from_valid(valid),
          attn_lib.FullAttention(
              valid, backend=self.policy.cfg.attention_backend,
              return_kv=True))
      # Left padding puts every prompt's last token at position Lp - 1.
      logits = model.logits(hidden[:, -1:])[:, 0]            # [P, V]
      kv = [SharedPrefixAttention.prefix_layout(k, v) for k, v in kv]
      return Prefill(k=tuple(c[0] for c in kv), v=tuple(c[1] for c in kv),
                     valid=valid, lengths=lengths.astype(jnp.int32),
                     logits=logits)

  def _sample(self, logits, keys, step):
    c = self.cfg
    return sampling.sample(logits, keys, step, temperature=c.temperature,
                           top_k=c.top_k, top_p=c.top_p, greedy=c.greedy)

  def _decode_fn(self, params, prefill: Prefill, keys, group: int,
                 steps=None, limits=None):
    """Decodes `group` rollouts for every prompt of `prefill`.

    `steps` (None, or an int32 scalar, traced: any value reuses the compiled
    loop) caps the tokens per row below max_new_tokens. `limits` ([Pc, Gc]
    int32, optional) ends each row at that many tokens (a per-rollout length
    budget; the sampler bench's stop rule).
    """
    with activation_rules(self.mesh_rules):
      return self._decode_traced(params, prefill, keys, group, steps, limits)

  def _decode_traced(self, params, prefill, keys, group, steps, limits):
    cfg, mcfg = self.cfg, self.policy.cfg
    model = self.policy.bind(params)
    pc, t_max = prefill.logits.shape[0], cfg.max_new_tokens
    last = t_max if steps is None else jnp.minimum(steps, t_max)
    stop = jnp.asarray(self.stop_ids, jnp.int32)
    first = jnp.broadcast_to(prefill.logits[:, None, :],
                             (pc, group, prefill.logits.shape[-1]))
    tok0, lp0 = self._sample(first, keys, jnp.int32(0))       # [Pc, Gc]
    if limits is None:
      limits = jnp.full((pc, group), t_max, jnp.int32)
    tokens = jnp.full((pc, group, t_max), self.pad_id, jnp.int32)
    tokens = constrain(tokens.at[:, :, 0].set(tok0), ("batch", "group", None))
    logprobs = jnp.zeros((pc, group, t_max), jnp.float32).at[:, :, 0].set(lp0)
    suffix = [SharedPrefixAttention.empty_suffix(
        pc, group, t_max, mcfg.num_kv_heads, mcfg.head_dim, model.dtype,
        self.decode_backend) for _ in range(mcfg.num_layers)]
    state = _DecodeState(
        t=jnp.int32(0), tokens=tokens, logprobs=logprobs,
        lengths=jnp.ones((pc, group), jnp.int32),
        done=jnp.isin(tok0, stop) | (limits <= 1),
        suffix_k=tuple(k for k, _ in suffix),
        suffix_v=tuple(v for _, v in suffix),
        finished_slots=jnp.int32(0))

    def cond(s: _DecodeState):
      more = s.t < last - 1
      return more & ~jnp.all(s.done) if cfg.early_stop else more

    def body(s: _DecodeState) -> _DecodeState:
      x = jax.lax.dynamic_index_in_dim(s.tokens, s.t, 2, keepdims=False)
      positions = jnp.broadcast_to((prefill.lengths + s.t)[:, None],
                                   (pc, group))
      caches = tuple(zip(prefill.k, prefill.v, s.suffix_k, s.suffix_v))
      hidden, caches = model(
          x.reshape(pc * group, 1), positions.reshape(pc * group, 1),
          SharedPrefixAttention(prefix_valid=prefill.valid, step=s.t,
                                backend=self.decode_backend,
                                interpret=self._interpret),
          caches)
      logits = model.logits(hidden)[:, 0].reshape(pc, group, -1)
      tok, lp = self._sample(logits, keys, s.t + 1)
      tok = jnp.where(s.done, self.pad_id, tok)
      lp = jnp.where(s.done, 0.0, lp)
      lengths = s.lengths + (~s.done).astype(jnp.int32)
      return _DecodeState(
          t=s.t + 1,
          tokens=jax.lax.dynamic_update_index_in_dim(s.tokens, tok, s.t + 1,
                                                     2),
          logprobs=jax.lax.dynamic_update_index_in_dim(s.logprobs, lp,
                                                       s.t + 1, 2),
          lengths=lengths,
          done=s.done | jnp.isin(tok, stop) | (lengths >= limits),
          suffix_k=tuple(c[2] for c in caches),
          suffix_v=tuple(c[3] for c in caches),
          finished_slots=s.finished_slots + jnp.sum(s.done, dtype=jnp.int32))

    s = jax.lax.while_loop(cond, body, state)
    return dict(tokens=s.tokens, logprobs=s.logprobs, lengths=s.lengths,
                stopped=ended_by_stop(s.tokens, s.lengths, stop),
                finished_slots=s.finished_slots,
                total_slots=s.t * pc * group)

  def _refill_init_fn(self, prefill: Prefill, prompt_keys, limits, n: int,
                      slots: int, width: int) -> refill.RefillState:
    mcfg = self.policy.cfg
    if limits is None:
      limits = jnp.full((prefill.logits.shape[0], n), self.cfg.max_new_tokens,
                        jnp.int32)
    with activation_rules(self.mesh_rules):
      return refill.init_state(
          prefill.logits, prompt_keys, limits, slots=slots,
          t_max=self.cfg.max_new_tokens,
          stop=jnp.asarray(self.stop_ids, jnp.int32), pad_id=self.pad_id,
          sample=self._sample, suffix_shape=(mcfg.num_kv_heads,
                                             mcfg.head_dim, mcfg.dtype),
          num_layers=mcfg.num_layers, width=width,
          backend=self.decode_backend)

  def _fit_width_fn(self, x, width: int, axis: int, lead: tuple[int, int]):
    with activation_rules(self.mesh_rules):
      return refill.fit_width(x, width, axis, lead)

  def _refill_segment_fn(self, params, prefill: Prefill, prompt_keys, limits,
                         state: refill.RefillState, max_steps
                         ) -> refill.RefillState:
    if limits is None:
      limits = jnp.full(state.lengths.shape, self.cfg.max_new_tokens,
                        jnp.int32)
    with activation_rules(self.mesh_rules):
      return refill.run_segment(
          self.policy.bind(params), prefill, prompt_keys, limits, state,
          max_steps, stop=jnp.asarray(self.stop_ids, jnp.int32),
          sample=self._sample, backend=self.decode_backend,
          interpret=self._interpret)

  # ---- host API ------------------------------------------------------------

  def check_prompts(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
    """Raises ValueError naming the first prompt that does not fit."""
    lp = self.cfg.max_prompt_len
    if tokens.shape[1] != lp:
      raise ValueError(
          f"prompt batch is {tokens.shape[1]} tokens wide; the sampler needs "
          f"prompts left-padded to {self.cfg.section}.max_prompt_len={lp}")
    bad = np.flatnonzero((lengths > lp) | (lengths < 1))
    if bad.size:
      i = int(bad[0])
      raise ValueError(
          f"prompt {i} has {int(lengths[i])} tokens; allowed 1..{lp} "
          f"({self.cfg.section}.max_prompt_len). Prompts are never "
          "truncated: filter them in the data pipeline (it counts them) or "
          "raise max_prompt_len")

  def prefill(self, params, tokens, lengths) -> Prefill:
    """Runs the prompts once (async; returns device arrays)."""
    if isinstance(lengths, np.ndarray):
      self.check_prompts(np.asarray(tokens), lengths)
    return self._prefill(params, jnp.asarray(tokens, jnp.int32),
                         jnp.asarray(lengths, jnp.int32))

  def lower_prefill(self, params, tokens, lengths) -> jax.stages.Lowered:
    """The prefill program lowered for (abstract) arguments: the dry run
    compiles it to read its memory without running it."""
    return self._prefill.lower(params, tokens, lengths)

  def lower_decode(self, params, prefill: Prefill, keys, *, group: int,
                   limits=None) -> jax.stages.Lowered:
    """The decode program of one chunk, lowered for (abstract) arguments
    (`limits`: the chunk's [Pc, Gc] length limits, as `chunks` passes)."""
    return self._decode.lower(params, prefill, keys, group=group,
                              limits=limits)

  def lower_refill_init(self, prefill: Prefill, prompt_keys, *, n: int,
                        slots: int, width: int) -> jax.stages.Lowered:
    """The refill decode's first program (first tokens, slots filled),
    lowered for (abstract) arguments; `segments` runs it once per part."""
    return self._refill_init.lower(prefill, prompt_keys, None, n=n,
                                   slots=slots, width=width)

  def lower_refill_segment(self, params, prefill: Prefill, prompt_keys,
                           state: refill.RefillState) -> jax.stages.Lowered:
    """One refill segment program (a state of one suffix width), lowered
    for (abstract) arguments; `segments` runs it until every slot idles."""
    return self._refill_segment.lower(params, prefill, prompt_keys, None,
                                      state, jnp.int32(self.cfg.segment_steps))

  def chunks(self, params, prefill: Prefill, rng: jax.Array, *,
             n: int | None = None, prompt_offset: int = 0,
             steps: int | None = None, length_limits=None
             ) -> Iterator[tuple[slice, slice, dict]]:
    """Dispatches the decode chunks one by one.

    Yields `(prompt slice, rollout slice, outputs)` as soon as each chunk is
    dispatched (outputs are device arrays still being computed), so a caller
    can fetch and score chunk i while chunk i + 1 decodes.

    Args:
      params: parameters in the sampling layout.
      prefill: output of `prefill`.
      rng: the iteration's sampling key.
      n: rollouts per prompt (default `cfg.n`).
      prompt_offset: global index of prompt 0 (keys are per global prompt).
      steps: decode at most this many tokens per row (default
        max_new_tokens) in buffers of max_new_tokens: the sampler bench
        times a fixed number of steps at two buffer sizes this way.
      length_limits: optional [P, n] int32 per-rollout length budgets.
    """
    n = self.cfg.n if n is None else n
    num_prompts = prefill.logits.shape[0]
    pc, gc = plan_chunks(num_prompts, n, self.cfg.max_decode_rows)
    for p0 in range(0, num_prompts, pc):
      part = jax.tree.map(lambda x: x[p0:p0 + pc], prefill)
      for g0 in range(0, n, gc):
        keys = self._row_keys(
            rng, jnp.arange(prompt_offset + p0, prompt_offset + p0 + pc),
            jnp.arange(g0, g0 + gc))
        limits = (None if length_limits is None else jnp.asarray(
            length_limits, jnp.int32)[p0:p0 + pc, g0:g0 + gc])
        yield (slice(p0, p0 + pc), slice(g0, g0 + gc),
               self._decode(params, part, keys, group=gc,
                            steps=None if steps is None else jnp.int32(steps),
                            limits=limits))

  def segments(self, params, prefill: Prefill, rng: jax.Array, *,
               n: int | None = None, prompt_offset: int = 0,
               length_limits=None
               ) -> Iterator[tuple[slice, refill.RefillState, bool]]:
    """Runs the refill decode one segment at a time.

    Yields `(prompt slice, state, last)` after each segment of at most
    `cfg.segment_steps` steps; `last` is True on a prompt slice's final
    segment. The state's buffers are donated to the next segment: read what
    you need from it (finished rollouts: `state.done`) before resuming.
    Deciding whether to go on reads one replicated scalar per segment (on
    several hosts: one small all-reduce), never one per step: the busy
    slots' extent, which also sets the next segment's suffix width
    (`refill.suffix_width`; a width not seen before is a compile).

    Args: as `chunks`.
    """
    n = self.cfg.n if n is None else n
    num_prompts = prefill.logits.shape[0]
    pc, slots = refill_plan(num_prompts, n, self.cfg.max_decode_rows)
    steps, t_max = self.cfg.segment_steps, self.cfg.max_new_tokens
    seg = jnp.int32(steps)
    for p0 in range(0, num_prompts, pc):
      part = jax.tree.map(lambda x: x[p0:p0 + pc], prefill)
      keys = self._prompt_keys(rng, jnp.arange(prompt_offset + p0,
                                               prompt_offset + p0 + pc))
      limits = (None if length_limits is None else jnp.asarray(
          length_limits, jnp.int32)[p0:p0 + pc])
      width = refill.suffix_width(0, steps, t_max, self.decode_backend)
      state = self._refill_init(part, keys, limits, n=n, slots=slots,
                                width=width)
      while True:
        state = self._refill_segment(params, part, keys, limits, state, seg)
        extent = int(self._refill_extent(state))
        yield slice(p0, p0 + pc), state, extent == 0
        if extent == 0:
          break
        width = refill.suffix_width(extent, steps, t_max,
                                    self.decode_backend)
        if width != state.width:
          state = self._resize_suffix(state, width)

  def _resize_suffix(self, state: refill.RefillState, width: int
                     ) -> refill.RefillState:
    """The state with its suffix buffers `width` slots wide.

    One layer's buffer at a time, each old buffer deleted once its copy is
    dispatched: the transient is one layer's buffer, not a second cache.
    """
    lead = state.slot_rollout.shape
    out = {}
    time_major = suffix_attention.keys_time_major(self.decode_backend)
    key_axis = 2 if time_major else 3
    for name, axis in (("suffix_k", key_axis), ("suffix_v", 2)):
      new = []
      for x in getattr(state, name):
        new.append(self._fit_width(x, width=width, axis=axis, lead=lead))
        x.delete()
      out[name] = tuple(new)
    return state.replace(**out)

  def assemble_refill(self, prefill: Prefill,
                      finals: Sequence[refill.RefillState]) -> Rollouts:
    """The final states of `segments`' prompt slices -> `Rollouts`."""
    cat = lambda f: jnp.concatenate([f(s) for s in finals], 0)  # noqa: E731
    stop = jnp.asarray(self.stop_ids, jnp.int32)
    return Rollouts(
        tokens=cat(lambda s: s.tokens), logprobs=cat(lambda s: s.logprobs),
        lengths=cat(lambda s: s.lengths),
        stopped=cat(lambda s: ended_by_stop(s.tokens, s.lengths, stop)),
        first_probs=self.first_probs(prefill),
        finished_slots=sum(s.total_slots - s.busy_slots for s in finals),
        total_slots=sum(s.total_slots for s in finals))

  def first_probs(self, prefill: Prefill) -> jax.Array:
    """[P, V] softmax(logits / T) of the first response token."""
    return jax.nn.softmax(prefill.logits / self.cfg.logprob_temperature,
                          axis=-1)

  def generate(self, params, tokens, lengths, rng: jax.Array, *,
               n: int | None = None, prompt_offset: int = 0,
               length_limits=None) -> Rollouts:
    """Prefill + all decode chunks; returns the assembled rollouts.

    Args:
      params: parameters in the sampling layout.
      tokens: [P, Lp] int32 prompts, left-padded to max_prompt_len.
      lengths: [P] prompt lengths.
      rng: the iteration's sampling key.
      n: rollouts per prompt (default `cfg.n`).
      prompt_offset: global index of prompt 0.
      length_limits: optional [P, n] per-rollout length budgets (<= T).
    """
    prefill = self.prefill(params, tokens, lengths)
    if self.cfg.refill:
      finals = [state for _, state, last in self.segments(
          params, prefill, rng, n=n, prompt_offset=prompt_offset,
          length_limits=length_limits) if last]
      return self.assemble_refill(prefill, finals)
    outs = list(self.chunks(params, prefill, rng, n=n,
                            prompt_offset=prompt_offset,
                            length_limits=length_limits))
    return self.assemble(prefill, outs)

  def assemble(self, prefill: Prefill, outs) -> Rollouts:
    """Concatenates chunk outputs (in `chunks` order) into `Rollouts`."""
    rows: dict[int, list[dict]] = {}
    for p_slice, _, out in outs:
      rows.setdefault(p_slice.start, []).append(out)
    def cat(key, axis_g):
      per_p = [jnp.concatenate([o[key] for o in row], axis=axis_g)
               for _, row in sorted(rows.items())]
      return jnp.concatenate(per_p, axis=0)
    return Rollouts(
        tokens=cat("tokens", 1), logprobs=cat("logprobs", 1),
        lengths=cat("lengths", 1), stopped=cat("stopped", 1),
        first_probs=self.first_probs(prefill),
        finished_slots=sum(o["finished_slots"] for _, _, o in outs),
        total_slots=sum(o["total_slots"] for _, _, o in outs))
