"""Token-level simulator of BroRL's Figure 3 (PAPER.md §3).

Run (from the repository root):

  python -m brorl_jax.simulate --config configs/simulator.py --out runs/sim
  python -m brorl_jax.simulate --config configs/simulator.py --out runs/sim \
      --config.n_values='(4, 512)' --config.num_seeds=2 --config.steps=200

The paper states d, the correct set, the seeded logits, the surrogate, the
learning rate, the step count and the N values. It leaves AdamW's beta1,
beta2, eps and weight decay unstated; the defaults here are PyTorch's AdamW
defaults (0.9, 0.999, 1e-8, 0.01). They matter: with gradients of unsampled
actions around 1e-8, eps sets how far Adam moves them, and weight decay pulls
every logit toward 0 (lr * wd * z per step), which lowers Q_pos by itself.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the paper's Figure 3 setup."""
  config = ml_collections.ConfigDict()
  config.num_actions = 128_000   # d: the action (token) count.
  config.num_correct = 10_000    # |P|: actions with reward +1; the rest get -1.
  config.logit_correct = 3.0     # Seeded initial logit of correct actions.
  config.logit_anchor = 5.0      # One correct action (index 0) starts here.
  config.logit_other = 0.0       # Initial logit of incorrect actions.
  # Samples per step; one simulation per value.
  config.n_values = (4, 8, 16, 512, 51200)
  config.num_seeds = 3           # Independent runs per N (paper: unstated).
  config.seed = 0                # Root PRNG seed; run k uses fold_in(seed, k).
  config.steps = 1000            # T: optimizer steps.
  config.learning_rate = 1e-3    # eta.
  # AdamW settings the paper leaves unstated: PyTorch defaults.
  config.b1 = 0.9
  config.b2 = 0.999
  config.eps = 1e-8
  config.weight_decay = 0.01
  config.record_every = 1        # Write CSV rows every k steps (and the last).
  # float32 is the default; "float64" enables jax_enable_x64 for the run
  # (slower, for checking that a result is not a rounding artefact).
  config.dtype = "float32"
  return config
