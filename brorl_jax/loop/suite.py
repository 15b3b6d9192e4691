"""The math benchmark suite: MATH-500, AIME 2024, AMC 2023, GSM8K.

  python -m brorl_jax.evaluate --config C --workdir W --suite math \\
      [--n 16] [--k 1,4,16] [--max_prompts M] [--json P]
  --suite math500,aime24 (any of the benchmarks, or suites, comma-separated)
  --config.eval.suite=math   (the train loop evaluates it too: `suite/*`)

The benchmark files ship in the package (`data/benchmark_sets/`: the
problems with their gold final answers, verifier `math`; where each came
from, its license and checksums in that folder's README). They go through
the run's own prompt pipeline (instruction, system prompt, chat template),
sampler and `math` verifier; `--max_prompts M` takes each benchmark's first
M problems. Per benchmark, with n samples of each of its problems:

  accuracy  mean correctness over all samples, the paper's pass@1
            ("avg@n");
  pass@k    the unbiased estimator 1 - C(n - c, k) / C(n, k) of Chen et
            al. (2021), c = correct samples of a problem, averaged;
  maj@k     majority voting: the final answers of k samples vote
            (normalized as the verifier's string match normalizes them),
            the most common answer is the problem's answer, and maj@k is
            whether it is correct. Estimated over the n // k disjoint
            blocks of k consecutive samples (each an independent draw of
            k samples), ties split evenly among the tied answers (the
            expected score of a random tie-break); samples without a final
            answer do not vote, and a block without any votes scores 0.

A sample is correct when its reward reaches `rewards.correct_threshold`.
`SuiteEvaluator` runs it: the CLI's `--suite` and the train loop's
`eval.suite` (its `suite/<benchmark>/{accuracy,pass@k,maj@k}` metrics, at
every evaluation, with the evaluation's sampling settings and key).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import pathlib
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from brorl_jax import distributed, rewards
from brorl_jax.config import ConfigError
from brorl_jax.data.columns import Columns
from brorl_jax.data.prompts import PromptPipeline
from brorl_jax.data.records import FileSpec
from brorl_jax.loop.evaluator import Evaluator, eval_key, pass_at_k_array
from brorl_jax.rewards import formatting, math_verifier
from brorl_jax.rewards.config import RewardsConfig

# The suite's own draws: not the held-out evaluation's samples.
_SUITE_PURPOSE = 0x5017E
FILES = (pathlib.Path(__file__).resolve().parents[1] / "data" /
         "benchmark_sets")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark of the suite.

  Attributes:
    name: its name (the task name of its records and its metrics).
    file: the shipped JSONL file, in `FILES`.
    problems: the number of problems in the file.
    title: what it is.
  """

  name: str
  file: str
  problems: int
  title: str

  @property
  def path(self) -> pathlib.Path:
    return FILES / self.file


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("math500", "math500.jsonl", 500,
              "MATH-500 (the prm800k test split of MATH)"),
    Benchmark("aime24", "aime24.jsonl", 30, "AIME 2024, I and II"),
    Benchmark("amc23", "amc23.jsonl", 40,
              "AMC 12 2023, 40 problems as free-answer questions"),
    Benchmark("gsm8k", "gsm8k.jsonl", 1319, "GSM8K test"),
)}
SUITES: dict[str, tuple[str, ...]] = {
    "math": ("math500", "aime24", "amc23", "gsm8k")}


def resolve(spec: str | Sequence[str], key: str = "--suite"
            ) -> tuple[Benchmark, ...]:
  """The benchmarks a suite spec names, in order, each once.

  Args:
    spec: "math", "math500,aime24", or a sequence of such names.
    key: the flag or config key that gave it (for the error).

  Raises:
    ConfigError: an unknown name, or none at all.
  """
  names = [spec] if isinstance(spec, str) else list(spec)
  names = [n.strip() for entry in names for n in entry.split(",")
           if n.strip()]
  where = key if key.startswith("-") else f"config key '{key}'"
  if not names:
    raise ConfigError(f"{where}: names no benchmark; suites: "
                      f"{', '.join(SUITES)}; benchmarks: "
                      f"{', '.join(BENCHMARKS)}")
  out: list[Benchmark] = []
  for name in names:
    if name not in SUITES and name not in BENCHMARKS:
      raise ConfigError(f"{where}: unknown benchmark {name!r}; suites: "
                        f"{', '.join(SUITES)}; benchmarks: "
                        f"{', '.join(BENCHMARKS)}")
    for member in SUITES.get(name, (name,)):
      if BENCHMARKS[member] not in out:
        out.append(BENCHMARKS[member])
  return tuple(out)


def file_specs(benchmarks: Iterable[Benchmark],
               max_prompts: int | None = None) -> tuple[FileSpec, ...]:
  """The `data.eval_files` entries of the benchmarks.

  Each keeps the record field names whatever `data.prompt_key` & co. say
  (the files are in the project's record form), uses the `math` verifier
  and the benchmark's name as task, and at most `max_prompts` problems.
  """
  return tuple(FileSpec(path=str(b.path), task=b.name, verifier="math",
                        max_prompts=max_prompts, columns=Columns())
               for b in benchmarks)


# ---- final answers ---------------------------------------------------------


def answer_key(completion: str, config: RewardsConfig) -> str | None:
  """The normalized final answer a sample votes with (None: no vote).

  The `math` verifier's extraction (format requirements, answer pattern,
  last box, answer tag) and its string-match normalization, so answers that
  differ only in spacing, `\\left`/`\\right`, `\\dfrac`, ... vote together.
  """
  found = formatting.find_answer(completion, config.format,
                                 config.math.answer_pattern)
  if found is None or found[1] is None:
    return None
  answer = found[1]
  if len(answer) > config.math.max_answer_chars:
    return None
  return math_verifier.normalize_answer(answer) or None


def completion_answer_id(completion: str, config: RewardsConfig) -> int:
  """`answer_id(answer_key(completion, config))`."""
  return answer_id(answer_key(completion, config))


def answer_fn(config: RewardsConfig) -> Callable[[str], int]:
  """The `Evaluator`'s `answer_fn` for the suite's votes."""
  return functools.partial(completion_answer_id, config=config)


def answer_id(key: str | None) -> int:
  """A vote as a positive int64 that is the same on every host (0: none)."""
  if key is None:
    return 0
  digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                           digest_size=8).digest()
  return (int.from_bytes(digest, "little") >> 2) | 1


def maj_at_k(ids: np.ndarray, correct: np.ndarray, k: int) -> np.ndarray:
  """Per-problem maj@k (see the module doc for the estimator).

  Args:
    ids: [P, n] int64 answer ids (`answer_id`; 0 = no answer).
    correct: [P, n] bool, the samples' correctness.
    k: voters per block (1 <= k <= n).

  Returns:
    [P] float64.
  """
  ids, correct = np.asarray(ids), np.asarray(correct, bool)
  p, n = ids.shape
  if not 1 <= k <= n:
    raise ValueError(f"maj@k needs 1 <= k <= n, got k={k}, n={n}")
  blocks = n // k
  out = np.zeros(p)
  for i in range(p):
    total = 0.0
    for b in range(blocks):
      votes: dict[int, list[bool]] = collections.defaultdict(list)
      for j in range(b * k, (b + 1) * k):
        if ids[i, j] != 0:
          votes[int(ids[i, j])].append(bool(correct[i, j]))
      if not votes:
        continue
      most = max(len(v) for v in votes.values())
      tied = [v for v in votes.values() if len(v) == most]
      # Samples with one answer share its correctness; the mean guards a
      # verifier that scores the same answer differently (e.g. format).
      total += float(np.mean([np.mean(v) for v in tied]))
    out[i] = total / blocks
  return out


# ---- results ---------------------------------------------------------------


@dataclasses.dataclass
class SuiteResult:
  """Per-sample outcomes of a suite evaluation.

  Attributes:
    benchmarks: the benchmark names, in report order.
    ks: the k values of pass@k and maj@k.
    n: samples per problem.
    tasks: [N] the benchmark of each problem.
    correct: [N, n] bool.
    answers: [N, n] int64 answer ids (`answer_id`).
  """

  benchmarks: tuple[str, ...]
  ks: tuple[int, ...]
  n: int
  tasks: Sequence[str]
  correct: np.ndarray
  answers: np.ndarray

  def per_benchmark(self) -> dict[str, dict[str, Any]]:
    """{name: {"problems", "n", "accuracy", "pass@k": {k}, "maj@k": {k}}}."""
    tasks = np.asarray(self.tasks)
    out = {}
    for name in self.benchmarks:
      rows = tasks == name
      correct, answers = self.correct[rows], self.answers[rows]
      count = int(rows.sum())
      c = correct.sum(-1)
      empty = float("nan")
      out[name] = {
          "problems": count, "n": self.n,
          "accuracy": float(correct.mean()) if count else empty,
          "pass@k": {k: float(pass_at_k_array(self.n, c, k).mean()) if count
                     else empty for k in self.ks},
          "maj@k": {k: float(maj_at_k(answers, correct, k).mean()) if count
                    else empty for k in self.ks}}
    return out

  def report(self) -> dict[str, Any]:
    """The `--json` document: per benchmark, k values as strings."""
    return {"n": self.n, "ks": list(self.ks), "benchmarks": {
        name: {**s, "pass@k": {str(k): v for k, v in s["pass@k"].items()},
               "maj@k": {str(k): v for k, v in s["maj@k"].items()}}
        for name, s in self.per_benchmark().items()}}

  def flat(self, prefix: str = "suite/") -> dict[str, float]:
    """Metrics rows: `suite/math500/accuracy`, `.../pass@4`, `.../maj@4`."""
    out = {}
    for name, s in self.per_benchmark().items():
      out[f"{prefix}{name}/problems"] = s["problems"]
      out[f"{prefix}{name}/accuracy"] = s["accuracy"]
      for kind in ("pass", "maj"):
        for k, v in s[f"{kind}@k"].items():
          out[f"{prefix}{name}/{kind}@{k}"] = v
    return out

  def table(self) -> str:
    """One plain-text table: a row per benchmark."""
    head = (["benchmark", "problems", "accuracy"]
            + [f"pass@{k}" for k in self.ks] + [f"maj@{k}" for k in self.ks])
    rows = [[name, str(s["problems"]), f"{s['accuracy']:.4f}"]
            + [f"{s['pass@k'][k]:.4f}" for k in self.ks]
            + [f"{s['maj@k'][k]:.4f}" for k in self.ks]
            for name, s in self.per_benchmark().items()]
    width = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(  # noqa: E731
        x.ljust(w) if i == 0 else x.rjust(w)
        for i, (x, w) in enumerate(zip(r, width)))
    return "\n".join([fmt(head), fmt(["-" * w for w in width])]
                     + [fmt(r) for r in rows])


  @classmethod
  def from_eval(cls, result: Any, benchmarks: Sequence[Benchmark]
                ) -> SuiteResult:
    """From an `EvalResult` of the benchmarks' files (with answers)."""
    return cls(benchmarks=tuple(b.name for b in benchmarks), ks=result.ks,
               n=result.n, tasks=result.tasks, correct=result.samples,
               answers=result.answers)


class SuiteEvaluator:
  """Samples and scores the suite's benchmarks (the evaluate CLI's
  `--suite`, the train loop's `eval.suite`)."""

  def __init__(self, exp: Any, pool: Any, spec: str | Sequence[str], *,
               key: str = "eval.suite", greedy: bool = False):
    """Builds the evaluation of the benchmarks `spec` names.

    Args:
      exp: the run's `experiment.Experiment` (its `data` section renders
        the prompts: instruction, system prompt, chat template).
      pool: the run's reward pool.
      spec: "math" or a comma list of benchmarks (`resolve`).
      key: the flag or config key that named them (errors).
      greedy: argmax decoding (n = 1).

    Raises:
      ConfigError: an unknown benchmark name.
    """
    self.benchmarks = resolve(spec, key)
    cfg = exp.cfg
    data = dataclasses.replace(
        cfg.data, synthetic=None, train_files=(), eval_files=file_specs(
            self.benchmarks, cfg.eval.max_prompts))
    pipeline = PromptPipeline(
        data, exp.tokenizer, max_prompt_len=cfg.rollout.max_prompt_len,
        prompts_per_step=exp.prompts_to_sample(),
        known_verifiers=set(rewards.VERIFIERS))
    # `eval.max_prompts` caps each benchmark (its file entry), so the whole
    # set holds at most that many per benchmark: no cut beyond it.
    cap = cfg.eval.max_prompts
    self.evaluator = Evaluator(
        exp, pool, pipeline=pipeline, greedy=greedy,
        max_prompts=None if cap is None else cap * len(self.benchmarks),
        answer_fn=answer_fn(cfg.rewards))

  def too_long(self) -> dict[str, int]:
    """Problems dropped per benchmark as longer than the prompt length."""
    return {s.task: s.too_long for s in self.evaluator.file_stats()}

  @staticmethod
  def key(seed: int) -> jax.Array:
    """The suite's sampling key for a run seed (loop and CLI share it)."""
    return jax.random.fold_in(eval_key(seed), _SUITE_PURPOSE)

  def run(self, params: Any, step: int | None, rng: jax.Array, *,
          should_stop: Callable[[], bool] | None = None
          ) -> tuple[SuiteResult, Any] | None:
    """(the suite's results, the underlying `EvalResult`); None when
    `should_stop` cut it short."""
    result = self.evaluator.run(params, step, rng, should_stop=should_stop)
    if result is None:
      return None
    return SuiteResult.from_eval(result, self.benchmarks), result

  def loop_metrics(self, params: Any, step: int, seed: int, *,
                   should_stop: Callable[[], bool] | None = None
                   ) -> dict[str, float] | None:
    """`suite/<benchmark>/...` and `time/suite_s`, with the same key at
    every evaluation (as the held-out evaluation); None when cut short."""
    t0 = time.perf_counter()
    out = self.run(params, step, self.key(seed), should_stop=should_stop)
    pool = self.evaluator.pool
    if out is None:
      pool.pop_stats()
      return None
    metrics = out[0].flat()
    metrics["time/suite_s"] = time.perf_counter() - t0
    # The pool's counters belong to the suite, not the next RL step.
    verify = distributed.sum_over_processes(pool.pop_stats(),
                                            ("timeouts", "errors"))
    metrics.update({f"suite/verify/{k}": verify[k]
                    for k in ("timeouts", "errors") if k in verify})
    return metrics
