"""python -m brorl_jax.bench sampler|step|verifiers|attention|gpu [--json PATH] [...]"""

import importlib
import sys

from brorl_jax import cli

BENCHES = ("sampler", "step", "verifiers", "attention", "gpu")


def run(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in BENCHES:
    sys.exit(f"usage: python -m brorl_jax.bench {{{'|'.join(BENCHES)}}} "
             "[--json PATH] [options]")
  module = importlib.import_module(f"brorl_jax.bench.{argv[0]}")
  with cli.input_errors():  # e.g. `step --config` with a bad key
    module.main(argv[1:])


if __name__ == "__main__":
  run()
