"""The RL loop: `python -m brorl_jax.train --config C --workdir W`.

  python -m brorl_jax.train --config C --workdir W [--config.a.b=v ...]
  python -m brorl_jax.train --config C [--config.a.b=v ...] --print_config
  python -m brorl_jax.train --config C --dry_run [--device_memory_gb G]

The entry point: parses the flags and calls the loop (`loop/trainer.py`)
or the dry run (`sizing.py`). Running `train` again on the same workdir
resumes from its last checkpoint; on SIGTERM the in-flight iteration is
abandoned and the last completed state is saved before exiting 0.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from brorl_jax import checkpointing
from brorl_jax import cli
from brorl_jax import distributed
from brorl_jax import run_config
from brorl_jax import sizing
from brorl_jax.loop.trainer import Trainer
from brorl_jax.rl import nonfinite


def train(config: Any, workdir: str) -> dict[str, float]:
  """Validates `config` (a ConfigDict), then runs or resumes the loop."""
  cfg = run_config.load(config)
  return Trainer(cfg, workdir).run()


# ---- command line ------------------------------------------------------------

def run(argv: list[str] | None = None) -> None:
  """Console entry point (`brorl-train`); `argv` excludes the program name.

  `--print_config` prints the resolved config (overrides applied, presets
  expanded, derived values filled in) and exits before anything is built.
  """
  argv = [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))
  cli.add_config_root(argv)
  config_flags.DEFINE_config_file("config", None, "ml-collections config file",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory (resumes if present)")
  flags.DEFINE_bool("print_config", False, "print the resolved config (after "
                    "overrides, as the run would use it) and exit")
  flags.DEFINE_bool("dry_run", False, "report per-device memory; no training")
  flags.DEFINE_float("device_memory_gb", None, "--dry_run: memory per device "
                     "in GiB (default: the TPU's HBM, the GPU's JAX limit, "
                     "else 80, an H100)")
  flags.DEFINE_string("dry_run_topology", None, "--dry_run: compile for this "
                      "TPU topology ahead of time (libtpu needed), e.g. "
                      "v5p:4x4x2 for a v5p-64 slice; or GPUs, "
                      "kind:slices x hosts x devices per host, e.g. "
                      "h100:8x1x8 (extra [gpu-aot], JAX_PLATFORMS=cpu)")
  flags.DEFINE_integer("dry_run_layers", 0, "--dry_run: 0 = auto (deep "
                       "models compile at 1 and 2 layers, 2 and 4 with "
                       "remat, extrapolated); >= depth compiles the full "
                       "model")
  flags.DEFINE_string("json", None, "--dry_run: also write the summary "
                      "(peaks in GiB per device, fits, sources) as JSON here")
  for alias, name in cli.dashed_aliases(
      ("print_config", "dry_run", "device_memory_gb", "dry_run_topology",
       "dry_run_layers")).items():
    flags.DEFINE_alias(alias, name)
  flags.mark_flags_as_required(["config"])

  def main(_):
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fl = flags.FLAGS
    with cli.input_errors():
      cfg = run_config.load(fl.config)
    if cfg.logging.progress_mode() == "off":
      # Only errors, and the final summary (printed, not logged).
      logging.getLogger().setLevel(logging.ERROR)
    if fl.print_config:
      print(run_config.dumps(cfg))
      return
    if fl.dry_run:
      with cli.input_errors():
        sizing.dry_run(cfg, device_memory_gb=fl.device_memory_gb,
                       topology=fl.dry_run_topology, layers=fl.dry_run_layers,
                       json_path=fl.json)
      return
    if not fl.workdir:
      cli.fail("--workdir is required (the run's directory)")
    with distributed.exit_on_error(), cli.input_errors():
      try:
        Trainer(cfg, fl.workdir).run()
      except checkpointing.CheckpointError as e:  # a save or restore failed
        cli.fail(e, status=1)
      except nonfinite.NonFiniteRun as e:    # the first steps trained nothing
        cli.fail(e, status=1)

  app.run(main, argv=argv,
          flags_parser=lambda args: cli.parse_flags(flags.FLAGS, args))


if __name__ == "__main__":
  run()
