"""Progress of the long phases: a tqdm bar, plain lines, or nothing.

Modes (`logging.progress`; `--progress` of `python -m brorl_jax.hf`):

  "bar"    a tqdm bar on stderr, redrawn in place: for terminals.
  "lines"  one plain line per report on stdout, e.g.
             RL step 3/200  reward 0.125  pass_rate 0.125  tokens/s 2114  s 1.74
           for logs that are not terminals (SLURM, pod logs, `| tee`).
  "off"    nothing.

`resolve(None)` picks "bar" when stdout is a terminal and "lines" otherwise.
Only process 0 reports (`enabled=False` elsewhere).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping, TextIO

from tqdm import tqdm

MODES = ("bar", "lines", "off")


def resolve(mode: str | None, stream: TextIO | None = None) -> str:
  """The mode to use: `mode`, or for None / "auto" bar on a terminal.

  Args:
    mode: one of `MODES`, "auto" or None.
    stream: the stream whose terminal-ness decides "auto" (stdout).

  Returns:
    "bar", "lines" or "off".

  Raises:
    ValueError: an unknown mode (the message lists the known ones).
  """
  if mode is None or mode == "auto":
    stream = sys.stdout if stream is None else stream
    return "bar" if stream.isatty() else "lines"
  if mode not in MODES:
    raise ValueError(f"progress mode {mode!r}; known: auto, "
                     f"{', '.join(MODES)}")
  return mode


def _format(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
  """Reports how far a phase is, out of a known total.

  Example:
    with Progress("lines", "eval", total=512, unit="problems") as p:
      for done in ...:
        p.update(done, {"pass@1": running})
  """

  def __init__(self, mode: str | None, desc: str, total: int, *,
               initial: int = 0, unit: str = "", max_lines: int | None = None,
               enabled: bool = True, stream: TextIO | None = None):
    """Starts reporting.

    Args:
      mode: "bar", "lines", "off", or None / "auto" (see `resolve`).
      desc: the phase's name, first on each line.
      total: the position at which the phase is done.
      initial: the starting position (a resumed run's step).
      unit: what is counted ("problems", "tensors"), after the total.
      max_lines: in "lines" mode, at most about this many lines for the
        whole phase (None: one per `update`); the last position always
        prints.
      enabled: False reports nothing (processes other than 0).
      stream: where lines go (stdout).
    """
    self.mode = resolve(mode) if enabled else "off"
    self.desc, self.total, self.unit = desc, total, unit
    self.stream = sys.stdout if stream is None else stream
    self._stride = (1 if max_lines is None
                    else max(1, math.ceil(total / max(max_lines, 1))))
    self._next_line = initial + self._stride
    self._bar = None
    if self.mode == "bar":
      self._bar = tqdm(total=total, initial=initial, desc=desc,
                       unit=f" {unit}" if unit else "it", dynamic_ncols=True,
                       leave=True)

  def update(self, position: int,
             fields: Mapping[str, Any] | None = None) -> None:
    """Reports that the phase reached `position`, with named values."""
    fields = {k: v for k, v in (fields or {}).items() if v is not None}
    if self._bar is not None:
      self._bar.update(position - self._bar.n)
      if fields:
        self._bar.set_postfix({k: _format(v) for k, v in fields.items()},
                              refresh=True)
    elif self.mode == "lines" and (position >= self._next_line
                                   or position == self.total):
      self._next_line = position + self._stride
      unit = f" {self.unit}" if self.unit else ""
      parts = [f"{self.desc} {position}/{self.total}{unit}"] + [
          f"{k} {_format(v)}" for k, v in fields.items()]
      print("  ".join(parts), file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def print_summary(start: int, step: int, last: Mapping[str, Any],
                  seconds: float, *, preempted: bool,
                  note: str | None = None,
                  stream: TextIO | None = None) -> None:
  """The train run's last line, in every progress mode (process 0 calls it).

  Args:
    start: the step the run started (or resumed) at.
    step: the step it stopped at.
    last: the last metrics written (reward, pass rate, eval, tokens).
    seconds: the loop's wall time.
    preempted: whether SIGTERM stopped it.
    note: why it stopped before `total_steps`, ending the line.
    stream: where to print (default stdout).
  """
  parts = [f"{'preempted' if preempted else 'done'}: step {step} "
           f"({step - start} this run, {seconds:.1f} s)"]
  for key in ("reward/mean", "reward/pass_rate", "eval/pass@1",
              "rollout/generated_tokens_total"):
    if last.get(key) is not None:
      value = last[key]
      parts.append(f"{key} {value:.4g}" if isinstance(value, float)
                   else f"{key} {value}")
  if note:
    parts[-1] += ";"
    parts.append(note)
  print("  ".join(parts), file=stream or sys.stdout, flush=True)
