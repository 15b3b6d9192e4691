"""BroRL arm: N = 512 rollouts x 128 prompts per step (PAPER.md §4.3).

  python -m brorl_jax.train --config configs/brorl_qwen2_1p5b.py \
      --workdir /shared/runs/brorl \
      --config.init.path=/models/Nemotron-Research-Reasoning-Qwen-1.5B \
      --config.data.train_files="('math.jsonl', 'code.jsonl', ...)"

The paper's BroRL rows (Table 1: "BroRL, N 512, 128 prompts/step, +107 /
+134 / +191 steps", 64 H100s) differ from the ProRL arm only in the values
below, so this config imports `prorl_qwen2_1p5b` (which imports
`configs/base.py`) and overrides exactly those; see that file for every
value the paper leaves unstated and what we chose.

  * rollouts per prompt N: 512 (ProRL arm: 16);
  * prompts per step: 128 (ProRL arm: 512): 65,536 samples per step, 8x;
  * PPO mini-batches: the same number (8), so each is 8x larger;
  * learning rate: eta_0 x sqrt(65,536 / 8,192) = 2.83 eta_0 ("the square
    root of the increase in the batch size"), through
    `optim.reference_samples_per_step` = the ProRL arm's 8,192 samples;
  * decode slots: 65,536 rows x 16k tokens of KV do not fit at once (470
    MiB of bf16 KV per row for this model): the refilled decode runs
    `max_decode_rows` slots (the ProRL arm's 8,192, from `--dry_run
    --dry_run_topology=h100:8x1x8`; see the README's sizing table).
"""

from configs import prorl_qwen2_1p5b


def get_config():
  c = prorl_qwen2_1p5b.get_config()
  c.total_steps = 191                 # the paper's longest BroRL arm
  c.rollout.prompts_per_step = 128
  c.rollout.n = 512
  # (the ProRL arm's refill with 8,192 slots: 64 per prompt, each slot
  # serving 8 of the prompt's 512 rollouts in turn)
  # c.algo.num_minibatches stays 8; c.optim.learning_rate stays eta_0 and
  # is scaled by sqrt(128 * 512 / reference_samples_per_step).
  c.checkpoint.every = 5              # ~1 h per step in the paper
  c.logging.archive_every = 20        # ~8.6 GB of rollouts per archived step
  return c
