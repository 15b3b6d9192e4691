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
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from brorl_jax.config import ConfigError
from brorl_jax.data.columns import Columns
from brorl_jax.data.records import FileSpec
from brorl_jax.rewards import formatting, math_verifier
from brorl_jax.rewards.config import RewardsConfig

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


def _pass_at_k(n: int, c: np.ndarray, k: int) -> np.ndarray:
  """Unbiased pass@k per problem: 1 - prod_{j=n-c+1}^{n} (1 - k/j)."""
  c = np.asarray(c, np.int64)
  j = np.arange(1, n + 1)
  factors = np.where(j[None] > (n - c)[:, None], 1.0 - k / j[None], 1.0)
  return np.where(n - c < k, 1.0, 1.0 - factors.prod(-1))


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
          "pass@k": {k: float(_pass_at_k(self.n, c, k).mean()) if count
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


def answer_ids(texts: Mapping[Any, str], shape: tuple[int, int],
               config: RewardsConfig) -> np.ndarray:
  """[P, n] answer ids of the texts this host decoded ({(p, g): text});
  -1 where another host holds the text (the caller combines by max)."""
  out = np.full(shape, -1, np.int64)
  for (p, g), text in texts.items():
    out[p, g] = answer_id(answer_key(text, config))
  return out
