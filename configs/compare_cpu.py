"""BroRL vs ProRL vs adaptive allocation at an equal generated-token budget.

  python -m brorl_jax.compare --config configs/compare_cpu.py --workdir W \
      --arms prorl,brorl,adaptive --seeds 0,1,2

or one arm at a time:

  python -m brorl_jax.train --config configs/compare_cpu.py:prorl --workdir runs/cmp_prorl
  python -m brorl_jax.train --config configs/compare_cpu.py:brorl --workdir runs/cmp_brorl
  python -m brorl_jax.plot --compare runs/cmp_prorl runs/cmp_brorl --out compare.png

Both arms start from the same warm start as the CPU demo (configs/demo_cpu.py:
same seed, data and supervised stage) and stop at the same budget of
generated tokens (`max_generated_tokens`, counting groups that dynamic
sampling dropped, as the paper counts samples before filtering):

  * prorl: N = 16 rollouts x 32 prompts per step (512 samples);
  * brorl: N = 128 rollouts x 8 prompts per step (1,024 samples), the same
    number of PPO mini-batches per step, and the learning rate scaled by the
    square root of the batch growth (x sqrt(2)), as BroRL does (x sqrt(8)
    for 8,192 -> 65,536 samples);
  * adaptive: ProRL's 32 prompts and 512 rows per step, allocated by
    `rl/allocation.py`: a probe of 4 rollouts per prompt, then the other
    384 rows water-filled over the prompts with mixed probes by the
    expected coupling bound, in blocks of 4, up to 48 per prompt (prompts
    with unmixed probes keep their 4 unless the mixed ones are full).

Held-out pass@1 is evaluated at equal token intervals in both arms (every
20 ProRL steps, every 10 BroRL steps), so `plot --compare` draws both on
the paper's Figure 4 axis (generated tokens). Several seeds:
`--config.seed=S --config.data.seed=S`.
"""

from configs import demo_cpu

ARMS = ("prorl", "brorl", "adaptive")


def get_config(arm: str = "brorl"):
  if arm not in ARMS:
    raise ValueError(f"configs/compare_cpu.py:<arm>: arm must be one of "
                     f"{ARMS}, got {arm!r}")
  c = demo_cpu.get_config()
  # The comparison's measured setup: 256 held-out problems (it evaluates
  # every 10-20 steps).
  c.data.synthetic = {**c.data.synthetic, "eval": 256}
  c.total_steps = 1000                  # the token budget ends the run
  c.max_generated_tokens = 600_000      # ~60 ProRL steps of ~19 tokens
  c.algo.num_minibatches = 2            # the same in both arms
  c.optim.reference_samples_per_step = 512
  c.rollout.max_decode_rows = 1024
  c.checkpoint.every = 0
  c.logging.archive_rollouts = False
  if arm == "prorl":
    c.rollout.n = 16
    c.rollout.prompts_per_step = 32
    c.eval.every = 20
  elif arm == "adaptive":
    c.rollout.prompts_per_step = 32
    c.rollout.allocation = "adaptive"
    c.rollout.refill = True             # per-prompt queues hold unequal groups
    c.rollout.budget = 512
    c.rollout.probe_n = 4
    c.rollout.allocation_floor = 4
    c.rollout.allocation_block = 4
    c.rollout.n = 48                    # the cap: G_max of the [P, G_max] rows
    # 16 slots per prompt: a full group decodes in 3 waves, and most
    # prompts' few extra rollouts do not keep 32 idle slots stepping.
    c.rollout.max_decode_rows = 512
    c.eval.every = 20
  else:
    c.rollout.n = 128
    c.rollout.prompts_per_step = 8
    c.eval.every = 10
  return c
