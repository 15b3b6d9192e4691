"""The simulator's command line: CSV, PNG and tables (host side).

  python -m brorl_jax.simulate --config configs/simulator.py --out DIR
  python -m brorl_jax.simulate --check_theorem

The simulation itself (device code) is `brorl_jax/simulator.py`.
"""

from __future__ import annotations

import csv
import os
import sys
import time

import jax
import numpy as np

from brorl_jax import cli
from brorl_jax.config import from_mapping
from brorl_jax.simulator import (CSV_COLUMNS, METRICS, SimulatorConfig,
                                 simulate, theorem_errors)

# ---------------------------------------------------------------------------
# Host side: CSV, PNG, tables, CLI.
# ---------------------------------------------------------------------------


def write_csv(path: str, results: dict[int, dict[str, np.ndarray]],
              record_every: int) -> int:
  """Writes `CSV_COLUMNS` rows for steps 0, k, 2k, ... and the last step.

  Returns:
    The number of data rows written.
  """
  rows = 0
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for n, res in results.items():
      seeds, points = res["q_pos"].shape
      steps = [t for t in range(points)
               if t % record_every == 0 or t == points - 1]
      for s in range(seeds):
        for t in steps:
          writer.writerow([n, s, t] + [f"{float(res[m][s, t]):.9g}"
                                       for m in METRICS])
          rows += 1
  return rows


def plot(path: str, results: dict[int, dict[str, np.ndarray]]) -> None:
  """Figure 3's panels (+ entropy): mean over seeds, min-max band."""
  # Imported here: matplotlib is slow to import and only figures need it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  # pyplot only after use("Agg"), which picks the backend.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  titles = {"q_pos": "Correct mass $Q_{pos}$",
            "pct_improved": "% of correct actions improved",
            "worst_drop": r"Worst $\Delta$ (prob.) among correct actions",
            "entropy": "Entropy (nats)"}
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  for i, n in enumerate(results):
    for ax, m in zip(axes.flat, METRICS):
      y = results[n][m]                                       # [S, T + 1]
      x = np.arange(y.shape[1])
      ax.plot(x, y.mean(0), color=f"C{i}", label=f"N = {n}")
      ax.fill_between(x, y.min(0), y.max(0), color=f"C{i}", alpha=0.25)
  for ax, m in zip(axes.flat, METRICS):
    ax.set_title(titles[m])
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0, 0].legend()
  fig.suptitle("Token-level simulator (BroRL Fig. 3): mean and min-max over "
               "seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary_table(results: dict[int, dict[str, np.ndarray]]) -> str:
  """Last-step means over seeds, plus the extremes of worst_drop."""
  lines = [f"{'N':>6} {'q_pos':>9} {'pct_impr':>9} {'worst_drop':>12} "
           f"{'entropy':>9} {'wd_min@T':>12} {'wd_min_all':>12}"]
  for n, r in results.items():
    lines.append(
        f"{n:>6} {r['q_pos'][:, -1].mean():9.5f} "
        f"{r['pct_improved'][:, -1].mean():9.3f} "
        f"{r['worst_drop'][:, -1].mean():12.4e} "
        f"{r['entropy'][:, -1].mean():9.5f} "
        f"{r['worst_drop'][:, -1].min():12.4e} "
        f"{r['worst_drop'].min():12.4e}")
  lines.append("means over seeds at the last step; wd_min@T: min over seeds "
               "at the last step; wd_min_all: min over seeds and steps.")
  return "\n".join(lines)


def theorem_report(etas=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5), seed: int = 0) -> str:
  """The `--check_theorem` table (float64)."""
  errs = theorem_errors(jax.random.key(seed), tuple(etas))
  finite = errs["finite"]
  lines = [
      "Theorem 1 check, float64. Surrogate: the theorem's own set-based",
      "-(1/N) sum_i R_i p_i (each distinct sampled token once, R_c=+1,",
      "R_w=-1, unsampled 0), one plain gradient step of size eta. This is",
      "NOT the simulator's surrogate (sample-based, centred rewards, AdamW).",
      f"{finite.shape[1]} random cases (vocab 50, N in 1/4/16/64).",
      "relative error |dQ_measured - dQ_theorem| / |dQ_theorem|:",
      f"{'eta':>8} {'median':>10} {'max':>10} {'median ratio':>13}"]
  prev = None
  for eta, row in zip(etas, finite):
    med = np.median(row)
    ratio = "" if prev is None else f"{prev / med:13.2f}"
    lines.append(f"{eta:8.0e} {med:10.3e} {row.max():10.3e} {ratio}")
    prev = med
  lines.append("first order: the error falls like eta (ratio ~10 per row).")
  lines.append(f"linearized step (jvp) vs formula: max relative error "
               f"{errs['linear'].max():.2e}")
  return "\n".join(lines)


def run_cli(cfg: SimulatorConfig,
            out: str) -> dict[int, dict[str, np.ndarray]]:
  """Runs every N, writes `out`/simulator.csv and .png, prints a summary."""
  os.makedirs(out, exist_ok=True)
  wall0, cpu0 = time.perf_counter(), time.process_time()
  results = {}
  for n in cfg.n_values:
    t0 = time.perf_counter()
    results[n] = {k: np.asarray(v) for k, v in simulate(cfg, n).items()}
    print(f"N = {n:>6}: {time.perf_counter() - t0:6.1f} s wall "
          f"({cfg.num_seeds} seeds x {cfg.steps} steps)", flush=True)
  rows = write_csv(os.path.join(out, "simulator.csv"), results,
                   cfg.record_every)
  plot(os.path.join(out, "simulator.png"), results)
  print(f"step {cfg.steps} (step 0: q_pos "
        f"{results[cfg.n_values[0]]['q_pos'][0, 0]:.5f}):")
  print(summary_table(results))
  print(f"wrote {rows} rows to {out}/simulator.csv and {out}/simulator.png; "
        f"total {time.perf_counter() - wall0:.1f} s wall, "
        f"{time.process_time() - cpu0:.1f} s CPU")
  return results


def main(argv):
  # Imported here, as in `run` below (the flags are defined there).
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  fl = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if fl.check_theorem:
    print(theorem_report())
  elif fl.config is None or fl.out is None:
    raise app.UsageError("give --config configs/simulator.py and --out DIR "
                         "(or --check_theorem)")
  else:
    with cli.input_errors():
      cfg = from_mapping(SimulatorConfig, fl.config.to_dict(), "config")
    run_cli(cfg, fl.out)


def run():
  """Console entry point (`brorl-simulate`)."""
  # Flags are defined here, not at import, so tests can import this module
  # beside other entry points that also define --config.
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv)
  cli.add_config_root(argv)
  config_flags.DEFINE_config_file(
      "config", None, "configs/simulator.py; override keys with "
      "--config.KEY=VALUE", lock_config=True)
  flags.DEFINE_string("out", None, "output folder for simulator.csv/.png")
  flags.DEFINE_bool("check_theorem", False,
                    "check Theorem 1 numerically in float64 and exit")
  flags.DEFINE_alias("check-theorem", "check_theorem")
  app.run(main, argv=argv,
          flags_parser=lambda args: cli.parse_flags(flags.FLAGS, args))


if __name__ == "__main__":
  run()
