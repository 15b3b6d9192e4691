"""brorl-jax: RLVR for LLMs scaled by rollouts per prompt (BroRL), in JAX.

Data flow (one RL iteration), one module per stage:

  data/       prompts: tokenizer, chat templates, readers, grain pipeline
  model/      the Qwen2-family policy (NNX), KV cache, sharding rules, mesh
  hf.py       Hugging Face safetensors import / export
  rollout/    the in-mesh group sampler (prefill once, shared-prefix decode)
  rewards/    host verifiers and the process pool that runs them
  rl/         advantages, token log-probs, losses, the jitted update,
              mass-balance diagnostics
  loop/       the run: the trainer, the evaluator, the host side of a step
              (scoring, allocated sampling, step logging), the workdir
  checkpointing.py, train.py, evaluate.py, sample.py, simulate.py, bench/,
  plot.py     persistence and entry points

Importing the package is cheap: nothing heavy is imported here.
"""

__version__ = "0.1.0"
