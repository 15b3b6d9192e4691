"""tiny_rl for the multi-process tests: a checkpoint every step, no eval.

Two processes x 2 CPU devices and one process x 4 devices build the same
global mesh (4, 1, 1): P = 4 prompts, one per device. Evaluation and the
post-update diagnostics are off: they add compile time, not multi-host
coverage (the loop's own gathers, checkpoints and resume are what is
tested).
"""

from tests.configs import tiny_rl


def get_config():
  c = tiny_rl.get_config()
  c.total_steps = 2
  c.mesh.shape = (4, 1, 1)
  c.data.synthetic = {"task": "arithmetic", "train": 300, "eval": 0,
                      "seed": 0, "difficulty": [1]}
  c.eval.every = 0
  c.diagnostics.every = 0
  c.checkpoint.every = 1
  c.rewards.num_workers = 1
  return c
