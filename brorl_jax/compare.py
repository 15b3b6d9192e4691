"""Arms x seeds from one warm start, at an equal generated-token budget.

  python -m brorl_jax.compare --config configs/compare_cpu.py --workdir W \\
      --arms prorl,brorl,adaptive --seeds 0,1,2 [--config.a.b=v ...]

1. The warm start (the config's `warmstart` stage, the first arm's config)
   runs once, into `W/warmstart` (a model directory: params, tokenizer).
2. Each (arm, seed) trains in its own process, `python -m brorl_jax.train
   --config CONFIG:ARM --workdir W/ARM/sSEED --config.seed=SEED` from that
   warm start; further `--config.*` flags go to every run. A finished run
   (marked `compare_done`) is not run again, so an interrupted comparison
   resumes where it stopped.
3. `W/compare.json`: {arm: {seed: {pass1_start, pass1_end, steps, tokens,
   mixed_group_share, mass_u2, frac_margin_positive, ...}}}, and
   `W/compare.png` (`plot.plot_compare`: held-out pass@1 and the mass
   diagnostics against cumulative generated tokens, min-max over seeds).

Also a console script, `brorl-compare`. Flags are absl's, as in the other
entry points (`--flag=value` or `--flag value`, `--flagfile`); a bad flag
or override key is one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Sequence

import numpy as np
from absl import app, flags

from brorl_jax import checkpointing
from brorl_jax import cli
from brorl_jax.loop import experiment as exp_lib
from brorl_jax import plot
from brorl_jax import run_config
from brorl_jax.config import ConfigError
from brorl_jax.loop.metrics import read_metrics
from brorl_jax.warmstart import run_warmstart

WARMSTART = "warmstart"
DONE = "compare_done"

# Per-step metrics averaged over a run's steps: compare.json name -> metric
# (the first one the run logs).
STEP_MEANS = {
    "mixed_group_share": ("rollout/mixed_share", "group/mixed_frac"),
    "mass_u2": ("mass/u2",),
    "frac_margin_positive": ("mass/frac_margin_positive",),
    "unsampled_mass": ("mass/unsampled_mass",),
    "n_min": ("rollout/n_min",),
    "n_max": ("rollout/n_max",),
    "coupling_pred": ("rollout/coupling_pred",),
    "coupling_measured": ("rollout/coupling_measured",),
}


def load_config(path: str, arm: str):
  """`get_config(arm)` of the config file at `path`."""
  path = pathlib.Path(path).resolve()
  root = str(path.parent.parent)       # configs/ imports `from configs ...`
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"_compare_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arm)


def apply_overrides(config, overrides: Sequence[str]):
  """`--config.a.b=v` flags applied to a ConfigDict (values as literals).

  Raises:
    ConfigError: a key the config does not have (names the closest ones).
  """
  parsed = {}
  for flag in overrides:
    key, _, value = flag[len("--config."):].partition("=")
    error = cli.bad_override(config, key)
    if error is not None:
      raise error
    try:
      parsed[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed[key] = value                # a bare string
  return cli.set_keys(config, parsed)


def warm_start(config, workdir: pathlib.Path) -> pathlib.Path:
  """Runs the config's warm start once into `workdir` (a model directory)."""
  params_dir = workdir / "params"
  if params_dir.exists():
    return workdir
  cfg = run_config.load(config)
  exp_lib.setup_jax(cfg)
  exp = exp_lib.build(cfg, workdir)
  params = exp.initial_params()
  if cfg.warmstart.steps:
    params, _ = run_warmstart(exp, params, cfg.warmstart)
  tmp = workdir / "params.tmp"
  checkpointing.save_params(tmp, params)
  os.replace(tmp, params_dir)
  return workdir


def summarize(records: Sequence[dict]) -> dict:
  """One run's figures from its metrics.jsonl records."""
  evals = [(r["step"], r["eval/pass@1"]) for r in records
           if r.get("eval/pass@1") is not None]
  steps = [r for r in records if "rollout/generated_tokens" in r]
  if not evals or not steps:
    raise ValueError("the run logged no held-out pass@1 or no RL step")
  out = {"pass1_start": evals[0][1], "pass1_end": evals[-1][1],
         "steps": steps[-1]["step"],
         "tokens": steps[-1]["rollout/generated_tokens_total"],
         "updates": steps[-1].get("optim/updates_total")}
  out["gain"] = out["pass1_end"] - out["pass1_start"]
  for name, keys in STEP_MEANS.items():
    for key in keys:
      values = [r[key] for r in steps if r.get(key) is not None]
      if values:
        out[name] = float(np.mean(values))
        break
  return out


def table(results: dict) -> str:
  """Markdown table: per arm, means over seeds and the gain's spread."""
  lines = ["| arm | seeds | steps | pass@1 start | end | gain (spread) | "
           "mixed_group_share | mass_u2 | frac_margin_positive |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for arm, seeds in results.items():
    runs = list(seeds.values())
    mean = lambda k: np.mean([r[k] for r in runs if k in r])  # noqa: E731
    gains = [r["gain"] for r in runs]
    lines.append(
        f"| {arm} | {len(runs)} | {mean('steps'):.1f} | "
        f"{mean('pass1_start'):.4f} | {mean('pass1_end'):.4f} | "
        f"{np.mean(gains):+.4f} ({max(gains) - min(gains):.4f}) | "
        f"{mean('mixed_group_share'):.3f} | {mean('mass_u2'):.5f} | "
        f"{mean('frac_margin_positive'):.3f} |")
  return "\n".join(lines)


def _flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, "Config file whose get_config(arm) "
                      "builds an arm.", flag_values=fv)
  flags.DEFINE_string("workdir", None, "Directory of the comparison (the "
                      "warm start, one run per arm and seed, compare.json).",
                      flag_values=fv)
  flags.DEFINE_list("arms", None, "Arms, comma-separated (e.g. "
                    "prorl,brorl,adaptive).", flag_values=fv)
  flags.DEFINE_list("seeds", ["0"], "Seeds, comma-separated.", flag_values=fv)
  return fv


def main(argv: Sequence[str]) -> int:
  """Parses `argv` (program name first), runs every arm and seed, reports.

  `--config.KEY=VALUE` arguments are overrides that go on to every run;
  absl parses the rest.
  """
  argv = list(argv)
  fv = _flags()
  if any(a in ("-h", "--help") for a in argv[1:]):
    print(__doc__ + "\nflags:\n" + fv.get_help())
    return 0
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  cli.parse_flags(fv, [a for a in argv if not a.startswith("--config.")])
  for name in ("config", "workdir", "arms"):
    if not fv[name].value:
      raise app.UsageError(f"--{name} is required")
  try:
    seeds = [int(s) for s in fv.seeds if s]
  except ValueError:
    raise app.UsageError(f"--seeds must be integers, got {fv.seeds}"
                         ) from None
  # The runs get the environment as it is before JAX starts here: a backend
  # may set variables (libtpu writes TPU_WORKER_HOSTNAMES) that would make
  # a child think it is one process of a pod.
  env = dict(os.environ)
  arms = [a for a in fv.arms if a]
  workdir = pathlib.Path(fv.workdir).absolute()
  try:
    configs = {arm: apply_overrides(load_config(fv.config, arm), overrides)
               for arm in arms}
  except ValueError as e:            # an arm the config does not know
    if isinstance(e, ConfigError):
      raise
    raise app.UsageError(f"--arms: {e}") from None
  for config in configs.values():    # a bad arm fails before anything runs
    run_config.load(config)
  workdir.mkdir(parents=True, exist_ok=True)

  t0 = time.perf_counter()
  ws = warm_start(configs[arms[0]], workdir / WARMSTART)
  print(f"warm start: {ws} ({time.perf_counter() - t0:.0f} s)", flush=True)
  results: dict = {}
  for arm in arms:
    for seed in seeds:
      run = workdir / arm / f"s{seed}"
      if not (run / DONE).exists():
        t1 = time.perf_counter()
        cmd = [sys.executable, "-m", "brorl_jax.train", "--config",
               f"{fv.config}:{arm}", "--workdir", str(run), *overrides,
               f"--config.seed={seed}", f"--config.init.path={ws}",
               "--config.warmstart.steps=0", "--config.logging.progress=off"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
        seconds = time.perf_counter() - t1
        (run / DONE).write_text(json.dumps({"seconds": seconds}))
        print(f"{arm} seed {seed}: {seconds:.0f} s", flush=True)
      results.setdefault(arm, {})[str(seed)] = {
          **summarize(read_metrics(run)),
          "seconds": json.loads((run / DONE).read_text())["seconds"]}
  (workdir / "compare.json").write_text(json.dumps(results, indent=1))
  plot.plot_compare([[workdir / arm / f"s{s}" for s in seeds]
                     for arm in arms], workdir / "compare.png", labels=arms)
  print(table(results))
  print(f"wrote {workdir / 'compare.json'} and {workdir / 'compare.png'}")
  return 0


def run(argv: Sequence[str] | None = None) -> None:
  """Console entry point (`brorl-compare`)."""
  try:
    with cli.input_errors(FileNotFoundError):
      status = main(sys.argv if argv is None else argv)
  except app.UsageError as e:
    print(f"usage error: {e}\nusage:\n" + "\n".join(
        __doc__.splitlines()[2:4]), file=sys.stderr)
    sys.exit(cli.INPUT_ERROR)
  sys.exit(status)


if __name__ == "__main__":
  run()
