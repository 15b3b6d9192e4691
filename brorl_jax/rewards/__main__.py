"""Offline scoring: `python -m brorl_jax.rewards --input X --output Y`.

Each input line is a JSON object `{completion, answer, verifier, tests?,
meta?}`; each output line is the same object plus `reward`, `status` (`ok` |
`timeout` | `error`), `seconds`, and `error` when not ok. A summary (count,
mean reward, timeouts and errors per verifier) is printed at the end.

A malformed line (invalid UTF-8 or JSON, a lone surrogate in a string, a
missing or mistyped field, a NaN or infinite answer, an unknown verifier)
stops the run before anything is scored, naming the file and line; with
`--skip_bad_lines` such lines are left out and counted. Numeric answers are
read as their shortest text (`69.0` -> "69").
Verifier options: `--set math.answer_pattern='####\\s*(.+)' --set
format.after_think=true` (values are JSON, else strings). `--plugins
my_rewards[,other]` imports modules (or `.py` files) that register more
verifiers (`rewards.registry.register`), here and in every worker, before
any line is read (`rewards.plugins` in a training config).

`--timeout S` sets the per-item timeout (`rewards.timeout_s`); the code
verifier's budget for a program's tests is derived from it (5 s, or what S
leaves after the sandbox's start-up: 1 s at `--timeout 2`, 4 s at
`--timeout 5`) unless `--set code.time_budget_s=B` sets it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from brorl_jax.config import ConfigError
from brorl_jax.data import records
from brorl_jax.rewards import plugins, registry
from brorl_jax.rewards.config import RewardsConfig
from brorl_jax.rewards.pool import RewardPool
from brorl_jax.rewards.registry import VerifyItem
from brorl_jax.rewards.sandbox import SandboxUnavailable

_BATCH = 4096


class BadLine(ValueError):
  """A malformed input line; the message names the file and line."""


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m brorl_jax.rewards", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="completions JSONL")
  parser.add_argument("--output", required=True, help="scored JSONL")
  parser.add_argument("--workers", type=int, default=None,
                      help="worker processes (default: rewards.num_workers)")
  parser.add_argument("--timeout", type=float, default=None,
                      help="per-item timeout in seconds (rewards.timeout_s)")
  parser.add_argument("--skip_bad_lines", "--skip-bad-lines",
                      action="store_true",
                      help="skip and count malformed lines instead of failing")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VAL",
                      help="a rewards option, e.g. math.allow_unboxed=true")
  parser.add_argument("--plugins", action="append", default=[],
                      metavar="MODULES",
                      help="comma-separated modules or .py files that "
                      "register verifiers (rewards.plugins)")
  return parser.parse_args(argv)


def _config(args: argparse.Namespace) -> RewardsConfig:
  section: dict[str, Any] = {}
  for assignment in args.set:
    key, sep, raw = assignment.partition("=")
    if not sep:
      raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    *parents, leaf = key.removeprefix("rewards.").split(".")
    node = section
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  if args.timeout is not None:
    section["timeout_s"] = args.timeout
  if args.workers is not None:
    section["num_workers"] = args.workers
  named = [p for flag in args.plugins for p in flag.split(",") if p]
  if named:
    section["plugins"] = tuple(section.get("plugins", ())) + tuple(named)
  return RewardsConfig.from_mapping(section)


def read_items(path: str, verifiers: Sequence[str], skip_bad: bool
               ) -> tuple[list[dict[str, Any]], list[VerifyItem], int]:
  """Reads and checks every line; returns (records, items, skipped count).

  Raises:
    BadLine: a malformed line, unless `skip_bad`.
  """
  records, items, skipped = [], [], 0
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        record = _check(raw, verifiers)
      except ValueError as e:
        if not skip_bad:
          raise BadLine(f"{path}:{lineno}: {e} (fix the line, or pass "
                        "--skip_bad_lines to skip such lines)") from None
        print(f"skipping {path}:{lineno}: {e}", file=sys.stderr)
        skipped += 1
        continue
      records.append(record)
      items.append(VerifyItem(record["completion"], record["answer"],
                              record["verifier"], record.get("tests"),
                              record.get("meta")))
  return records, items, skipped


def _check(raw: bytes, verifiers: Sequence[str]) -> dict[str, Any]:
  try:
    record = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"invalid UTF-8 at byte {e.start}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON ({e})") from None
  if not isinstance(record, dict):
    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
  for key, value in record.items():
    problem = records.text_problem(key) or records.text_problem(value)
    if problem:
      raise ValueError(f"field {key!a} {problem}")
  record = dict(record)
  if not isinstance(record.get("completion"), str):
    raise ValueError("field 'completion' must be a string")
  if not isinstance(record.get("verifier"), str):
    raise ValueError("field 'verifier' must be a string")
  if record["verifier"] not in verifiers:
    raise ValueError(f"unknown verifier {record['verifier']!r}; registered: "
                     f"{', '.join(sorted(verifiers))}; --plugins MODULE "
                     "imports a module that registers more")
  answer = record.get("answer", "" if record["verifier"] == "code" else None)
  if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
    raise ValueError("field 'answer' must be a string (or a number)")
  try:
    record["answer"] = records.answer_text(answer)
  except ValueError as e:
    raise ValueError(f"field 'answer' {e}") from None
  if record.get("meta") is not None and not isinstance(record["meta"], dict):
    raise ValueError("field 'meta' must be an object")
  return record


def _dumps(record: dict[str, Any]) -> str:
  try:
    return json.dumps(record, ensure_ascii=False).encode("utf-8").decode()
  except UnicodeEncodeError:  # lone surrogates: keep them as \\u escapes
    return json.dumps(record, ensure_ascii=True)


def _summary(pool_stats: dict[str, float], skipped: int) -> str:
  names = sorted({k.split("/")[0] for k in pool_stats if "/" in k})
  lines = [f"{'verifier':<14} {'count':>7} {'mean_reward':>11} "
           f"{'timeouts':>8} {'errors':>6} {'mean_s':>8}"]
  for name in names:
    lines.append(
        f"{name:<14} {pool_stats[f'{name}/count']:>7} "
        f"{pool_stats[f'{name}/mean_reward']:>11.4f} "
        f"{pool_stats[f'{name}/timeouts']:>8} {pool_stats[f'{name}/errors']:>6}"
        f" {pool_stats[f'{name}/mean_latency_s']:>8.4f}")
  lines.append(f"total: {pool_stats['items']} scored, {pool_stats['timeouts']}"
               f" timeouts, {pool_stats['errors']} errors, {skipped} bad lines"
               " skipped")
  return "\n".join(lines)


def _budgets(config: RewardsConfig) -> str:
  return (f"budgets: {config.timeout_s:g} s per item (rewards.timeout_s), "
          f"{config.code.time_budget_s:g} s for a program's tests "
          "(rewards.code.time_budget_s)")


def main(argv: Sequence[str] | None = None) -> int:
  """Scores a JSONL file; returns the exit code (2 on bad input)."""
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  try:
    config = _config(args)
    plugins.load(config.plugins,
                 key="--plugins" if args.plugins else "rewards.plugins")
    records, items, skipped = read_items(args.input, list(registry.VERIFIERS),
                                         args.skip_bad_lines)
  except (BadLine, ConfigError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    with RewardPool(config) as pool, open(args.output, "w",
                                          encoding="utf-8") as out:
      batches = [items[i:i + _BATCH] for i in range(0, len(items), _BATCH)]
      futures = [pool.submit(batch) for batch in batches]
      for start, future in zip(range(0, len(items), _BATCH), futures):
        for record, result in zip(records[start:], future.result()):
          record.update(reward=result.reward, status=result.status,
                        seconds=round(result.seconds, 6))
          if result.error:
            record["error"] = result.error
          out.write(_dumps(record) + "\n")
      pool_stats = pool.stats()
  except SandboxUnavailable as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(_summary(pool_stats, skipped))
  print(_budgets(config))
  return 0


def run() -> None:
  """Console-script entry point (`brorl-rewards`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
