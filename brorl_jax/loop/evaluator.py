"""Held-out evaluation with the training stack: pass@1 over n samples and
unbiased pass@k.

Every held-out prompt (`data.eval_files`, or the `data.synthetic` held-out
set) goes through the training stack's own sampler and verifiers
(`scoring.sample_and_score`) with the config's `eval` sampling settings; a
sample is correct when its reward reaches `rewards.correct_threshold`. With
c of n samples correct, a prompt's pass@k is the unbiased estimator of Chen
et al. (2021), 1 - C(n - c, k) / C(n, k); pass@1 is c / n. Both are averaged
over prompts, overall and per task family (a record's `task`: the benchmark
file's name for benchmark files). Greedy decoding forces n = 1. The train
loop and the evaluate CLI (`brorl_jax/evaluate.py`) both call `Evaluator`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from brorl_jax import distributed, rewards
from brorl_jax.config import check
from brorl_jax.data.prompts import PromptPipeline
from brorl_jax.loop.experiment import global_prompt_arrays
from brorl_jax.loop.scoring import sample_and_score
from brorl_jax.progress import Progress
from brorl_jax.rewards import is_correct

log = logging.getLogger(__name__)
# Folded into the config seed: the loop and the CLI draw the same samples.
_EVAL_PURPOSE = 0xE7A1


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one prompt (Chen et al., 2021).

  1 - C(n - c, k) / C(n, k), computed as the product
  prod_{j = n - c + 1}^{n} (1 - k / j), which never forms a binomial.

  Args:
    n: samples drawn.
    c: correct samples among them.
    k: the k of pass@k (1 <= k <= n).

  Returns:
    The probability that at least one of k samples drawn without replacement
    from the n is correct.
  """
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got "
                     f"n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_array(n: Any, c: Any, k: int) -> np.ndarray:
  """`pass_at_k` over arrays of n and c (broadcast), vectorized.

  Args:
    n: samples per prompt, e.g. [P] or a scalar.
    c: correct samples per prompt, e.g. [P].
    k: the k of pass@k.

  Returns:
    [P] float64 per-prompt pass@k.
  """
  n, c = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(c, np.int64))
  if (c < 0).any() or (c > n).any() or k < 1 or (n < k).any():
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (k={k})")
  if n.size == 0:
    return np.zeros(n.shape)
  j = np.arange(1, int(n.max()) + 1)                      # [J]
  # Factor (1 - k / j) for j in (n - c, n], 1 elsewhere.
  inside = (j > (n - c)[..., None]) & (j <= n[..., None])  # [P, J]
  factors = np.where(inside, 1.0 - k / j, 1.0)
  return np.where(n - c < k, 1.0, 1.0 - factors.prod(-1))


def eval_key(seed: int) -> jax.Array:
  """The evaluation's sampling key for a run seed (loop and CLI share it)."""
  return jax.random.fold_in(jax.random.key(seed), _EVAL_PURPOSE)


@dataclasses.dataclass
class EvalResult:
  """Per-prompt outcomes of one evaluation.

  Attributes:
    n: samples per prompt.
    ks: the pass@k values reported.
    step: the policy's step (None: not a training checkpoint).
    greedy: greedy decoding (then n = 1).
    correct: [N] int, correct samples per held-out prompt.
    tasks: [N] task family of each prompt.
    reward_sum / length_sum / truncated: sums over all N * n samples of the
      reward, the response length and "hit max_new_tokens".
    seconds: wall time of the evaluation.
    samples: [N, n] bool, each sample's correctness.
    answers: [N, n] int64 answer ids of the samples (`Evaluator`'s
      `answer_fn`; 0 = no answer), or None when not asked for.
  """

  n: int
  ks: tuple[int, ...]
  step: int | None
  greedy: bool
  correct: np.ndarray
  tasks: list[str]
  reward_sum: float
  length_sum: float
  truncated: float
  seconds: float
  samples: np.ndarray | None = None
  answers: np.ndarray | None = None

  def summary(self, task: str | None = None) -> dict[str, Any]:
    """`{"pass@1", "pass@k": {k: v}, "n_prompts"}` of one task or all."""
    rows = np.asarray([task is None or t == task for t in self.tasks], bool)
    c = self.correct[rows]
    if not len(c):
      return {"pass@1": float("nan"), "pass@k": {}, "n_prompts": 0}
    return {"pass@1": float(np.mean(c / self.n)),
            "pass@k": {k: float(pass_at_k_array(self.n, c, k).mean())
                       for k in self.ks},
            "n_prompts": int(len(c))}

  def flat(self) -> dict[str, float]:
    """Flat metric names: `eval/pass@1`, `eval/{task}/pass@4`, ..."""
    samples = max(len(self.correct) * self.n, 1)
    out = {"eval/num_prompts": len(self.correct),
           "eval/reward_mean": self.reward_sum / samples,
           "eval/response_len_mean": self.length_sum / samples,
           "eval/truncated_frac": self.truncated / samples}
    for task in [None] + sorted(set(self.tasks)):
      s = self.summary(task)
      prefix = "eval/" if task is None else f"eval/{task}/"
      out[prefix + "pass@1"] = s["pass@1"]
      for k, v in s["pass@k"].items():
        out[f"{prefix}pass@{k}"] = v
      if task is not None:
        out[prefix + "num_prompts"] = s["n_prompts"]
    return out

  def report(self) -> dict[str, Any]:
    """The `--json` document."""
    def form(s):
      return {"pass@1": s["pass@1"],
              "pass@k": {str(k): v for k, v in s["pass@k"].items()},
              "n_prompts": s["n_prompts"]}
    overall = form(self.summary())
    return {**overall, "n": self.n, "step": self.step, "greedy": self.greedy,
            "per_task": {t: form(self.summary(t))
                         for t in sorted(set(self.tasks))}}

  def table(self) -> str:
    """A plain-text table: overall and per task, prompts and pass@k."""
    head = ["task", "prompts", "pass@1"] + [f"pass@{k}" for k in self.ks
                                             if k != 1]
    rows = []
    for task in [None] + sorted(set(self.tasks)):
      s = self.summary(task)
      rows.append([task or "all", str(s["n_prompts"]), f"{s['pass@1']:.4f}"]
                  + [f"{s['pass@k'][k]:.4f}" for k in self.ks if k != 1])
    width = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(  # noqa: E731
        x.ljust(w) if i == 0 else x.rjust(w)
        for i, (x, w) in enumerate(zip(r, width)))
    return "\n".join([fmt(head), fmt(["-" * w for w in width])]
                     + [fmt(r) for r in rows])


def _to_host(x: jax.Array) -> np.ndarray:
  """A global array's full value on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
  """Samples and scores the held-out prompts with the training stack."""

  def __init__(self, exp: Any, pool: Any, *, sampler_cfg: Any = None,
               ks: Sequence[int] | None = None,
               max_prompts: int | None = None, greedy: bool = False,
               pipeline: Any = None, batch_size: int | None = None,
               progress: str | None = None,
               answer_fn: Callable[[str], int] | None = None):
    """Builds the eval sampler and the held-out prompt set.

    Args:
      exp: the run's `experiment.Experiment`.
      pool: the run's `rewards.RewardPool` (the same verifiers as training).
      sampler_cfg: sampling settings (default `exp.cfg.eval_sampler()`).
      ks: the pass@k values (default `exp.cfg.eval.k`); each <= n.
      max_prompts: evaluate the first M held-out prompts (default
        `exp.cfg.eval.max_prompts`; None = all).
      greedy: argmax decoding (also when `sampler_cfg` is greedy): forces
        n = 1 and drops every k > 1.
      pipeline: the run's prompt pipeline (default `exp.pipeline()`).
      batch_size: prompts per sampler call (default: the training step's).
      progress: "bar", "lines", "off" or None (default
        `exp.cfg.logging.progress`): problems done and the running pass@1.
      answer_fn: completion text -> answer id (an int, 0 = no answer), for
        majority voting (`suite.answer_fn`); None: no answers kept.
    """
    sampler_cfg = sampler_cfg or exp.cfg.eval_sampler()
    ks = tuple(exp.cfg.eval.k if ks is None else ks)
    if greedy or sampler_cfg.is_greedy:
      if sampler_cfg.n != 1 or any(k > 1 for k in ks):
        log.info("greedy evaluation: n forced to 1 (was %d), pass@k only "
                 "for k = 1", sampler_cfg.n)
      sampler_cfg = dataclasses.replace(sampler_cfg, greedy=True, n=1)
      ks = (1,)
    check(all(1 <= k <= sampler_cfg.n for k in ks), "eval.k",
          f"each k must be in 1..n={sampler_cfg.n}, got {ks}")
    self.exp, self.pool = exp, pool
    self.n, self.ks = sampler_cfg.n, tuple(sorted(set(ks)))
    self.greedy = sampler_cfg.is_greedy
    self.max_prompts = (exp.cfg.eval.max_prompts if max_prompts is None
                        else max_prompts)
    self.threshold = exp.cfg.rewards.correct_threshold
    self.sampler = exp.sampler(sampler_cfg)
    pipeline = pipeline or exp.pipeline()
    self.batch_size = batch_size or pipeline.prompts_per_step
    check(self.batch_size % jax.process_count() == 0, "eval.batch_size",
          f"must be a multiple of the process count {jax.process_count()}")
    # A one-process view of the same held-out set: every host needs the
    # records of the whole global batch to score the rollouts it holds.
    self._view = PromptPipeline(
        pipeline.config, pipeline.tokenizer,
        max_prompt_len=pipeline.max_prompt_len,
        prompts_per_step=self.batch_size,
        known_verifiers=set(rewards.VERIFIERS))
    self.progress = (exp.cfg.logging.progress if progress is None
                     else progress)
    self.answer_fn = answer_fn

  def file_stats(self) -> tuple[Any, ...]:
    """Per-file counts of the evaluated set (`prompts.FileStats`)."""
    return self._view.file_stats("eval")

  def data_metrics(self) -> dict[str, int]:
    """The held-out set's counts (`data/eval/rows`, `.../too_long`, ...),
    read now if no evaluation has read them yet (a resumed run)."""
    self._view.file_stats("eval")
    return self._view.metrics()

  def evaluate(self, params: Any, step: int, rng: jax.Array, *,
               should_stop: Callable[[], bool] | None = None
               ) -> dict[str, float] | None:
    """Flat `eval/*` metrics of `params` (in the sampling layout); None when
    `should_stop` (see `run`) said so."""
    result = self.run(params, step, rng, should_stop=should_stop)
    return None if result is None else result.flat()

  def loop_metrics(self, params: Any, step: int, seed: int, *,
                   should_stop: Callable[[], bool] | None = None
                   ) -> dict[str, float] | None:
    """The train loop's evaluation: `eval/*`, `time/eval_s` and the
    verifiers' `eval/verify/{timeouts,errors}` over all processes; None when
    `should_stop` cut it short.

    The same key at every evaluation (common random numbers): pass@1
    differences between steps are then the policy's, not the draws'; the
    evaluate CLI on a checkpoint reproduces the loop's numbers.

    Args:
      params: policy parameters in the sampling layout.
      step: the policy's step.
      seed: the run's seed (`eval_key(seed)`).
      should_stop: as `run`.
    """
    t0 = time.perf_counter()
    out = self.evaluate(params, step, eval_key(seed), should_stop=should_stop)
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

  def run(self, params: Any, step: int | None, rng: jax.Array, *,
          should_stop: Callable[[], bool] | None = None
          ) -> EvalResult | None:
    """Samples n completions per held-out prompt and scores them.

    Args:
      params: policy parameters in the sampling layout.
      step: the policy's step (recorded only).
      rng: sampling key; the same key gives the same samples (pass the same
        one at every step for common random numbers across steps).
      should_stop: asked before each batch and after each decode chunk (on
        every process, in the same order); True abandons the evaluation.

    Returns:
      The per-prompt outcomes, or None when abandoned.
    """
    t0 = time.perf_counter()
    limit = self.max_prompts
    correct, tasks, samples, answers = [], [], [], []
    sums = np.zeros(3)  # reward, response length, truncated
    total = sum(s.kept for s in self._view.file_stats("eval"))
    total = total if limit is None else min(total, limit)
    progress = Progress(self.progress, "eval", total, unit="problems",
                        max_lines=10, enabled=self.exp.is_main)
    done = num_correct = 0
    for b, batch in enumerate(self._view.eval_batches(self.batch_size)):
      first = b * self.batch_size
      if limit is not None and first >= limit:
        break
      if should_stop is not None and should_stop():
        return None
      keep = batch.valid & (limit is None or
                            first + np.arange(self.batch_size) < limit)
      # The whole global batch (every host has it, `_view`); each host's
      # devices take only their own rows.
      tokens, lengths = global_prompt_arrays(self.exp, batch.tokens,
                                             batch.lengths)
      scored = sample_and_score(
          self.sampler, self.pool, self.exp.tokenizer, params, tokens,
          lengths, batch.records, rng, n=self.n,
          keep_texts=self.answer_fn is not None, prompt_offset=first,
          should_stop=should_stop)
      if scored is None:
        return None
      rewards = _to_host(scored.rewards)[keep]                 # [B', n]
      resp_len = _to_host(scored.rollouts.lengths)[keep]       # [B', n]
      stopped = _to_host(scored.rollouts.stopped)[keep]        # [B', n]
      samples.append(is_correct(rewards, self.threshold))    # [B', n]
      correct.append(samples[-1].sum(-1))
      if self.answer_fn is not None:
        answers.append(self._answers(scored.texts)[keep])       # [B', n]
      tasks += [r.task for r, k in zip(batch.records, keep) if k]
      sums += (rewards.sum(), resp_len.sum(), (~stopped).sum())
      done, num_correct = done + len(rewards), num_correct + correct[-1].sum()
      progress.update(done, {"pass@1": float(num_correct) /
                             max(done * self.n, 1)})
    progress.close()
    return EvalResult(
        n=self.n, ks=self.ks, step=step, greedy=self.greedy,
        correct=np.concatenate(correct) if correct else np.zeros(0, int),
        tasks=tasks, reward_sum=float(sums[0]), length_sum=float(sums[1]),
        truncated=float(sums[2]), seconds=time.perf_counter() - t0,
        samples=(np.concatenate(samples) if samples
                 else np.zeros((0, self.n), bool)),
        answers=(None if self.answer_fn is None else np.concatenate(answers)
                 if answers else np.zeros((0, self.n), np.int64)))

  def _answers(self, texts: dict[tuple[int, int], str]) -> np.ndarray:
    """[B, n] answer ids of a batch on every process: each host maps the
    texts it decoded ({(p, g): text}; -1 elsewhere), then the max over
    processes fills in the rest."""
    ids = np.full((self.batch_size, self.n), -1, np.int64)
    for (p, g), text in texts.items():
      ids[p, g] = self.answer_fn(text)
    if jax.process_count() > 1:
      ids = np.asarray(multihost_utils.process_allgather(ids)).max(0)
    return ids
