"""The RL loop: `Trainer` builds every part of a run once; `run()` loops.

One SPMD program: every host runs this loop; the sampler and the trainer
share one set of parameters on one mesh. One iteration:

  prompts (host) -> rollouts (device) | scored on host, overlapped ->
  advantages (device) -> update (device, donated) -> diagnostics -> metrics,
  checkpoint, evaluation.

Running the loop again on the same workdir resumes from its last checkpoint.
On SIGTERM the in-flight iteration is abandoned and the last completed state
is saved before exiting 0.
"""

from __future__ import annotations

import logging
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from brorl_jax import checkpointing
from brorl_jax import run_config
from brorl_jax.loop import allocated_sampling
from brorl_jax.loop import experiment as exp_lib
from brorl_jax.loop import scoring
from brorl_jax.loop import step_log
from brorl_jax.loop import suite as suite_lib
from brorl_jax.loop import wandb_writer
from brorl_jax.loop import workdir as workdir_lib
from brorl_jax.loop.evaluator import Evaluator
from brorl_jax.loop.metrics import MetricsWriter
from brorl_jax.loop.rollout_archive import RolloutArchive
from brorl_jax.model.sharding import reshard
from brorl_jax.progress import Progress, print_summary
from brorl_jax.rl import batch as batch_lib
from brorl_jax.rl import diagnostics as diag_lib
from brorl_jax.rl import nonfinite
from brorl_jax.rl import reference as reference_lib
from brorl_jax.rl import train_state as ts_lib
from brorl_jax.rl import update as update_lib
from brorl_jax.warmstart import run_warmstart

log = logging.getLogger(__name__)

# Purposes folded into the step's key (STYLE.md §13).
ROLLOUT, UPDATE, DIAG = 1, 2, 4


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
      if flag and self.requested_at is None:   # told by another process
        self.requested_at = time.monotonic()
    return flag

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


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
    self.allocation = cfg.allocation()       # None: fixed N
    # The optimizer, its lr schedule and the state's layout: the builder's
    # (the dry run sizes the same ones).
    self.optimizer = exp.optimizer
    self.sample_shardings = exp.param_shardings(sampling=True)
    self.batch_cfg = batch_lib.BatchConfig(
        num_groups=self.num_groups, max_new_tokens=cfg.rollout.max_new_tokens,
        correct_threshold=cfg.rewards.correct_threshold,
        advantage=cfg.advantage, shaping=cfg.shaping,
        mask_truncated=cfg.loss.mask_truncated)
    self._prepare = jax.jit(batch_lib.prepare, static_argnums=0)
    self._reset_ref = jax.jit(
        lambda s: ts_lib.reset_reference(
            s, self.optimizer,
            reset_optimizer=cfg.reference.reset_optimizer), donate_argnums=0,
        out_shardings=exp.state_shardings)
    self._update = None
    u = cfg.update
    self.diagnostics = diag_lib.StepDiagnostics(
        self.policy, temperature=cfg.rollout.logprob_temperature,
        vocab_chunk=u.vocab_chunk, seq_chunk=u.seq_chunk,
        rescore_rollouts=cfg.diagnostics.rescore_rollouts,
        correct_threshold=cfg.rewards.correct_threshold,
        mesh_rules=exp.mesh_train)
    # W&B, like the metrics files, from process 0 only.
    wandb = (wandb_writer.from_logging(cfg.logging, self.workdir,
                                       run_config.resolved(cfg))
             if exp.is_main else None)
    self.writer = MetricsWriter(self.workdir,
                                tensorboard=cfg.logging.tensorboard,
                                enabled=exp.is_main, wandb=wandb)
    self.archive = RolloutArchive(self.workdir / "rollouts", enabled=(
        exp.is_main and cfg.logging.archive_rollouts))
    self.checkpointer = checkpointing.TrainCheckpointer(
        self.workdir / "checkpoints", keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save)
    self.evaluator = None
    if self.pipeline.config.eval_files:
      self.evaluator = Evaluator(exp, self.pool)
    self.suite = (suite_lib.SuiteEvaluator(exp, self.pool, cfg.eval.suite)
                  if cfg.eval.suite else None)

  # ---- state ---------------------------------------------------------------

  def init_state(self, preempt):
    """Restores the newest readable checkpoint, or creates (and
    warm-starts) a state; what was logged after it is cut first.

    Returns:
      (state, data iterator, loop meta), or None when SIGTERM abandoned the
      warm start (nothing saved: the next start redoes it).
    """
    train_iter = self.pipeline.train_iterator()
    abstract = self.exp.abstract_state
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
    return self.exp.make_state(params), train_iter, meta

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
    valid, alloc_metrics = None, {}
    if self.allocation is None:
      scored = scoring.sample_and_score(
          self.sampler, self.pool, self.tokenizer, sample_params, tokens,
          lengths, prompts.records, jax.random.fold_in(key, ROLLOUT),
          should_stop=preempt.requested)
    else:                # unequal groups: [P, G_max] rows + a valid mask
      out = allocated_sampling.sample_allocated(
          self.sampler, self.pool, self.tokenizer, sample_params, tokens,
          lengths, prompts.records, jax.random.fold_in(key, ROLLOUT),
          self.allocation, correct_threshold=cfg.rewards.correct_threshold,
          should_stop=preempt.requested)
      scored, valid, alloc_metrics = out or (None, None, {})
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
                         jnp.int32(step), valid)
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
      mass_after = jax.block_until_ready(self.diagnostics.after_update(
          self.sampler, new_state.params,
          self._sampling_copy(new_state.params), before, prep))
    times["diag_s"] = time.perf_counter() - t2

    # ---- 6. Metrics (one explicit device -> host transfer) -----------------
    # Every device metric already carries its logged name (`prepare`'s
    # stats, the update's `loss/` / `optim/` / `rollout/` metrics, `mass/`).
    metrics = step_log.to_host({
        **prep.stats, **alloc_metrics, **upd, **mass_after,
        "optim/skipped_total": new_state.skipped,
        "optim/updates_total": new_state.updates})
    meta["generated_tokens_total"] += int(metrics["rollout/generated_tokens"])
    metrics["rollout/generated_tokens_total"] = meta["generated_tokens_total"]
    metrics["optim/lr"] = float(exp.lr_schedule(int(new_state.updates)))
    metrics.update(step_log.task_rewards(prompts.records, scored.rewards,
                                         self.exp.mesh_sample.replicated(),
                                         valid))
    metrics.update({f"verify/{k}": v for k, v in step_log.global_verify_stats(
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

    # ---- 7. Rollout archive (process 0 writes; gathers are collective) -----
    # Archived under the step number the metrics use (completed steps).
    step_log.log_rollouts(
        self.archive, step + 1, prompts, scored, log_cfg=cfg.logging,
        replicated=self.exp.mesh_sample.replicated(),
        tokenizer=self.tokenizer, prompt_text=self.pipeline.prompt_text)
    return new_state, metrics

  def _sampling_copy(self, params):
    """The sampler's parameters: the sampling layout, cast once to
    `rollout.param_dtype` (default: the compute dtype)."""
    return reshard(params, self.sample_shardings, dtype=self.exp.sample_dtype)

  # ---- evaluation ----------------------------------------------------------

  def evaluate(self, state, step: int, preempt) -> dict[str, float] | None:
    """The `eval/*` (and `suite/*`) metrics; None when SIGTERM cut the
    evaluation short."""
    params, out = self._sampling_copy(state.params), {}
    for evaluator in (self.evaluator, self.suite):
      if evaluator is not None:
        got = evaluator.loop_metrics(params, step, self.cfg.seed,
                                     should_stop=preempt.requested)
        if got is None:
          return None
        out.update(got)
    return out

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
    if due == start and (self.evaluator or self.suite) is not None:
      # Held-out pass@1 before any RL update (or the one SIGTERM cut short).
      out = self.evaluate(state, start, preempt)
      if out is not None:
        last = out
        meta["eval_due"] = None
        if start == 0:
          meta["best_eval"] = last.get("eval/pass@1")
        self.writer.write(start, last)
    t_start = time.perf_counter()
    # Stops a run whose first steps skip every mini-batch (non-finite).
    watch = nonfinite.SkipWatch(
        cfg.update.num_minibatches, backend=self.sampler.decode_backend,
        platform=jax.default_backend(), dtype=self.exp.model_cfg.dtype)
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
        # ---- Sample, score, advantages, update, diagnostics (one step) ---
        data_state = train_iter.get_state()
        prompts = next(train_iter)
        out = self.iteration(state, prompts, step, meta, preempt)
        if out is None:                       # preempted mid-iteration
          train_iter.set_state(data_state)
          break
        state, metrics = out
        step += 1
        last_step = finished(step)
        # ---- Evaluation (held-out pass@k) --------------------------------
        if (self.evaluator or self.suite) is not None and (
            last_step or (cfg.eval.every and step % cfg.eval.every == 0)):
          out = self.evaluate(state, step, preempt)
          if out is None:               # preempted: evaluated on resume
            meta["eval_due"] = step
          metrics.update(out or {})
          if metrics.get("eval/pass@1") is not None:
            best = meta["best_eval"]
            meta["best_eval"] = max(best if best is not None else -1.0,
                                    metrics["eval/pass@1"])
        # ---- Reference reset (host decides, device copies) ---------------
        reason = None if state.ref_params is None else (
            reference_lib.reset_reason(cfg.reference, step, metrics,
                                       meta["best_eval"]))
        if reason is not None:
          meta["resets"] += 1
          metrics["ref/resets"] = meta["resets"]
          log.info("step %d: reference reset (%s)", step, reason)
          state = self._reset_ref(state)
        # ---- Log ---------------------------------------------------------
        self.writer.write(step, metrics)
        watch.check(metrics)
        last = metrics
        bar.update(step, {
            "reward": metrics["reward/mean"],
            "pass_rate": metrics["reward/pass_rate"],
            "tokens/s": metrics["throughput/tokens_per_s"],
            "s": metrics["time/step_s"],
            "eval_pass@1": metrics.get("eval/pass@1")})
        # ---- Checkpoint --------------------------------------------------
        if (last_step or preempt.requested()
            or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)):
          self.checkpointer.save(step, state, train_iter, self._meta(meta))
        if preempt.requested():
          break
      if preempt.requested():
        if step not in self.checkpointer.all_steps():
          self.checkpointer.save(step, state, train_iter, self._meta(meta))
        self.checkpointer.wait()
        self._report_grace(step, time.monotonic() - preempt.requested_at)
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
      print_summary(start, step, last, time.perf_counter() - t_start,
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

  def _report_grace(self, step: int, seconds: float) -> None:
    """Logs how long the notice-to-saved path took against the grace."""
    grace = self.cfg.checkpoint.preempt_grace_s
    log.warning("preempted: step %d saved %.1f s after the SIGTERM "
                "(checkpoint.preempt_grace_s = %.1f s)", step, seconds, grace)
    if seconds > grace:
      log.warning(
          "the save came %.1f s after the grace: a real preemption would "
          "have killed the process first; lower rollout.segment_steps "
          "(refill decode) or rollout.max_decode_rows (fixed chunks)",
          seconds - grace)

  def _meta(self, meta: dict) -> dict:
    return {**meta, "versions": {"jax": jax.__version__}}

  def _progress(self, desc: str, total: int, initial: int = 0) -> Progress:
    return Progress(self.cfg.logging.progress_mode(), desc, total,
                    initial=initial, enabled=self.exp.is_main)
