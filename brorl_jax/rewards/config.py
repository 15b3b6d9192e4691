"""The `rewards` config section: the pool, the verifiers' options, formats.

`RewardsConfig.from_mapping(config.rewards)` builds it from the ConfigDict
section; nested sections (`math`, `numeric`, `choice`, `exact`, `code`,
`reasoning_gym`, `format`) are built the same way, and an unknown or bad key
raises `ConfigError` naming its dotted path (e.g. `rewards.code.time_budget_s`).

`correct_threshold` is the project's one definition of a correct rollout
(DESIGN.md §4): reward >= threshold. `is_correct` applies it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from brorl_jax.config import check, check_choice, from_mapping

FORMAT_REQUIREMENTS = ("answer_tag", "boxed")
SANDBOX_BACKENDS = ("auto", "bwrap", "unshare")


def _check_pattern(pattern: str | None, key: str) -> None:
  if pattern is None:
    return
  try:
    re.compile(pattern)
  except re.error as e:
    check(False, key, f"not a valid regular expression ({e}): {pattern!r}")


@dataclasses.dataclass(frozen=True)
class FormatConfig:
  """Format requirements applied by every verifier before it scores.

  Attributes:
    require: names of required features; a completion missing one scores
      `unmet_reward`. "answer_tag": an `<answer>...</answer>` pair;
      "boxed": a `\\boxed{...}` or `\\fbox{...}` with matched braces.
    after_think: score only the text after the last `</think>`; a completion
      without `</think>` (its reasoning was cut off) scores `unmet_reward`.
    unmet_reward: the reward of a completion that misses a requirement.
  """
  require: tuple[str, ...] = ()
  after_think: bool = False
  unmet_reward: float = 0.0

  def __post_init__(self):
    if isinstance(self.require, str):
      object.__setattr__(self, "require", (self.require,) if self.require
                         else ())
    object.__setattr__(self, "require", tuple(self.require))
    for name in self.require:
      check_choice(name, "rewards.format.require", FORMAT_REQUIREMENTS)


@dataclasses.dataclass(frozen=True)
class MathConfig:
  """Options of the `math` verifier.

  Attributes:
    answer_pattern: a regex whose last match (group 1 if it has groups) is
      the final answer, tried before the last `\\boxed{}`; e.g.
      r"####\\s*(\\S+)" for GSM8K-style outputs. None: boxes only.
    allow_unboxed: with no pattern match, box or `<answer>` tag, let
      math-verify extract the last expression of the whole text (lenient);
      False scores such completions 0.
    string_match: also accept a normalized string match (the ProRL rule:
      1 if a normalized string match OR math-verify accepts).
    max_answer_chars: extracted answers longer than this score 0 without
      being parsed (no real final answer is that long; parsing one is slow).
    signal_timeout_s: math-verify's own `signal.alarm` timeouts for parse
      and verify, in whole seconds; 0 turns them off, leaving the pool's
      per-item timeout as the one bound (they only work in a main thread
      and cannot interrupt long C-level work such as huge powers).
  """
  answer_pattern: str | None = None
  allow_unboxed: bool = False
  string_match: bool = True
  max_answer_chars: int = 1000
  signal_timeout_s: int = 0

  def __post_init__(self):
    _check_pattern(self.answer_pattern, "rewards.math.answer_pattern")
    check(self.max_answer_chars > 0, "rewards.math.max_answer_chars",
          f"must be > 0, got {self.max_answer_chars}")
    check(self.signal_timeout_s >= 0, "rewards.math.signal_timeout_s",
          f"must be >= 0, got {self.signal_timeout_s}")


@dataclasses.dataclass(frozen=True)
class NumericConfig:
  """Options of the `numeric` verifier.

  Attributes:
    answer_pattern: regex for the final answer (as in `MathConfig`).
    rel_tol: relative tolerance of `math.isclose`.
    abs_tol: absolute tolerance of `math.isclose`.
    last_number_fallback: with no pattern match, box or tag, take the last
      number in the text (GSM8K style); False scores such completions 0.
    max_answer_chars: extracted answers longer than this score 0 without
      being parsed (a number, not an essay).
  """
  answer_pattern: str | None = None
  rel_tol: float = 1e-6
  abs_tol: float = 1e-9
  last_number_fallback: bool = True
  max_answer_chars: int = 1000

  def __post_init__(self):
    _check_pattern(self.answer_pattern, "rewards.numeric.answer_pattern")
    check(self.rel_tol >= 0, "rewards.numeric.rel_tol",
          f"must be >= 0, got {self.rel_tol}")
    check(self.abs_tol >= 0, "rewards.numeric.abs_tol",
          f"must be >= 0, got {self.abs_tol}")
    check(self.max_answer_chars > 0, "rewards.numeric.max_answer_chars",
          f"must be > 0, got {self.max_answer_chars}")


@dataclasses.dataclass(frozen=True)
class ChoiceConfig:
  """Options of the `choice` (multiple-choice letter) verifier.

  Attributes:
    answer_pattern: regex for the final answer (as in `MathConfig`).
    letters: the option letters that count as answers.
  """
  answer_pattern: str | None = None
  letters: str = "ABCDEFGHIJ"

  def __post_init__(self):
    _check_pattern(self.answer_pattern, "rewards.choice.answer_pattern")
    check(bool(self.letters) and self.letters.isalpha()
          and self.letters.isupper(), "rewards.choice.letters",
          f"must be upper-case letters, got {self.letters!r}")


@dataclasses.dataclass(frozen=True)
class ExactConfig:
  """Options of the `exact` verifier.

  Attributes:
    answer_pattern: regex for the final answer (as in `MathConfig`).
    case_sensitive: compare with case; False compares case-folded strings.
  """
  answer_pattern: str | None = None
  case_sensitive: bool = True

  def __post_init__(self):
    _check_pattern(self.answer_pattern, "rewards.exact.answer_pattern")


@dataclasses.dataclass(frozen=True)
class CodeConfig:
  """Options of the `code` verifier and its sandbox (DESIGN.md §4).

  Attributes:
    time_budget_s: wall-clock budget for all tests of one completion (ProRL
      uses 5 s); tests not finished within it fail. None (the default):
      derived from `rewards.timeout_s` by `RewardsConfig`, see
      `code_time_budget`.
    memory_mb: address-space limit (RLIMIT_AS) of the program.
    max_output_bytes: stdout kept per test; a program printing more fails.
    max_file_mb: largest file the program may write (RLIMIT_FSIZE).
    max_open_files: RLIMIT_NOFILE of the program.
    tmpfs_mb: size of the sandbox's private /tmp.
    python: the interpreter that runs the program; None: this interpreter's
      base installation (a venv's packages are not visible in the sandbox).
    sandbox: "auto" (bubblewrap, else util-linux unshare), "bwrap" or
      "unshare".
    allow_unsandboxed: run without namespaces where neither is available.
      Only for trusted settings: the program can then read and write what
      the worker can, and reach the network.
  """
  time_budget_s: float | None = None
  memory_mb: int = 1024
  max_output_bytes: int = 1 << 20
  max_file_mb: int = 16
  max_open_files: int = 64
  tmpfs_mb: int = 64
  python: str | None = None
  sandbox: str = "auto"
  allow_unsandboxed: bool = False

  def __post_init__(self):
    check(self.time_budget_s is None or self.time_budget_s > 0,
          "rewards.code.time_budget_s",
          f"must be > 0 (or None: derived), got {self.time_budget_s}")
    for key in ("memory_mb", "max_output_bytes", "max_file_mb",
                "max_open_files", "tmpfs_mb"):
      value = getattr(self, key)
      check(value > 0, f"rewards.code.{key}", f"must be > 0, got {value}")
    check_choice(self.sandbox, "rewards.code.sandbox", SANDBOX_BACKENDS)


@dataclasses.dataclass(frozen=True)
class ReasoningGymConfig:
  """Options of the `reasoning_gym` verifier.

  Attributes:
    answer_tag: the tag whose last occurrence holds the answer (the
      reasoning-gym convention is `<answer>...</answer>`); a last `\\boxed{}`
      is the fallback.
  """
  answer_tag: str = "answer"

  def __post_init__(self):
    check(re.fullmatch(r"[A-Za-z_][\w-]*", self.answer_tag) is not None,
          "rewards.reasoning_gym.answer_tag",
          f"must be a tag name, got {self.answer_tag!r}")


# ProRL's budget for the tests of one program.
DEFAULT_CODE_BUDGET_S = 5.0


def startup_margin(timeout_s: float) -> float:
  """Room left in one item's timeout for the sandbox and interpreter start.

  1 s, or half the timeout when that is below 2 s.
  """
  return min(1.0, timeout_s / 2)


def code_time_budget(timeout_s: float) -> float:
  """The code verifier's budget derived from the per-item timeout.

  ProRL's 5 s where the timeout leaves room for it and the start-up margin,
  else what the timeout leaves: `--timeout 2` gives 1 s, `--timeout 5` 4 s,
  `--timeout 10` 5 s.
  """
  return min(DEFAULT_CODE_BUDGET_S, timeout_s - startup_margin(timeout_s))


_SECTIONS = {
    "format": FormatConfig, "math": MathConfig, "numeric": NumericConfig,
    "choice": ChoiceConfig, "exact": ExactConfig, "code": CodeConfig,
    "reasoning_gym": ReasoningGymConfig,
}


@dataclasses.dataclass(frozen=True)
class RewardsConfig:
  """The `rewards` section: correctness, the pool, the verifiers' options.

  Attributes:
    correct_threshold: a rollout is correct when its reward >= this. The
      one definition used by dynamic sampling, pass rates, pass@k and the
      mass-balance terms (R_c / R_w of the paper follow from it).
    num_workers: verifier worker processes; 0: one per core this process
      may run on.
    worker_cpus: CPU ids the workers are pinned to, away from the cores
      that decode (on a small machine, unpinned workers and XLA's threads
      slow each other down); empty: not pinned.
    timeout_s: per-item timeout T, enforced by the pool (the worker is
      killed and replaced); it bounds every verifier, math-verify included.
      The code verifier's budget is derived from it unless set.
    default_score: the reward of an item that timed out or failed.
    recycle_every: items after which a worker is replaced by a fresh one
      (bounds leaks in verifier libraries); 0: never.
    worker_memory_mb: address-space limit (RLIMIT_AS) of each worker; 0:
      none.
    chunk_size: items sent to a worker per message (amortizes IPC; the
      timeout still applies to each item).
    kill_grace_s: time between SIGTERM and SIGKILL of a worker.
    format: format requirements applied by every verifier.
    math, numeric, choice, exact, code, reasoning_gym: per-verifier options.
    plugins: modules (or `.py` paths) that register more verifiers, imported
      before any verifier name is checked and in every worker (`plugins.py`).
  """
  correct_threshold: float = 0.5
  num_workers: int = 0
  worker_cpus: tuple[int, ...] = ()
  timeout_s: float = 10.0
  default_score: float = 0.0
  recycle_every: int = 10000
  worker_memory_mb: int = 4096
  chunk_size: int = 8
  kill_grace_s: float = 1.0
  format: FormatConfig = FormatConfig()
  math: MathConfig = MathConfig()
  numeric: NumericConfig = NumericConfig()
  choice: ChoiceConfig = ChoiceConfig()
  exact: ExactConfig = ExactConfig()
  code: CodeConfig = CodeConfig()
  reasoning_gym: ReasoningGymConfig = ReasoningGymConfig()
  plugins: tuple[str, ...] = ()

  def __post_init__(self):
    check(self.num_workers >= 0, "rewards.num_workers",
          f"must be >= 0 (0: one per core), got {self.num_workers}")
    object.__setattr__(self, "worker_cpus", tuple(self.worker_cpus))
    check(all(isinstance(c, int) and c >= 0 for c in self.worker_cpus),
          "rewards.worker_cpus",
          f"must be CPU ids (ints >= 0), got {self.worker_cpus}")
    check(self.timeout_s > 0, "rewards.timeout_s",
          f"must be > 0, got {self.timeout_s}")
    check(self.recycle_every >= 0, "rewards.recycle_every",
          f"must be >= 0 (0: never), got {self.recycle_every}")
    check(self.worker_memory_mb == 0 or self.worker_memory_mb >= 256,
          "rewards.worker_memory_mb",
          f"must be 0 (no limit) or >= 256, got {self.worker_memory_mb}")
    check(self.chunk_size >= 1, "rewards.chunk_size",
          f"must be >= 1, got {self.chunk_size}")
    check(self.kill_grace_s > 0, "rewards.kill_grace_s",
          f"must be > 0, got {self.kill_grace_s}")
    # `--config.rewards.plugins=a,b` arrives as ("a,b",): split on commas.
    entries = ((self.plugins,) if isinstance(self.plugins, str)
               else tuple(self.plugins))
    check(all(isinstance(p, str) for p in entries), "rewards.plugins",
          f"must be module names or .py paths, got {self.plugins!r}")
    object.__setattr__(self, "plugins", tuple(
        p.strip() for entry in entries for p in entry.split(",")
        if p.strip()))
    for name, cls in _SECTIONS.items():
      check(isinstance(getattr(self, name), cls), f"rewards.{name}",
            f"must be a {cls.__name__} (use RewardsConfig.from_mapping)")
    if self.code.time_budget_s is None:
      object.__setattr__(self, "code", dataclasses.replace(
          self.code, time_budget_s=code_time_budget(self.timeout_s)))
    # A sandboxed run needs its budget plus start-up time inside one item's
    # timeout, or every slow-but-legal program would read as a pool timeout.
    margin = startup_margin(self.timeout_s)
    check(self.code.time_budget_s + margin <= self.timeout_s,
          "rewards.code.time_budget_s",
          f"must be at least {margin:g} s below rewards.timeout_s "
          f"({self.timeout_s:g}), got {self.code.time_budget_s:g}; leave it "
          "unset to derive it from the timeout")

  @classmethod
  def from_mapping(cls, section: Mapping[str, Any] | None,
                   prefix: str = "rewards") -> RewardsConfig:
    """Builds the config from a (ConfigDict) section, nested ones included.

    Args:
      section: the `rewards` section; nested sections are mappings too.
      prefix: the section's dotted name for error messages.

    Returns:
      The validated config. Unknown keys raise `ConfigError` naming them.
    """
    section = {k: section[k] for k in section} if section else {}
    for name, sub_cls in _SECTIONS.items():
      if name in section and not isinstance(section[name], sub_cls):
        sub = section[name]
        check(isinstance(sub, Mapping) or hasattr(sub, "keys"),
              f"{prefix}.{name}", f"must be a mapping, got {type(sub)}")
        section[name] = from_mapping(sub_cls, {k: sub[k] for k in sub},
                                     f"{prefix}.{name}")
    return from_mapping(cls, section, prefix)

  def to_dict(self) -> dict[str, Any]:
    """The config as plain nested dicts (for `config.json` and workers)."""
    return dataclasses.asdict(self)


def is_correct(rewards: Any, threshold: float) -> np.ndarray:
  """The correct mask: reward >= `threshold` (`rewards.correct_threshold`).

  Args:
    rewards: rewards of any shape, e.g. [P, G].
    threshold: the correct threshold.

  Returns:
    A bool array of the same shape.
  """
  return np.asarray(rewards) >= threshold
