"""The paper's Figure 1 at CPU scale: ProRL until it stops improving, then
ProRL and BroRL continued from that checkpoint at an equal token budget.

  python -m brorl_jax.train --config configs/plateau_cpu.py:base \\
      --workdir W/base
  python -m brorl_jax.compare --config configs/plateau_cpu.py \\
      --workdir W/branches --arms prorl,brorl --seeds 0,1,2 --from W/base

1. `base`: the CPU demo's warm start, then ProRL-style RL (N = 16 rollouts
   x 32 prompts per step) evaluated every 20 steps until held-out pass@1
   stops rising (`eval.plateau_window`: over the last 4 evaluations the
   least-squares slope against generated tokens is not significantly
   positive, one-sided 95 %); its last checkpoint is the branch point.
2. `compare --from W/base` exports that checkpoint and continues both arms
   from it (fresh optimizer state each, as runs from a released checkpoint
   start), for the same budget of generated tokens, several seeds:
   * prorl: the base run's own settings (N = 16 x 32 prompts);
   * brorl: N = 128 x 8 prompts (twice the samples per step, the same
     number of mini-batches, the learning rate x sqrt(2)), as in
     configs/compare_cpu.py.
   `W/branches/compare.png` draws the base curve, the branch point and
   both arms against cumulative generated tokens, with the mass-balance
   diagnostics of both branches; `compare.json` holds the intervals.

Status: this experiment has not been run yet (issue 32). The config is for
running it; its values are a starting point, not measured choices: the
step at which the base run plateaus, the experiment's wall time (the aim is
60 minutes on 2 cores) and which branch gains more are unknown. What they
rest on: the arms are configs/compare_cpu.py's (whose 600k-token runs took
2:37-3:09 each on 2 cores), the branch budget is twice theirs, and a
window of 4 evaluations gives the slope test 2 degrees of freedom (3, the
least, gives 1: a one-sided t quantile of 6.31, which calls almost any
noisy curve flat; 4 gives 2.92). Expect to retune `total_steps`,
`eval.every`, `eval.plateau_window` and `max_generated_tokens` after a
first run, and quote only what that run measures.
"""

from configs import compare_cpu

ARMS = ("base", "prorl", "brorl")


def get_config(arm: str = "base"):
  if arm not in ARMS:
    raise ValueError(f"configs/plateau_cpu.py:<arm>: arm must be one of "
                     f"{ARMS}, got {arm!r}")
  c = compare_cpu.get_config("brorl" if arm == "brorl" else "prorl")
  # The demo's 512 held-out problems x 8 samples (compare_cpu's 256 are for
  # its shorter runs): the plateau test and the branches' differences need
  # the lower evaluation noise.
  c.data.synthetic = {**c.data.synthetic, "eval": 512}
  c.diagnostics.every = 4              # the branches' mass diagnostics
  if arm == "base":
    c.max_generated_tokens = None
    # A cap, not the stop: the plateau test is meant to end the run first
    # (not yet measured: if the cap ends it, `eval/plateau` is never logged
    # and the branch point is not a plateau).
    c.total_steps = 400
    c.eval.every = 20
    c.eval.plateau_window = 4
    c.checkpoint.every = 20
    c.checkpoint.keep = 2
  else:
    # Both branches: the same budget of generated tokens from the branch
    # point (ProRL evaluates every 20 steps, BroRL every 10: equal token
    # intervals); twice compare_cpu's 600k, so by its timings an estimated
    # 5-7 minutes per run on 2 cores with the larger evaluation (not
    # measured for this config).
    c.max_generated_tokens = 1_200_000
  return c
