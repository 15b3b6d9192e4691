"""The RL loop: `python -m brorl_jax.train --config C --workdir W`.

  python -m brorl_jax.train --config C --workdir W [--config.a.b=v ...]
  python -m brorl_jax.train --config C [--config.a.b=v ...] --print_config
  python -m brorl_jax.train --config C --dry_run [--device_memory_gb G]

One SPMD program: every host runs this loop; the sampler and the trainer
share one set of parameters on one mesh. One iteration:

  prompts (host) -> rollouts (device) | scored on host, overlapped ->
  advantages (device) -> update (device, donated) -> diagnostics -> metrics,
  checkpoint, evaluation.

Running `train` again on the same workdir resumes from its last checkpoint.
On SIGTERM the in-flight iteration is abandoned and the last completed state
is saved before exiting 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from brorl_jax import checkpointing
from brorl_jax import cli
from brorl_jax import distributed
from brorl_jax import experiment as exp_lib
from brorl_jax import run_config
from brorl_jax import scoring
from brorl_jax import sizing
from brorl_jax import workdir as workdir_lib
from brorl_jax.evaluate import Evaluator, eval_key
from brorl_jax.metrics import MetricsWriter
from brorl_jax.model.sharding import reshard
from brorl_jax.progress import Progress
from brorl_jax.rl import batch as batch_lib
from brorl_jax.rl import diagnostics as diag_lib
from brorl_jax.rl import train_state as ts_lib
from brorl_jax.rl import update as update_lib
from brorl_jax.rollout_archive import RolloutArchive
from brorl_jax.warmstart import run_warmstart

log = logging.getLogger("brorl_jax.train")

# Purposes folded into the step's key (STYLE.md §13).
ROLLOUT, UPDATE, EVAL, DIAG = 1, 2, 3, 4


class Preemption:
  """SIGTERM sets a flag; the loop checks it between phases."""

  def __init__(self):
    self.requested_at: float | None = None
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested_at is None:
      self.requested_at = time.monotonic()
      log.warning("SIGTERM: abandoning the in-flight iteration")

  def requested(self) -> bool:
    """True on every process once any process was asked to stop."""
    flag = self.requested_at is not None
    if jax.process_count() > 1:
      flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return flag

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _to_host(metrics: dict[str, Any]) -> dict[str, float]:
  """Device scalars -> Python numbers (one explicit transfer)."""
  values = jax.device_get(metrics)
  return {k: (v.item() if hasattr(v, "item") else v)
          for k, v in values.items()}


def _global_verify_stats(local: dict[str, float], verifiers) -> dict:
  """The reward pool's counters (rewards/stats.py) over all processes.

  Each process scores only its own rollouts; means are re-weighted by the
  per-process counts. `verifiers` (the step's records' verifier names, the
  same on every process) fixes the keys every process contributes.
  """
  if jax.process_count() == 1:
    return local
  names = sorted(verifiers)
  sums = dict(local)
  for v in names:  # means -> sums, so they add up over processes
    count = local.get(f"{v}/count", 0)
    for m in ("mean_reward", "mean_latency_s"):
      sums[f"{v}/{m}"] = local.get(f"{v}/{m}", 0.0) * count
  keys = ["items", "timeouts", "errors", "restarts", "recycled"] + [
      f"{v}/{k}" for v in names for k in ("count", "mean_reward",
                                          "mean_latency_s", "timeouts",
                                          "errors")]
  total = distributed.sum_over_processes(sums, keys)
  out = {k: int(round(total[k])) for k in keys}
  for v in names:
    for m in ("mean_reward", "mean_latency_s"):
      out[f"{v}/{m}"] = total[f"{v}/{m}"] / max(total[f"{v}/count"], 1)
  return out


class Trainer:
  """Builds every part once; `run()` is the loop."""

  def __init__(self, cfg: run_config.RunConfig, workdir):
    exp_lib.setup_jax(cfg)
    # Config and workdir checks before anything expensive or written.
    workdir = workdir_lib.preflight(cfg, workdir)
    workdir_lib.record_config(workdir, cfg.raw)
    self.cfg = cfg
    self.exp = exp = exp_lib.build(cfg, workdir)
    self.workdir = exp.workdir
    self.policy = exp.policy
    self.tokenizer = exp.tokenizer
    self.pipeline = exp.pipeline()
    self.pool = exp.reward_pool()
    self.sampler = exp.sampler()
    self.num_groups = cfg.loop.prompts_per_step
    self.group = cfg.rollout.n
    samples = self.num_groups * self.group
    self.optimizer = ts_lib.make_optimizer(cfg.optim, samples)
    self.lr_schedule = cfg.optim.schedule_fn(samples)
    self.sample_shardings = exp.param_shardings(sampling=True)
    self.sample_dtype = cfg.loop.sample_dtype(exp.policy.cfg)
    self.batch_cfg = batch_lib.BatchConfig(
        num_groups=self.num_groups, max_new_tokens=cfg.rollout.max_new_tokens,
        correct_threshold=cfg.rewards.correct_threshold,
        advantage=cfg.advantage, shaping=cfg.shaping)
    self._prepare = jax.jit(batch_lib.prepare, static_argnums=0)
    self.state_sh = ts_lib.state_shardings(
        self.policy.abstract_params(), exp.param_shardings(), self.optimizer,
        with_reference=cfg.loss.kl_coef > 0,
        replicated=exp.mesh_train.replicated())
    self._make_state = jax.jit(lambda p: ts_lib.TrainState.create(
        p, self.optimizer, with_reference=cfg.loss.kl_coef > 0),
                               out_shardings=self.state_sh)
    self._reset_ref = jax.jit(
        lambda s: ts_lib.reset_reference(
            s, self.optimizer,
            reset_optimizer=cfg.reference.reset_optimizer), donate_argnums=0,
        out_shardings=self.state_sh)
    self._update = None
    u = cfg.update
    self.diagnostics = diag_lib.StepDiagnostics(
        self.policy, temperature=cfg.rollout.logprob_temperature,
        vocab_chunk=u.vocab_chunk, seq_chunk=u.seq_chunk,
        rescore_rollouts=cfg.diagnostics.rescore_rollouts,
        correct_threshold=cfg.rewards.correct_threshold,
        mesh_rules=exp.mesh_train)
    self.writer = MetricsWriter(self.workdir,
                                tensorboard=cfg.logging.tensorboard,
                                enabled=exp.is_main)
    self.archive = RolloutArchive(self.workdir / "rollouts", enabled=(
        exp.is_main and cfg.logging.archive_rollouts))
    self.checkpointer = checkpointing.TrainCheckpointer(
        self.workdir / "checkpoints", keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save)
    self.evaluator = None
    if self.pipeline.config.eval_files:
      self.evaluator = Evaluator(exp, self.pool)

  # ---- state ---------------------------------------------------------------

  def init_state(self, preempt):
    """Restores the newest readable checkpoint, or creates (and
    warm-starts) a state; what was logged after it is cut first.

    Returns:
      (state, data iterator, loop meta), or None when SIGTERM abandoned the
      warm start (nothing saved: the next start redoes it).
    """
    shardings = self.exp.param_shardings()
    abstract_params = checkpointing.abstract_with_shardings(
        self.policy.abstract_params(), shardings)
    train_iter = self.pipeline.train_iterator()
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(self._make_state, abstract_params), self.state_sh)
    restored = self.checkpointer.restore_latest(abstract, train_iter)
    workdir_lib.cut_back(restored and restored[0], self.writer, self.archive)
    if restored is not None:
      step, state, meta = restored
      log.info("resumed from step %d", step)
      return state, train_iter, meta
    params = self.exp.initial_params()
    # `eval_due`: the step whose evaluation is still to be written (a
    # preempted evaluation is redone on resume, a finished one is not).
    meta = {"generated_tokens_total": 0, "best_eval": None, "resets": 0,
            "eval_due": 0, "config": self.cfg.raw}
    ws = self.cfg.warmstart
    if ws.steps > 0 and self.cfg.init.path is None:
      with self._progress("warm start", ws.steps) as progress:
        def report(step, m):
          progress.update(step, {"loss": m.get("warmstart/loss"),
                                 "lr": m.get("warmstart/lr"),
                                 "heldout_loss":
                                 m.get("warmstart/heldout_loss")})
        out = run_warmstart(self.exp, params, ws, log_fn=report,
                            should_stop=preempt.requested)
      if out is None:
        return None
      params, ws_metrics = out
      self.writer.write(0, ws_metrics)
    return self._make_state(params), train_iter, meta

  def compile_update(self, state, rollout_batch_abstract):
    """AOT-compiles the update for the configured shapes; logs its memory."""
    cfg = self.cfg
    mr = self.exp.mesh_train
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch_sh = update_lib.batch_shardings(mr, rollout_batch_abstract)
    self._state_sh, self._batch_sh = state_sh, batch_sh
    # The concrete batch is moved into `batch_sh` before each call.
    compiled = update_lib.compile_update(
        self.policy, cfg.update, cfg.loss, self.optimizer,
        temperature=cfg.rollout.logprob_temperature, mesh_rules=mr,
        state=checkpointing.abstract_with_shardings(state, state_sh),
        batch=checkpointing.abstract_with_shardings(rollout_batch_abstract,
                                                    batch_sh))
    mem = compiled.memory_analysis()
    if mem is not None:
      log.info("update memory per device: arguments %.1f MiB, temporaries "
               "%.1f MiB, outputs %.1f MiB",
               mem.argument_size_in_bytes / 2**20,
               mem.temp_size_in_bytes / 2**20,
               mem.output_size_in_bytes / 2**20)
    return compiled

  # ---- one iteration -------------------------------------------------------

  def iteration(self, state, prompts, step: int, meta: dict, preempt):
    """One RL step. Returns (state, metrics), or None if abandoned."""
    cfg, exp = self.cfg, self.exp
    key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    times = {}
    t0 = time.perf_counter()

    # ---- 1. Prompts (host -> device) ---------------------------------------
    tokens, lengths = exp_lib.global_prompt_arrays(exp, prompts.tokens,
                                                   prompts.lengths)

    # ---- 2. Rollouts (device), scored on host as chunks finish -------------
    # The trainer's FSDP layout is resharded on device for decoding.
    sample_params = self._sampling_copy(state.params)
    scored = scoring.sample_and_score(
        self.sampler, self.pool, self.tokenizer, sample_params, tokens,
        lengths, prompts.records, jax.random.fold_in(key, ROLLOUT),
        should_stop=preempt.requested)
    # The sampling copy is not needed by the update: free it before.
    del sample_params
    if scored is None or preempt.requested():
      return None                          # abandoned: nothing was applied
    ro = scored.rollouts
    times["sample_s"] = scored.seconds["sample"]
    times["score_s"] = scored.seconds["score_wait"]
    if "segment_max" in scored.seconds:
      times["segment_max_s"] = scored.seconds["segment_max"]
      if times["segment_max_s"] > cfg.checkpoint.preempt_grace_s:
        log.warning(
            "a decode segment took %.1f s, more than checkpoint."
            "preempt_grace_s = %.1f s: a SIGTERM may not be honoured in "
            "time; lower rollout.segment_steps", times["segment_max_s"],
            cfg.checkpoint.preempt_grace_s)

    # ---- 3. Advantages (device): dynamic sampling, shaping -----------------
    t1 = time.perf_counter()
    prep = self._prepare(self.batch_cfg, tokens, lengths, ro, scored.rewards,
                         jnp.int32(step))
    rb = prep.batch

    # ---- 4. Update (device, state donated) ---------------------------------
    if preempt.requested():                # last exit before the update
      return None
    if self._update is None:
      self._update = self.compile_update(state, rb)
    diag_every = cfg.diagnostics.every
    do_diag = diag_every > 0 and step % diag_every == 0
    before = (self.diagnostics.before(state.params, rb,
                                      jax.random.fold_in(key, DIAG))
              if do_diag else None)
    # On-device moves into the compiled update's layouts (no-ops when equal).
    state = jax.device_put(state, self._state_sh)
    rb = jax.device_put(rb, self._batch_sh)
    prep = prep.replace(batch=rb)
    new_state, upd = self._update(state, rb, jax.random.fold_in(key, UPDATE))
    # Host sync for an honest phase time (the metrics need it next anyway).
    jax.block_until_ready(upd)
    times["update_s"] = time.perf_counter() - t1  # incl. the diag forward

    # ---- 5. Diagnostics (device): realized change --------------------------
    t2 = time.perf_counter()
    mass_after = {}
    if do_diag:
      mass_after = jax.block_until_ready(self._diag_after(
          new_state, before, prep, tokens, lengths, ro, scored.rewards))
    times["diag_s"] = time.perf_counter() - t2

    # ---- 6. Metrics (one explicit device -> host transfer) -----------------
    host = _to_host({**prep.stats,
                     **{f"loss/{k}": v for k, v in upd.items()},
                     **mass_after,
                     "rollout/finished_slot_frac": ro.finished_slots /
                     jnp.maximum(ro.total_slots, 1),
                     # Share of decode slot-steps that produced a token.
                     "rollout/slot_utilization": 1 - ro.finished_slots /
                     jnp.maximum(ro.total_slots, 1),
                     "optim/skipped_total": new_state.skipped,
                     "optim/updates_total": new_state.updates})
    meta["generated_tokens_total"] += int(host["rollout/generated_tokens"])
    metrics = self._rename(host)
    metrics["rollout/generated_tokens_total"] = meta["generated_tokens_total"]
    metrics["optim/lr"] = float(self.lr_schedule(int(new_state.updates)))
    metrics.update(self._task_rewards(prompts.records, scored.rewards))
    metrics.update({f"verify/{k}": v for k, v in _global_verify_stats(
        self.pool.pop_stats(), {r.verifier for r in prompts.records})
                    .items()})
    # The prompt sets' counts (rows read, malformed, too long, kept): fixed
    # once the files are read, logged each step so every row carries them.
    metrics.update(self.pipeline.metrics())
    if self.evaluator is not None:
      metrics.update(self.evaluator.data_metrics())
    times["step_s"] = time.perf_counter() - t0
    metrics.update({f"time/{k}": v for k, v in times.items()})
    metrics["throughput/tokens_per_s"] = (
        metrics["rollout/generated_tokens"] / max(times["sample_s"], 1e-9))
    # Archived under the step number the metrics use (completed steps).
    self._log_rollouts(step + 1, prompts, scored)
    return new_state, metrics

  @staticmethod
  def _rename(host: dict) -> dict:
    """Loss-aux names -> the documented metric names."""
    out = {}
    for k, v in host.items():
      if k in ("loss/logp_diff_mean", "loss/logp_diff_max"):
        k = "rollout/" + k.split("/", 1)[1]
      elif k in ("loss/grad_norm", "loss/update_norm", "loss/param_norm",
                 "loss/skipped"):
        k = "optim/" + k.split("/", 1)[1]
      out[k] = v
    return out

  def _task_rewards(self, records, rewards) -> dict[str, float]:
    """Per task family mean reward (host; the rewards' transfer is small)."""
    r = distributed.fetch(rewards,
                          self.exp.mesh_sample.replicated())      # [P, G]
    tasks: dict[str, list[float]] = {}
    for rec, row in zip(records, r):
      tasks.setdefault(rec.task, []).extend(row.tolist())
    if len(tasks) < 2:
      return {}
    return {f"reward/{t}/mean": float(np.mean(v)) for t, v in tasks.items()}

  def _sampling_copy(self, params):
    """The sampler's parameters: the sampling layout, cast once to
    `rollout.param_dtype` (default: the compute dtype)."""
    return reshard(params, self.sample_shardings, dtype=self.sample_dtype)

  # ---- diagnostics ---------------------------------------------------------

  def _diag_after(self, state, before, prep, tokens, lengths, ro, rewards):
    """The realized change: the kept prompts' first token re-scored by the
    sampler under the updated parameters, the rest in rl/diagnostics.py."""
    if before is None:
      return {}
    sample_params = self._sampling_copy(state.params)
    sel = prep.selected
    pre = self.sampler.prefill(sample_params, jnp.take(tokens, sel, 0),
                               jnp.take(lengths, sel, 0))
    return self.diagnostics.after(state.params, self.sampler.first_probs(pre),
                                  before, prep, ro.first_probs, rewards)

  # ---- logging -------------------------------------------------------------

  def _log_rollouts(self, step, prompts, scored):
    """Archives the step's rollouts and a few decoded texts (process 0).

    In a multi-process run the rollouts are gathered from every process
    (collectives: every process gets here, and the conditions depend on the
    config only); process 0 writes.
    """
    ro, log_cfg = scored.rollouts, self.cfg.logging
    replicated = self.exp.mesh_sample.replicated()
    if log_cfg.archive_rollouts and step % log_cfg.archive_every == 0:
      tok, lens, lp, rew, st = (distributed.fetch(x, replicated) for x in (
          ro.tokens, ro.lengths, ro.logprobs, scored.rewards, scored.status))
      self.archive.append(
          step, prompt_ids=[prompts.tokens[i, -prompts.lengths[i]:]
                            for i in range(len(prompts.records))],
          completion_ids=tok, lengths=lens, logprobs=lp, rewards=rew,
          status=st)
    n = log_cfg.text_samples
    if not (n and log_cfg.archive_rollouts):
      return
    num_p, num_g = scored.rewards.shape
    # An even spread over the step's rollouts, the same on every process.
    picked = [(i // num_g, i % num_g)
              for i in range(0, num_p * num_g, max(1, num_p * num_g // n))][:n]
    if jax.process_count() == 1:
      texts = [scored.texts[key] for key in picked]
    else:
      # The texts were decoded where the rollouts live: fetch the picked
      # rows' tokens and decode them here.
      rows = np.array([p * num_g + g for p, g in picked], np.int32)
      tok, lens = distributed.fetch_rows(ro.tokens, ro.lengths, rows,
                                         replicated)
      texts = self.tokenizer.decode_batch(
          [t[:k].tolist() for t, k in zip(tok, lens)])
    rewards, status = (distributed.fetch(x, replicated)
                       for x in (scored.rewards, scored.status))
    names = {v: k for k, v in scoring.STATUS_CODES.items()}
    self.archive.write_text_samples(step, [{
        "prompt": self.pipeline.prompt_text(prompts.records[p]),
        "completion": text, "answer": prompts.records[p].answer,
        "reward": float(rewards[p, g]),
        "status": names[int(status[p, g])]}
        for (p, g), text in zip(picked, texts)])

  # ---- evaluation, references ----------------------------------------------

  def evaluate(self, state, step: int, preempt) -> dict[str, float] | None:
    """The `eval/*` metrics; None when SIGTERM cut the evaluation short."""
    if self.evaluator is None:
      return {}
    t0 = time.perf_counter()
    params = self._sampling_copy(state.params)
    # The same key at every evaluation (common random numbers): pass@1
    # differences between steps are then the policy's, not the draws'; the
    # evaluate CLI on a checkpoint reproduces the loop's numbers.
    out = self.evaluator.evaluate(params, step, eval_key(self.cfg.seed),
                                  should_stop=preempt.requested)
    if out is None:
      self.pool.pop_stats()
      return None
    out["time/eval_s"] = time.perf_counter() - t0
    # The pool's counters belong to the evaluation, not the next RL step.
    verify = distributed.sum_over_processes(self.pool.pop_stats(),
                                            ("timeouts", "errors"))
    out.update({f"eval/verify/{k}": verify[k] for k in ("timeouts", "errors")
                if k in verify})
    return out

  def maybe_reset_reference(self, state, step, metrics, meta):
    ref = self.cfg.reference
    if state.ref_params is None:
      return state
    reason = None
    if ref.reset_every and step % ref.reset_every == 0:
      reason = "schedule"
    elif (ref.reset_kl_above is not None
          and metrics.get("loss/kl_ref", 0.0) > ref.reset_kl_above):
      reason = "kl"
    elif (ref.reset_on_eval_drop is not None and "eval/pass@1" in metrics
          and meta["best_eval"] is not None
          and metrics["eval/pass@1"] < meta["best_eval"]
          - ref.reset_on_eval_drop):
      reason = "eval"
    if reason is None:
      return state
    meta["resets"] += 1
    metrics["ref/resets"] = meta["resets"]
    log.info("step %d: reference reset (%s)", step, reason)
    return self._reset_ref(state)

  # ---- the loop ------------------------------------------------------------

  def run(self) -> dict[str, float]:
    cfg = self.cfg
    preempt = Preemption()
    try:
      init = self.init_state(preempt)
    except BaseException:
      self.close(preempt)
      raise
    if init is None:
      log.warning("preempted during the warm start: nothing saved; the next "
                  "start redoes it")
      self.close(preempt)
      return {}
    state, train_iter, meta = init
    start = int(state.step)
    last: dict[str, float] = {}
    # Older checkpoints lack `eval_due`: their step-0 evaluation is redone.
    due = meta.get("eval_due", 0 if start == 0 else None)
    if due == start and self.evaluator is not None:
      # Held-out pass@1 before any RL update (or the one SIGTERM cut short).
      out = self.evaluate(state, start, preempt)
      if out is not None:
        last = out
        meta["eval_due"] = None
        if start == 0:
          meta["best_eval"] = last.get("eval/pass@1")
        self.writer.write(start, last)
    t_start = time.perf_counter()
    bar = self._progress("RL step", cfg.total_steps, initial=start)
    step = start
    budget = cfg.max_generated_tokens

    def finished(step):
      # total_steps, or the budget of generated tokens (counting groups that
      # dynamic sampling dropped): equal-compute comparisons of N.
      return step >= cfg.total_steps or (
          budget is not None and meta["generated_tokens_total"] >= budget)

    try:
      while not finished(step) and not preempt.requested():
        # A background save that failed stops the run here (CheckpointError).
        self.checkpointer.check()
        data_state = train_iter.get_state()
        prompts = next(train_iter)
        out = self.iteration(state, prompts, step, meta, preempt)
        if out is None:                       # preempted mid-iteration
          train_iter.set_state(data_state)
          break
        state, metrics = out
        step += 1
        last_step = finished(step)
        if self.evaluator is not None and (
            last_step or (cfg.eval.every and step % cfg.eval.every == 0)):
          out = self.evaluate(state, step, preempt)
          if out is None:               # preempted: evaluated on resume
            meta["eval_due"] = step
          metrics.update(out or {})
          if metrics.get("eval/pass@1") is not None:
            best = meta["best_eval"]
            meta["best_eval"] = max(best if best is not None else -1.0,
                                    metrics["eval/pass@1"])
        state = self.maybe_reset_reference(state, step, metrics, meta)
        self.writer.write(step, metrics)
        last = metrics
        bar.update(step, {
            "reward": metrics["reward/mean"],
            "pass_rate": metrics["reward/pass_rate"],
            "tokens/s": metrics["throughput/tokens_per_s"],
            "s": metrics["time/step_s"],
            "eval_pass@1": metrics.get("eval/pass@1")})
        if (last_step or preempt.requested()
            or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
          self.checkpointer.save(step, state, train_iter, self._meta(meta))
        if preempt.requested():
          break
      if preempt.requested() and step not in self.checkpointer.all_steps():
        t0 = time.perf_counter()
        self.checkpointer.save(step, state, train_iter, self._meta(meta))
        self.checkpointer.wait()
        log.warning("preempted: saved step %d in %.1f s", step,
                    time.perf_counter() - t0)
    except checkpointing.CheckpointError:
      # Nothing logged after the last good checkpoint is kept (best effort:
      # the disk may be full; the next start cuts it back anyway).
      try:
        workdir_lib.cut_back(self.checkpointer.latest_step(), self.writer,
                             self.archive)
      except OSError as e:
        log.warning("could not cut the logs back now (%s); the next start "
                    "will", e)
      raise
    finally:
      bar.close()
      self.close(preempt)
    if self.exp.is_main:
      self._summary(start, step, last, time.perf_counter() - t_start,
                    preempted=preempt.requested_at is not None)
    return last

  def close(self, preempt) -> None:
    """Waits for the last save, then closes writers, pool and handler."""
    try:
      self.checkpointer.close()
    finally:
      self.writer.close()
      self.pool.close()
      preempt.restore()

  def _meta(self, meta: dict) -> dict:
    return {**meta, "versions": {"jax": jax.__version__}}

  def _progress(self, desc: str, total: int, initial: int = 0) -> Progress:
    return Progress(self.cfg.logging.progress_mode(), desc, total,
                    initial=initial, enabled=self.exp.is_main)

  @staticmethod
  def _summary(start: int, step: int, last: dict, seconds: float, *,
               preempted: bool) -> None:
    """The run's last line, in every progress mode (stdout, process 0)."""
    parts = [f"{'preempted' if preempted else 'done'}: step {step} "
             f"({step - start} this run, {seconds:.1f} s)"]
    for key in ("reward/mean", "reward/pass_rate", "eval/pass@1",
                "rollout/generated_tokens_total"):
      if last.get(key) is not None:
        value = last[key]
        parts.append(f"{key} {value:.4g}" if isinstance(value, float)
                     else f"{key} {value}")
    print("  ".join(parts), flush=True)


def train(config: Any, workdir: str) -> dict[str, float]:
  """Validates `config` (a ConfigDict), then runs or resumes the loop."""
  cfg = run_config.load(config)
  return Trainer(cfg, workdir).run()


# ---- command line ------------------------------------------------------------

def run(argv: list[str] | None = None) -> None:
  """Console entry point (`brorl-train`); `argv` excludes the program name.

  `--print_config` prints the resolved config (overrides applied, presets
  expanded, derived values filled in) and exits before anything is built.
  """
  argv = [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))
  cli.add_config_root(argv)
  config_flags.DEFINE_config_file("config", None, "ml-collections config file",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory (resumes if present)")
  flags.DEFINE_bool("print_config", False, "print the resolved config (after "
                    "overrides, as the run would use it) and exit")
  flags.DEFINE_bool("dry_run", False, "report per-device memory; no training")
  flags.DEFINE_float("device_memory_gb", None, "--dry_run: memory per device "
                     "in GiB (default: the TPU's HBM, the GPU's JAX limit, "
                     "else 80, an H100)")
  flags.DEFINE_string("dry_run_topology", None, "--dry_run: compile for this "
                      "TPU topology ahead of time (libtpu needed), e.g. "
                      "v5p:4x4x2 for a v5p-64 slice")
  flags.DEFINE_integer("dry_run_layers", 0, "--dry_run: 0 = auto (deep "
                       "models compile at 1 and 2 layers, 2 and 4 with "
                       "remat, extrapolated); >= depth compiles the full "
                       "model")
  flags.DEFINE_string("json", None, "--dry_run: also write the summary "
                      "(peaks in GiB per device, fits, sources) as JSON here")
  for alias, name in cli.dashed_aliases(
      ("print_config", "dry_run", "device_memory_gb", "dry_run_topology",
       "dry_run_layers")).items():
    flags.DEFINE_alias(alias, name)
  flags.mark_flags_as_required(["config"])

  def main(_):
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fl = flags.FLAGS
    with cli.input_errors():
      cfg = run_config.load(fl.config)
    if cfg.logging.progress_mode() == "off":
      # Only errors, and the final summary (printed, not logged).
      logging.getLogger().setLevel(logging.ERROR)
    if fl.print_config:
      print(run_config.dumps(cfg))
      return
    if fl.dry_run:
      with cli.input_errors():
        sizing.dry_run(cfg, device_memory_gb=fl.device_memory_gb,
                       topology=fl.dry_run_topology, layers=fl.dry_run_layers,
                       json_path=fl.json)
      return
    if not fl.workdir:
      cli.fail("--workdir is required (the run's directory)")
    with distributed.exit_on_error(), cli.input_errors():
      try:
        Trainer(cfg, fl.workdir).run()
      except checkpointing.CheckpointError as e:  # a save or restore failed
        cli.fail(e, status=1)

  app.run(main, argv=argv,
          flags_parser=lambda args: cli.parse_flags(flags.FLAGS, args))


if __name__ == "__main__":
  run()
