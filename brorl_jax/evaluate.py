"""Held-out evaluation: pass@1 over n samples and unbiased pass@k.

  python -m brorl_jax.evaluate --config configs/demo_cpu.py --workdir W \\
      [--n 16] [--k 1,4,16] [--json PATH] [--greedy] [--step S] \\
      [--hf_dir DIR] [--max_prompts M] [--config.eval.temperature=0.6 ...]
  python -m brorl_jax.evaluate --config C [--config.a.b=v ...] --print_config
  python -m brorl_jax.evaluate --config C --workdir W --suite math \\
      [--n 16] [--k 1,4,16] [--max_prompts M] [--json PATH]

Every held-out prompt goes through the training stack's own sampler and
verifiers with the config's `eval` sampling settings (`loop/evaluator.py`
says how pass@1 and the unbiased pass@k are computed).

The policy comes from the workdir's latest (or `--step`) checkpoint, or from
a Hugging Face / `hf import` directory (`--hf_dir`, with its tokenizer).
`--print_config` prints the resolved config and exits. Dashed spellings of
the flags (`--hf-dir`, `--max-prompts`) are aliases.

`--suite math` (or `math500,aime24,amc23,gsm8k`) evaluates the benchmark
suite shipped with the package instead of the held-out set: per benchmark
the problems, the accuracy over the n samples, pass@k and maj@k for each
`--k`, with `--max_prompts` problems of each (`loop/suite.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import tempfile
from typing import Any, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from brorl_jax import checkpointing, cli, run_config
from brorl_jax.hf import CheckpointFormatError
from brorl_jax.loop import experiment
from brorl_jax.loop import suite
from brorl_jax.loop.build import PolicySource
from brorl_jax.loop.evaluator import Evaluator, eval_key

log = logging.getLogger(__name__)


def _flags(argv: Sequence[str]):
  fv = flags.FlagValues()
  # `sys_argv`: config_flags defines the `--config.a.b` override flags it
  # finds there (by default it looks at sys.argv, not at `argv`).
  config_flags.DEFINE_config_file("config", None, "Config file (get_config).",
                                  flag_values=fv, lock_config=True,
                                  sys_argv=list(argv))
  flags.DEFINE_string("workdir", None, "Training workdir (or `hf import` "
                      "model dir) to evaluate; unused with --hf_dir.",
                      flag_values=fv)
  flags.DEFINE_integer("n", None, "Samples per prompt (eval.n).",
                       flag_values=fv)
  flags.DEFINE_list("k", None, "pass@k values, e.g. 1,4,16 (eval.k).",
                    flag_values=fv)
  flags.DEFINE_string("json", None, "Write the results here.", flag_values=fv)
  flags.DEFINE_bool("greedy", False, "Greedy decoding (n = 1).",
                    flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).",
                       flag_values=fv)
  flags.DEFINE_string("hf_dir", None, "Evaluate this Hugging Face (or `hf "
                      "import`) directory instead of a checkpoint.",
                      flag_values=fv)
  flags.DEFINE_integer("max_prompts", None, "Evaluate at most M held-out "
                       "prompts (eval.max_prompts).", flag_values=fv)
  flags.DEFINE_string("suite", None, "Evaluate the benchmark suite: math, or "
                      "a comma list of math500, aime24, amc23, gsm8k "
                      "(--max_prompts: per benchmark).", flag_values=fv)
  flags.DEFINE_bool("print_config", False, "Print the resolved config "
                    "(after overrides, as the run would use it) and exit.",
                    flag_values=fv)
  for alias, name in cli.dashed_aliases(("hf_dir", "max_prompts")).items():
    flags.DEFINE_alias(alias, name, flag_values=fv)
  return fv


def _apply_overrides(config: Any, fv: Any) -> None:
  """--n / --k / --max_prompts into the ConfigDict (validated by load)."""
  # The flags may set keys a minimal config leaves to their defaults.
  with config.unlocked():
    if "eval" not in config:
      config.eval = ml_collections.ConfigDict()
    section = config.eval
    if fv.n is not None:
      section.n = fv.n
      if fv.k is None:  # keep the config's k values that still fit
        ks = section.get("k", (1,))
        ks = ([int(x) for x in ks.split(",")] if isinstance(ks, str)
              else [ks] if isinstance(ks, int) else ks)
        section.k = tuple(k for k in ks if k <= fv.n) or (1,)
    if fv.k is not None:
      section.k = tuple(int(k) for k in fv.k)
    if fv.max_prompts is not None:
      section.max_prompts = fv.max_prompts


def main(argv: Sequence[str]) -> dict[str, Any]:
  """Parses `argv` (program name first), evaluates, prints, writes JSON."""
  cli.add_config_root(argv)
  fv = _flags(argv)
  if any(a in ("-h", "--help") for a in argv[1:]):
    print(__doc__ + "\nflags:\n" + fv.get_help())
    return {}
  cli.parse_flags(fv, argv)
  hf_dir = fv.hf_dir
  if fv.config is None:
    raise app.UsageError("--config is required")
  _apply_overrides(fv.config, fv)
  cfg = run_config.load(fv.config)
  if fv.print_config:
    print(run_config.dumps(cfg))
    return {}
  if fv.workdir is None and hf_dir is None:
    raise app.UsageError("--workdir (or --hf_dir) is required")
  experiment.setup_jax(cfg)
  with tempfile.TemporaryDirectory(prefix="brorl_eval_") as tmp:
    if hf_dir is not None:
      # The HF model's own config and tokenizer, built in a scratch
      # directory: a training workdir's model_config.json would win over
      # the HF config.json (experiment.model_config_for).
      if fv.workdir is not None:
        log.warning("--hf_dir given: --workdir %s is not used", fv.workdir)
      source = pathlib.Path(hf_dir)
      cfg = dataclasses.replace(cfg, init=dataclasses.replace(
          cfg.init, path=str(source), tokenizer=None))
      workdir = pathlib.Path(tmp)
    else:
      source = workdir = pathlib.Path(fv.workdir)
      missing = [p for p in (checkpointing.MODEL_CONFIG_FILE, "tokenizer")
                 if not (workdir / p).exists()]
      if missing:
        raise FileNotFoundError(
            f"--workdir {workdir} lacks {', '.join(missing)}: pass the "
            "workdir of a training run (or an `hf import` directory), or "
            "--hf_dir")
    exp = experiment.build(cfg, workdir)
    # The HF directory is the run's `init.path` (resolved by the builder);
    # a workdir's checkpoints (or `hf import` params) are read from it.
    policy = exp.source if hf_dir is not None else PolicySource(
        source, "brorl_jax")
    params, step = policy.load_params(
        exp.model_cfg, exp.param_shardings(sampling=True), step=fv.step,
        progress=cfg.logging.progress)
    with exp.reward_pool() as pool:
      if fv.suite is not None:
        return _run_suite(exp, pool, params, step, fv)
      evaluator = Evaluator(exp, pool, greedy=fv.greedy)
      result = evaluator.run(params, step, eval_key(cfg.seed))
  sampling = ("greedy" if result.greedy else
              f"temperature {cfg.eval.temperature}, top-p {cfg.eval.top_p}")
  which = f" (step {step})" if step is not None else ""
  print(f"held-out evaluation of {hf_dir or fv.workdir}{which}: "
        f"n={result.n} samples per prompt, {sampling}, "
        f"{result.seconds:.1f} s")
  print(result.table())
  report = result.report()
  if fv.json:
    path = pathlib.Path(fv.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
  return report


def _run_suite(exp: Any, pool: Any, params: Any, step: int | None,
               fv: Any) -> dict[str, Any]:
  """`--suite`: evaluates, prints the table, writes `--json`."""
  cfg = exp.cfg
  evaluator = suite.SuiteEvaluator(exp, pool, fv.suite, key="--suite",
                                   greedy=fv.greedy)
  results, raw = evaluator.run(params, step, evaluator.key(cfg.seed))
  sampling = ("greedy" if raw.greedy else
              f"temperature {cfg.eval.temperature}, top-p {cfg.eval.top_p}")
  which = f" (step {step})" if step is not None else ""
  print(f"benchmark suite of {fv.hf_dir or fv.workdir}{which}: n={raw.n} "
        f"samples per problem, {sampling}, {raw.seconds:.1f} s")
  dropped = {k: v for k, v in evaluator.too_long().items() if v}
  if dropped:
    print(f"left out as longer than rollout.max_prompt_len="
          f"{cfg.rollout.max_prompt_len}: " + ", ".join(
              f"{k} {v}" for k, v in dropped.items()))
  print(results.table())
  report = {**results.report(), "step": step, "greedy": raw.greedy,
            "too_long": evaluator.too_long(), "seconds": raw.seconds}
  if fv.json:
    path = pathlib.Path(fv.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
  return report


def run(argv: Sequence[str] | None = None) -> None:
  """Console entry point (`brorl-evaluate`)."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    with cli.input_errors(CheckpointFormatError, FileNotFoundError,
                          checkpointing.CheckpointError):
      main(sys.argv if argv is None else argv)
  except app.UsageError as e:
    print(f"usage error: {e}\nusage:\n" + "\n".join(
        __doc__.splitlines()[2:6]), file=sys.stderr)
    sys.exit(cli.INPUT_ERROR)


if __name__ == "__main__":
  run()
