"""Plots of a run's metrics, and of runs against each other.

  python -m brorl_jax.plot --workdir W [--out PNG]
      training curves against the step, then the `mass/*` panels; default
      output `W/metrics.png`.
  python -m brorl_jax.plot --compare W1 W2 [...] [--labels A,B] [--out PNG]
      held-out `eval/pass@1`, `reward/mean` and every `mass/*` metric against
      `rollout/generated_tokens_total` (the paper's Figure 4 axis). Each
      argument is one arm: a workdir, or comma-separated workdirs of the same
      arm (seeds), drawn as mean and min-max band. Default output
      `compare.png` in the current folder.

Panels whose metrics a run does not have are skipped. A metric logged at step
s is placed at the cumulative generated tokens logged at the largest step
<= s (at 0 when none is logged yet, e.g. an evaluation before the first
step). A `null` value in metrics.jsonl (non-finite) leaves a gap.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

import numpy as np

from brorl_jax.loop.metrics import read_metrics

TOKENS = "rollout/generated_tokens_total"

# (title, metric names): the training panels, in order. `time/` and `mass/`
# metrics not named here are added generically.
TRAIN_PANELS = (
    ("Reward (mean)", ("reward/mean",)),
    ("Held-out pass@1", ("eval/pass@1",)),
    ("Response length (tokens)", ("rollout/response_len_mean",)),
    ("KL to reference", ("loss/kl_ref",)),
    ("Entropy (nats)", ("loss/entropy",)),
    ("Clip fractions", ("loss/clip_frac_low", "loss/clip_frac_high")),
)
MASS_PANELS = (
    ("First-token mass: sampled correct / incorrect / unsampled",
     ("mass/p_pos", "mass/p_neg", "mass/unsampled_mass")),
    ("Unsampled second moment $U_2$", ("mass/u2",)),
    ("Theorem 1 bounds (margin > 0: correct mass must rise)",
     ("mass/term1_lb", "mass/term2_lb", "mass/term3_bound", "mass/margin")),
    ("Share of prompts with margin > 0", ("mass/frac_margin_positive",)),
    ("Realized first-token mass change",
     ("mass/d_correct_mass", "mass/d_incorrect_mass",
      "mass/d_unsampled_mass")),
    (r"Rescored rollouts: mean $\Delta\log\pi$, worst correct",
     ("mass/dlogp_correct", "mass/dlogp_incorrect",
      "mass/worst_dlogp_correct")),
    ("Share of correct rollouts whose likelihood rose",
     ("mass/frac_correct_rose",)),
)

Series = dict[str, tuple[np.ndarray, np.ndarray]]


def series(records: Sequence[dict]) -> Series:
  """Per metric, the steps that log it and its values (None -> NaN).

  Args:
    records: metrics.jsonl records (`{"step": int, name: value, ...}`).

  Returns:
    name -> (steps `[n]` int64, values `[n]` float64), sorted by step; when
    a step logs a metric twice (e.g. after a resume), the last value wins.
  """
  points: dict[str, dict[int, float]] = {}
  for record in records:
    step = int(record["step"])
    for name, value in record.items():
      if name == "step" or isinstance(value, (str, list, dict)):
        continue
      points.setdefault(name, {})[step] = (np.nan if value is None
                                           else float(value))
  out = {}
  for name, by_step in points.items():
    steps = np.array(sorted(by_step), np.int64)
    out[name] = (steps, np.array([by_step[s] for s in steps], np.float64))
  return out


def panels(names: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
  """The panels to draw for a run that logs `names`, empty ones left out.

  Fixed panels first, then one panel for all `time/*` metrics, then the
  known `mass/*` groups, then one panel per other `mass/*` metric.
  """
  present = set(names)
  chosen = []
  for title, metrics in TRAIN_PANELS:
    chosen.append((title, tuple(m for m in metrics if m in present)))
  chosen.append(("Time per step (s)", tuple(sorted(
      m for m in present if m.startswith("time/")))))
  known = set()
  for title, metrics in MASS_PANELS:
    known.update(metrics)
    chosen.append((title, tuple(m for m in metrics if m in present)))
  chosen.extend((m, (m,)) for m in sorted(present - known)
                if m.startswith("mass/"))
  return [(title, metrics) for title, metrics in chosen if metrics]


def _figure(num_panels: int, columns: int = 3):
  # Imported here: matplotlib is slow to import and only figures need it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  # pyplot only after use("Agg"), which picks the backend.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = -(-num_panels // columns)
  # Constrained layout leaves room for the suptitle (tight_layout does not).
  fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows),
                           squeeze=False, layout="constrained")
  for ax in axes.flat[num_panels:]:
    ax.set_visible(False)
  return plt, fig, axes.flat


def _save(plt, fig, title: str, out: pathlib.Path) -> None:
  fig.suptitle(title)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)


def plot_run(workdir: str | pathlib.Path,
             out: str | pathlib.Path | None = None) -> pathlib.Path:
  """Writes the PNG of one run's metrics.

  Args:
    workdir: the run's workdir (with metrics.jsonl).
    out: PNG path (default `workdir/metrics.png`).

  Returns:
    The PNG path.

  Raises:
    FileNotFoundError: no metrics.jsonl (the message names the path).
    ValueError: the file has no metric this plot knows.
  """
  workdir = pathlib.Path(workdir)
  out = pathlib.Path(out) if out else workdir / "metrics.png"
  data = series(read_metrics(workdir))
  chosen = panels(list(data))
  if not chosen:
    raise ValueError(f"{workdir / 'metrics.jsonl'} has no metric to plot "
                     f"(found: {sorted(data)[:10]})")
  plt, fig, axes = _figure(len(chosen))
  for ax, (title, metrics) in zip(axes, chosen):
    for metric in metrics:
      steps, values = data[metric]
      ax.plot(steps, values, marker="." if len(steps) < 30 else None,
              label=metric)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(metrics) > 1 or metrics[0] not in title:
      ax.legend(fontsize=7)
  _save(plt, fig, f"{workdir.name}: metrics by step", out)
  return out


def tokens_axis(data: Series, steps: np.ndarray) -> np.ndarray:
  """Cumulative generated tokens at each of `steps` (see the module doc)."""
  token_steps, tokens = data[TOKENS]
  index = np.searchsorted(token_steps, steps, side="right") - 1
  return np.where(index >= 0, tokens[np.maximum(index, 0)], 0.0)


def _arm_curve(runs: list[Series], metric: str):
  """(x, mean, min, max) of `metric` against tokens over an arm's seeds.

  Seeds generate different numbers of tokens per step, so each is
  interpolated onto the union of their x values inside the range all of
  them cover. Returns None when no seed logs the metric; with one seed, or
  ranges that do not overlap, the band is that of the seeds that have it.
  """
  curves = []
  for data in runs:
    if metric in data:
      steps, values = data[metric]
      x = tokens_axis(data, steps)
      ok = np.isfinite(values)
      if ok.any():
        curves.append((x[ok], values[ok]))
  if not curves:
    return None
  if len(curves) == 1:
    x, y = curves[0]
    return x, y, y, y
  low = max(x.min() for x, _ in curves)
  high = min(x.max() for x, _ in curves)
  grid = np.unique(np.concatenate([x for x, _ in curves]))
  grid = grid[(grid >= low) & (grid <= high)]
  if len(grid) == 0:
    x, y = curves[0]
    return x, y, y, y
  ys = np.stack([np.interp(grid, x, y) for x, y in curves])  # [seeds, X]
  return grid, ys.mean(0), ys.min(0), ys.max(0)


def _default_label(workdirs: Sequence[pathlib.Path]) -> str:
  names = [w.resolve().name for w in workdirs]
  if len(names) == 1:
    return names[0]
  prefix = os.path.commonprefix(names).rstrip("_-.")
  return prefix or "+".join(names)


def plot_compare(arms: Sequence[Sequence[str | pathlib.Path]],
                 out: str | pathlib.Path,
                 labels: Sequence[str] | None = None) -> pathlib.Path:
  """Writes the comparison PNG: metrics against cumulative generated tokens.

  Args:
    arms: per arm, its workdirs (seeds).
    out: PNG path.
    labels: one label per arm (default: the workdir name, or the common
      prefix of the seeds' names).

  Returns:
    The PNG path.

  Raises:
    FileNotFoundError: a workdir has no metrics.jsonl (names the path).
    ValueError: wrong number of labels, or a run without
      `rollout/generated_tokens_total`.
  """
  arms = [[pathlib.Path(w) for w in arm] for arm in arms]
  if labels is None:
    labels = [_default_label(arm) for arm in arms]
  if len(labels) != len(arms):
    raise ValueError(f"{len(labels)} labels for {len(arms)} arms; give one "
                     "label per arm (--labels A,B)")
  data = []
  for arm in arms:
    data.append([])
    for workdir in arm:
      run = series(read_metrics(workdir))
      if TOKENS not in run:
        raise ValueError(f"{workdir / 'metrics.jsonl'} has no {TOKENS}: "
                         "cannot place it on the generated-tokens axis")
      data[-1].append(run)
  names = set().union(*(run for arm in data for run in arm))
  metrics = [m for m in ("eval/pass@1", "reward/mean", "rollout/mixed_share")
             if m in names]
  known = [m for _, group in MASS_PANELS for m in group if m in names]
  metrics += known + sorted(m for m in names
                            if m.startswith("mass/") and m not in known)
  if not metrics:
    raise ValueError("none of the runs logs eval/pass@1, reward/mean or "
                     "mass/* metrics")
  plt, fig, axes = _figure(len(metrics))
  for ax, metric in zip(axes, metrics):
    for i, (label, runs) in enumerate(zip(labels, data)):
      curve = _arm_curve(runs, metric)
      if curve is None:
        continue
      x, mean, low, high = curve
      ax.plot(x, mean, color=f"C{i}", marker="." if len(x) < 30 else None,
              label=f"{label} (n={len(runs)})")
      if len(runs) > 1:
        ax.fill_between(x, low, high, color=f"C{i}", alpha=0.2)
    ax.set_title("Held-out pass@1" if metric == "eval/pass@1" else metric,
                 fontsize=10)
    ax.set_xlabel("generated tokens (cumulative)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  _save(plt, fig, "At equal generated tokens: mean and min-max over seeds",
        pathlib.Path(out))
  return pathlib.Path(out)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI; returns the exit code (2 on bad input)."""
  parser = argparse.ArgumentParser(prog="python -m brorl_jax.plot",
                                   description=__doc__.split("\n")[0])
  mode = parser.add_mutually_exclusive_group(required=True)
  mode.add_argument("--workdir", help="plot this run's metrics.jsonl")
  mode.add_argument("--compare", nargs="+", metavar="W[,W...]",
                    help="arms to compare; comma-separated workdirs are "
                         "seeds of one arm")
  parser.add_argument("--labels", help="comma-separated, one per arm")
  parser.add_argument("--out", help="output PNG (default W/metrics.png, or "
                                    "compare.png with --compare)")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if args.workdir:
      if args.labels:
        raise ValueError("--labels goes with --compare")
      out = plot_run(args.workdir, args.out)
    else:
      arms = [[w for w in arm.split(",") if w] for arm in args.compare]
      labels = args.labels.split(",") if args.labels else None
      out = plot_compare(arms, args.out or "compare.png", labels)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


def run() -> None:
  """Console-script entry point (`brorl-plot`)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
