"""A tiny RL run for end-to-end tests: seconds per iteration on CPU.

Rewards come from the `numeric` verifier (no timeouts can change them), and
an entropy bonus keeps every update non-trivial even when a random model
earns no reward, so resume tests compare real parameter changes.
"""

from configs import demo_cpu


def get_config():
  c = demo_cpu.get_config()
  c.total_steps = 4
  c.model.preset = "tiny"
  c.data.synthetic = {"task": "arithmetic", "train": 300, "eval": 8,
                      "seed": 0, "difficulty": [1]}
  c.init.tokenizer_vocab_size = 320
  c.rollout.prompts_per_step = 4
  c.rollout.n = 8
  c.rollout.max_prompt_len = 40
  c.rollout.max_new_tokens = 10
  c.rollout.max_decode_rows = 16     # 4 refilled slots per prompt
  c.rollout.refill = True            # the end-to-end tests run the refill
  c.rollout.segment_steps = 3        # several segments per decode
  c.algo.num_minibatches = 2
  c.algo.micro_batch_size = 8
  c.algo.advantage.dynamic_sampling = False
  c.algo.loss.entropy_coef = 0.01
  c.algo.vocab_chunk = 128
  c.algo.seq_chunk = 16
  c.optim.learning_rate = 1e-3
  c.warmstart.steps = 0
  c.eval.every = 2
  c.eval.n = 2
  c.eval.k = (1, 2)
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.diagnostics.rescore_rollouts = 8
  c.logging.progress = "lines"
  return c
