"""Supervised warm start: teacher-forced cross-entropy on worked solutions.

A randomly initialized policy (the CPU demo's) never produces a boxed
answer, so every RL group is all-wrong and carries no signal. A short
supervised stage first teaches the answer format and some of the task:

  record.meta["solution"] ("3 + 5 = 8. \\boxed{8}") + eos
    -> rows `prompt ++ solution`, the prompt rendered and tokenized exactly
       as the RL pipeline does (chat template, instruction, add_bos)
    -> loss = -mean log pi(solution token | prefix) at temperature 1, over
       solution tokens only (`rl.logprobs.response_logprobs`, chunked over
       the vocabulary)
    -> AdamW with warmup (`rl.train_state.make_optimizer`), one jitted step
       with explicit shardings on the training mesh.

Records without a solution are skipped and counted; so are solutions longer
than `warmstart.max_solution_len` tokens (never truncated: a cut solution
would teach answers without their box) and prompts longer than
`rollout.max_prompt_len` (RL never sees them either). The held-out loss is
the same cross-entropy on the eval records' solutions, before and after.

The train loop runs it on a fresh policy only: a run that starts from a
checkpoint or an HF model (`init.path`), or resumes, skips it. SIGTERM
(`should_stop`) abandons it between steps and held-out batches: nothing of
it is kept, and the next start redoes it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from brorl_jax import rewards
from brorl_jax.config import check, check_choice
from brorl_jax.data import records as records_lib
from brorl_jax.model.sharding import activation_rules, constrain
from brorl_jax.rl.train_state import (OptimConfig, make_optimizer,
                                      opt_state_shardings)
from brorl_jax.rl.logprobs import response_logprobs

log = logging.getLogger(__name__)
SECTION = "warmstart"
# Folded into the config seed for the warm start's example order.
_ORDER_PURPOSE = 0x5753


class WarmstartError(ValueError):
  """The warm start cannot run on this data (message names files and fix)."""


@dataclasses.dataclass(frozen=True)
class WarmstartConfig:
  """Supervised warm start (config section `warmstart`).

  Attributes:
    steps: optimizer steps; 0 turns the warm start off.
    batch_size: (prompt, solution) rows per step (global).
    learning_rate: peak AdamW learning rate.
    warmup_steps: linear warmup steps.
    schedule: "constant" after warmup, or "cosine" decay to 0 at `steps`.
    weight_decay: AdamW weight decay.
    grad_clip: global-norm gradient clip (0 = off).
    max_solution_len: most solution tokens (eos included) of a row; longer
      solutions are skipped and counted, never truncated.
    eval_every: held-out cross-entropy every this many steps (besides before
      and after); 0 = only before and after.
    log_every: report the train loss every this many steps.
    seed: seeds the fresh model the warm start trains (`init.path` unset)
      and its example order; None = the run's `seed`. A fixed value makes
      the warm start a fixed base model whatever `seed` is, so runs that
      differ in `seed` differ only in their RL stage (sampling, prompt order,
      evaluation draws), as RL runs from one checkpoint do.
  """

  steps: int = 0
  batch_size: int = 32
  learning_rate: float = 1e-3
  warmup_steps: int = 20
  schedule: str = "cosine"
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  max_solution_len: int = 128
  eval_every: int = 0
  log_every: int = 20
  seed: int | None = None

  def __post_init__(self):
    check(isinstance(self.steps, int) and self.steps >= 0,
          f"{SECTION}.steps", f"must be an integer >= 0 (0 = off), got "
          f"{self.steps!r}")
    check(self.batch_size >= 1, f"{SECTION}.batch_size", "must be >= 1")
    check(self.learning_rate > 0, f"{SECTION}.learning_rate", "must be > 0")
    check(self.warmup_steps >= 0, f"{SECTION}.warmup_steps", "must be >= 0")
    check_choice(self.schedule, f"{SECTION}.schedule", ("constant", "cosine"))
    check(self.weight_decay >= 0, f"{SECTION}.weight_decay", "must be >= 0")
    check(self.grad_clip >= 0, f"{SECTION}.grad_clip", "must be >= 0")
    check(self.max_solution_len >= 2, f"{SECTION}.max_solution_len",
          "must be >= 2 (at least one token and the eos)")
    check(self.eval_every >= 0, f"{SECTION}.eval_every", "must be >= 0")
    check(self.log_every >= 1, f"{SECTION}.log_every", "must be >= 1")
    check(self.seed is None or (isinstance(self.seed, int)
                                and 0 <= self.seed < 2**32),
          f"{SECTION}.seed", f"must be None or an integer in [0, 2**32), "
          f"got {self.seed!r}")

  def resolved_seed(self, run_seed: int) -> int:
    """The seed of the warm start in a run seeded `run_seed`."""
    return run_seed if self.seed is None else self.seed

  def optim_config(self) -> OptimConfig:
    """The equivalent `optim` settings (AdamW, warmup, schedule, clip)."""
    return OptimConfig(
        learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
        schedule=self.schedule,
        decay_steps=max(self.steps - self.warmup_steps, 1),
        weight_decay=self.weight_decay, grad_clip=self.grad_clip)


@dataclasses.dataclass
class SolutionSet:
  """Tokenized (prompt, solution) pairs of one split.

  Attributes:
    prompts: prompt ids per example, as the RL pipeline tokenizes them.
    solutions: solution ids per example, the tokenizer's eos last.
    files: the split's data files.
    counts: `records`, `no_solution`, `long_prompt`, `long_solution`,
      `kept`.
  """

  prompts: list[np.ndarray]
  solutions: list[np.ndarray]
  files: tuple[str, ...]
  counts: dict[str, int]


def solution_examples(pipeline: Any, split: str, *, max_solution_len: int
                      ) -> SolutionSet:
  """Reads a split's records and tokenizes prompts and worked solutions.

  Args:
    pipeline: the run's `data.prompts.PromptPipeline` (its config names the
      files; its `prompt_text` renders prompts exactly as RL sees them).
    split: "train" or "eval".
    max_solution_len: longer solutions (eos included) are skipped.

  Returns:
    The examples and what was skipped.
  """
  cfg = pipeline.config
  specs = cfg.train_files if split == "train" else cfg.eval_files
  tok = pipeline.tokenizer
  out = SolutionSet([], [], tuple(s.path for s in specs), dict.fromkeys(
      ("records", "no_solution", "long_prompt", "long_solution", "kept"), 0))
  for spec in specs:
    result = records_lib.read_records(
        spec, skip_bad_rows=cfg.skip_bad_rows,
        known_verifiers=set(rewards.VERIFIERS))
    for record in result.records:
      out.counts["records"] += 1
      solution = record.meta.get("solution")
      if not isinstance(solution, str) or not solution.strip():
        out.counts["no_solution"] += 1
        continue
      prompt = tok.encode(pipeline.prompt_text(record), add_bos=cfg.add_bos)
      answer = tok.encode(solution) + [tok.eos_id]
      if not 1 <= len(prompt) <= pipeline.max_prompt_len:
        out.counts["long_prompt"] += 1
      elif len(answer) > max_solution_len:
        out.counts["long_solution"] += 1
      else:
        out.prompts.append(np.asarray(prompt, np.int32))
        out.solutions.append(np.asarray(answer, np.int32))
  out.counts["kept"] = len(out.prompts)
  return out


def pack_rows(examples: SolutionSet, indices: np.ndarray, *, prompt_len: int,
              solution_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """`prompt ++ solution` rows in the layout of `rl.batch.make_rows`.

  Args:
    examples: the examples.
    indices: [B] example indices; -1 marks a filler row (a copy of example
      0 with an all-False loss mask, so shapes stay static).
    prompt_len: Lp, prompts are left-padded to it.
    solution_len: T, solutions are right-padded to it.
    pad_id: the tokenizer's pad id (masks come from lengths, not pad).

  Returns:
    `inputs` [B, Lp + T - 1] int32, `valid` [B, Lp + T - 1] bool, `targets`
    [B, T] int32, `mask` [B, T] bool (solution tokens that count).
  """
  b = len(indices)
  prompt = np.full((b, prompt_len), pad_id, np.int32)
  prompt_valid = np.zeros((b, prompt_len), bool)
  response = np.full((b, solution_len), pad_id, np.int32)
  resp_valid = np.zeros((b, solution_len), bool)
  for row, i in enumerate(indices):
    p, s = examples.prompts[max(i, 0)], examples.solutions[max(i, 0)]
    prompt[row, prompt_len - len(p):] = p
    prompt_valid[row, prompt_len - len(p):] = True
    response[row, :len(s)] = s
    resp_valid[row, :len(s)] = True
  # The last solution token is only a target, never an input.
  return {"inputs": np.concatenate([prompt, response[:, :-1]], 1),
          "valid": np.concatenate([prompt_valid, resp_valid[:, :-1]], 1),
          "targets": response,
          "mask": resp_valid & (np.asarray(indices) >= 0)[:, None]}


def _nll(exp: Any, params: Any, batch: dict[str, jax.Array]):
  """(sum of -log p over masked solution tokens, their count)."""
  batch = {k: constrain(v, ("batch", None)) for k, v in batch.items()}
  upd = exp.cfg.update
  logp, _ = response_logprobs(
      exp.policy, params, batch["inputs"], batch["valid"], batch["targets"],
      temperature=1.0, vocab_chunk=upd.vocab_chunk, seq_chunk=upd.seq_chunk,
      with_entropy=False)
  mask = batch["mask"].astype(jnp.float32)
  return -(logp * mask).sum(), mask.sum()


class _Steps:
  """The jitted train and held-out steps with explicit shardings."""

  def __init__(self, exp: Any, optimizer: optax.GradientTransformation):
    rules = exp.mesh_train
    param_sh = exp.param_shardings()
    self.opt_sh = opt_state_shardings(exp.policy.abstract_params(), param_sh,
                                      optimizer, rules.replicated())
    self.param_sh = param_sh
    self.rules = rules
    self.init_opt = jax.jit(optimizer.init, out_shardings=self.opt_sh)
    # A copy in the train layout: the caller's parameters stay valid although
    # the train step donates its inputs.
    self.copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                        out_shardings=param_sh)

    def train_step(params, opt_state, batch):
      with activation_rules(rules):
        def loss_fn(p):
          total, count = _nll(exp, p, batch)
          return total / jnp.maximum(count, 1.0)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient leaves the state untouched.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(ok, a, b), new, old)
        return (keep(new_params, params), keep(new_opt, opt_state),
                {"loss": loss, "grad_norm": grad_norm,
                 "skipped": (~ok).astype(jnp.int32)})

    def nll_step(params, batch):
      with activation_rules(rules):
        return _nll(exp, params, batch)

    rep = rules.replicated()
    self.train = jax.jit(train_step, donate_argnums=(0, 1),
                         in_shardings=(param_sh, self.opt_sh, None),
                         out_shardings=(param_sh, self.opt_sh, rep))
    self.nll = jax.jit(nll_step, in_shardings=(param_sh, None),
                       out_shardings=(rep, rep))

  def device_batch(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global host rows (identical on every process) -> sharded arrays."""
    out = {}
    for key, value in rows.items():
      sharding = self.rules.sharding(("batch", None), value.shape)
      out[key] = jax.make_array_from_callback(
          value.shape, sharding, lambda index, v=value: v[index])
    return out


def heldout_loss(steps: _Steps, params: Any, examples: SolutionSet, *,
                 batch_size: int, prompt_len: int, solution_len: int,
                 pad_id: int, should_stop: Callable[[], bool] | None = None
                 ) -> float | None:
  """Mean cross-entropy per solution token over all held-out examples; None
  when `should_stop()` (asked before each batch) said so."""
  total, count = 0.0, 0.0
  n = len(examples.prompts)
  for start in range(0, n, batch_size):
    if should_stop is not None and should_stop():
      return None
    idx = np.arange(start, start + batch_size)
    idx = np.where(idx < n, idx, -1)
    rows = pack_rows(examples, idx, prompt_len=prompt_len,
                     solution_len=solution_len, pad_id=pad_id)
    s, c = jax.device_get(steps.nll(params, steps.device_batch(rows)))
    total, count = total + float(s), count + float(c)
  return total / max(count, 1.0)


def _no_solutions_error(examples: SolutionSet, cfg: WarmstartConfig) -> str:
  files = ", ".join(examples.files) or "(no data.train_files)"
  c = examples.counts
  if c["records"] and c["no_solution"] == c["records"]:
    return (f"warmstart.steps={cfg.steps} needs worked solutions, but none of "
            f"the {c['records']} training records in {files} has "
            "meta.solution (a worked solution text ending in "
            "\\boxed{answer}). Add meta.solution to the records (the "
            "synthetic tasks of data.synthetic carry one), or set "
            "warmstart.steps=0.")
  return (f"warmstart: no usable training example in {files}: of "
          f"{c['records']} records, {c['no_solution']} lack meta.solution, "
          f"{c['long_solution']} have solutions longer than "
          f"warmstart.max_solution_len={cfg.max_solution_len} tokens and "
          f"{c['long_prompt']} prompts exceed rollout.max_prompt_len; raise "
          "those limits or set warmstart.steps=0.")


def run_warmstart(exp: Any, params: Any, cfg: WarmstartConfig, *,
                  log_fn: Callable[[int, dict[str, float]], None] | None = None,
                  should_stop: Callable[[], bool] | None = None
                  ) -> tuple[Any, dict[str, float]] | None:
  """Trains `params` on the training records' worked solutions.

  Args:
    exp: the run's `experiment.Experiment` (mesh, tokenizer, policy, seed,
      data config).
    params: policy parameters (any layout); not modified.
    cfg: the `warmstart` section; `cfg.steps == 0` returns `params` as is.
    log_fn: called as `log_fn(step, metrics)` every `log_every` steps with
      `warmstart/loss` (mean over those steps), `warmstart/grad_norm` and
      `warmstart/lr`, and every `eval_every` steps with
      `warmstart/heldout_loss`; `step` counts warm-start steps from 1.
    should_stop: asked before every step and held-out batch (on every
      process, in the same order: it may be a collective); True abandons
      the warm start.

  Returns:
    (parameters in the train layout, metrics): `warmstart/loss` (train loss
    of the last `log_every` steps), `warmstart/heldout_loss_before` /
    `_after` (when the eval records have solutions), `warmstart/examples`,
    `warmstart/skipped_no_solution`, `warmstart/skipped_long_solution`,
    `warmstart/skipped_long_prompt`, `warmstart/skipped_updates`,
    `warmstart/steps`, `warmstart/time_s`. None when `should_stop` said so.

  Raises:
    WarmstartError: no training record has a usable worked solution.
  """
  if cfg.steps == 0:
    return params, {}
  t0 = time.perf_counter()
  pipeline = exp.pipeline()
  train = solution_examples(pipeline, "train",
                            max_solution_len=cfg.max_solution_len)
  if not train.prompts:
    raise WarmstartError(_no_solutions_error(train, cfg))
  heldout = None
  if pipeline.config.eval_files:
    heldout = solution_examples(pipeline, "eval",
                                max_solution_len=cfg.max_solution_len)
    if not heldout.prompts:
      log.warning("warm start: no eval record has a usable meta.solution "
                  "(%s); no held-out loss", heldout.counts)
      heldout = None
  both = train.prompts + (heldout.prompts if heldout else [])
  shapes = dict(prompt_len=max(len(p) for p in both),
                solution_len=max(len(s) for s in train.solutions + (
                    heldout.solutions if heldout else [])),
                pad_id=exp.tokenizer.pad_id)
  # One "sample" per step: the schedule needs no batch-size scaling here.
  schedule = cfg.optim_config().schedule_fn(1)
  steps = _Steps(exp, make_optimizer(cfg.optim_config(), 1))
  params = steps.copy(params)
  opt_state = steps.init_opt(params)

  stop = should_stop or (lambda: False)

  def evaluate():
    return heldout_loss(steps, params, heldout, batch_size=cfg.batch_size,
                        should_stop=stop, **shapes)

  metrics = {"warmstart/examples": train.counts["kept"],
             "warmstart/skipped_no_solution": train.counts["no_solution"],
             "warmstart/skipped_long_solution": train.counts["long_solution"],
             "warmstart/skipped_long_prompt": train.counts["long_prompt"],
             "warmstart/steps": cfg.steps}
  log.info("warm start: %d steps on %d examples (%s)", cfg.steps,
           train.counts["kept"], train.counts)
  if heldout:
    metrics["warmstart/heldout_loss_before"] = evaluate()
    if metrics["warmstart/heldout_loss_before"] is None:
      return None
  order = np.random.default_rng([cfg.resolved_seed(exp.cfg.seed),
                                 _ORDER_PURPOSE])
  queue = np.zeros(0, np.int64)
  window, skipped = [], 0
  for step in range(1, cfg.steps + 1):
    if stop():
      log.warning("warm start abandoned at step %d of %d", step - 1,
                  cfg.steps)
      return None
    # Epochs of fresh permutations, consumed batch_size at a time.
    while len(queue) < cfg.batch_size:
      queue = np.concatenate([queue, order.permutation(len(train.prompts))])
    idx, queue = queue[:cfg.batch_size], queue[cfg.batch_size:]
    rows = pack_rows(train, idx, **shapes)
    params, opt_state, out = steps.train(params, opt_state,
                                         steps.device_batch(rows))
    # One step in flight at a time: on CPU meshes, many queued executions
    # whose collectives wait on each other can starve XLA's thread pool
    # (a rendezvous that never completes); the cost elsewhere is small.
    jax.block_until_ready(out)
    window.append(out)
    if step % cfg.log_every == 0 or step == cfg.steps:
      host = jax.device_get(window)
      skipped += sum(int(m["skipped"]) for m in host)
      loss = float(np.mean([m["loss"] for m in host]))
      metrics["warmstart/loss"] = loss
      if log_fn is not None:
        log_fn(step, {"warmstart/loss": loss,
                      "warmstart/grad_norm": float(host[-1]["grad_norm"]),
                      "warmstart/lr": float(schedule(step - 1))})
      window = []
    if heldout and cfg.eval_every and step % cfg.eval_every == 0 \
        and step != cfg.steps and log_fn is not None:
      loss = evaluate()
      if loss is None:
        return None
      log_fn(step, {"warmstart/heldout_loss": loss})
  if heldout:
    metrics["warmstart/heldout_loss_after"] = evaluate()
    if metrics["warmstart/heldout_loss_after"] is None:
      return None
  metrics["warmstart/skipped_updates"] = skipped
  metrics["warmstart/time_s"] = time.perf_counter() - t0
  log.info("warm start done: %s", metrics)
  return params, metrics
