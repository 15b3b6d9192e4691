"""The CPU demo: a tiny Qwen2-architecture model learns arithmetic with BroRL.

  python -m brorl_jax.train --config configs/demo_cpu.py --workdir runs/demo

Everything is made on the fly: synthetic arithmetic problems (train and a
disjoint held-out set) in the workdir, a SentencePiece tokenizer trained on
them, a supervised warm start on their worked solutions (so RL starts from a
model that is right sometimes), then RL with BroRL's settings scaled to two
CPU cores: many rollouts per prompt (N = 64) and few prompts per step,
REINFORCE++-baseline advantages, dynamic sampling, clip-higher. Held-out
pass@1 is logged at step 0 (before any RL update) and at the end.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.seed = 0
  c.total_steps = 20

  c.model.preset = "demo"
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"
  c.model.remat = False
  c.mesh.shape = (-1, 1, 1)

  c.data.synthetic = {"task": "arithmetic", "train": 20_000, "eval": 128,
                      "seed": 0, "difficulty": [1, 2]}
  c.data.instruction = ""             # the tiny model needs no instruction
  c.init.tokenizer_vocab_size = 384

  c.rollout.prompts_per_step = 8
  c.rollout.n = 64                    # BroRL: many rollouts per prompt
  c.rollout.max_prompt_len = 48
  c.rollout.max_new_tokens = 32
  c.rollout.max_decode_rows = 512
  c.rollout.temperature = 1.0

  c.rewards.num_workers = 1
  c.rewards.timeout_s = 10.0

  c.algo.num_minibatches = 2
  c.algo.micro_batch_size = 64
  c.algo.vocab_chunk = 512
  c.algo.seq_chunk = 32
  c.algo.loss.kl_coef = 0.0           # no reference policy for the demo

  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 1.0

  c.warmstart.steps = 300
  c.warmstart.batch_size = 32
  c.warmstart.learning_rate = 1e-3

  c.checkpoint.every = 10
  c.eval.every = 10
  c.eval.n = 4
  c.eval.k = (1, 4)
  c.eval.temperature = 0.6
  c.eval.top_p = 0.95
  c.diagnostics.every = 1
  c.diagnostics.rescore_rollouts = 64
  c.logging.text_samples = 4
  return c
