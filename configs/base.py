"""Base config: every section with its defaults. Variants import and override.

  python -m brorl_jax.train --config configs/base.py --workdir W \
      --config.data.train_files="('train.jsonl',)" --config.init.path=HF_DIR

Keys are documented next to the dataclass that validates them
(brorl_jax/config.py and each stage's config class); the comments here say
why a default was chosen.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 100
  # Stop early once this many tokens were generated (counting groups that
  # dynamic sampling dropped, as the paper counts samples): equal-compute
  # comparisons of rollout counts. None = off.
  c.max_generated_tokens = ml_collections.FieldReference(None, int)

  c.model = ml_collections.ConfigDict()
  c.model.preset = "qwen2_1p5b"
  c.model.param_dtype = "float32"   # f32 master weights; bf16 compute below
  c.model.dtype = "bfloat16"
  c.model.remat = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)         # (data, fsdp, tensor)
  c.mesh.distributed = "auto"
  c.mesh.coordinator_address = ml_collections.FieldReference(None, str)
  c.mesh.num_processes = ml_collections.FieldReference(None, int)
  c.mesh.process_id = ml_collections.FieldReference(None, int)
  c.mesh.initialization_timeout_s = 300
  c.mesh.heartbeat_timeout_s = 100

  c.data = ml_collections.ConfigDict()
  c.data.train_files = ()
  c.data.eval_files = ()
  c.data.skip_bad_rows = False
  c.data.shuffle = True
  c.data.seed = 0
  c.data.num_epochs = ml_collections.FieldReference(None, int)
  c.data.system_prompt = ml_collections.FieldReference(None, str)
  # DeepScaleR / ProRL math prompt suffix.
  c.data.instruction = (" Let's think step by step and output the final "
                        "answer within \\boxed{}.")
  c.data.apply_chat_template = True
  c.data.add_bos = False
  c.data.prefetch = 1
  c.data.synthetic = ml_collections.FieldReference(None, dict)

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_step = 128
  c.rollout.n = 512
  c.rollout.max_prompt_len = 1024
  c.rollout.max_new_tokens = 16_384
  c.rollout.max_decode_rows = 4096
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0             # full distribution: logprobs match loss
  c.rollout.top_k = 0
  c.rollout.greedy = False
  c.rollout.early_stop = True
  c.rollout.refill = False          # True: refilled slots (README, sampler)
  c.rollout.segment_steps = 256     # refill: steps between host check-ins

  c.rewards = ml_collections.ConfigDict()
  c.rewards.correct_threshold = 0.5
  c.rewards.num_workers = 0         # one per core
  c.rewards.timeout_s = 10.0

  c.algo = ml_collections.ConfigDict()
  c.algo.num_minibatches = 4
  c.algo.micro_batch_size = 8
  c.algo.shuffle = True
  c.algo.vocab_chunk = 16_384
  c.algo.seq_chunk = 1024
  c.algo.advantage = ml_collections.ConfigDict()
  c.algo.advantage.estimator = "reinforce_pp_baseline"
  c.algo.advantage.dynamic_sampling = True
  c.algo.advantage.oversample_factor = 1.0
  c.algo.loss = ml_collections.ConfigDict()
  c.algo.loss.eps_low = 0.2
  c.algo.loss.eps_high = 0.28       # clip-higher (ProRL v2)
  c.algo.loss.aggregation = "token_mean"
  c.algo.loss.kl_coef = 1e-4        # ProRL v2 (NeMo RL / OpenRLHF examples)
  c.algo.loss.kl_estimator = "k2"
  c.algo.loss.ratio_cap = ml_collections.FieldReference(None, float)
  c.algo.loss.entropy_coef = 0.0
  c.algo.shaping = ml_collections.ConfigDict()
  c.algo.reference = ml_collections.ConfigDict()
  c.algo.reference.reset_every = 0
  c.algo.reference.reset_optimizer = False

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.reference_samples_per_step = ml_collections.FieldReference(None, int)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  c.checkpoint.preempt_grace_s = 30.0

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 20
  c.eval.n = 16                     # paper: pass@1 averaged over 16 samples
  c.eval.k = (1, 4, 16)
  c.eval.max_prompts = ml_collections.FieldReference(None, int)
  c.eval.temperature = 0.6          # paper's evaluation settings
  c.eval.top_p = 0.95
  c.eval.top_k = 0
  c.eval.greedy = False
  c.eval.max_new_tokens = ml_collections.FieldReference(None, int)
  c.eval.max_decode_rows = ml_collections.FieldReference(None, int)

  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.every = 1
  c.diagnostics.rescore_rollouts = 64

  c.warmstart = ml_collections.ConfigDict()
  c.warmstart.steps = 0             # off: real runs start from a checkpoint
  c.warmstart.seed = ml_collections.FieldReference(None, int)  # None: `seed`

  c.init = ml_collections.ConfigDict()
  c.init.path = ml_collections.FieldReference(None, str)
  c.init.tokenizer = ml_collections.FieldReference(None, str)
  c.init.tokenizer_vocab_size = 512

  c.logging = ml_collections.ConfigDict()
  c.logging.tensorboard = True
  c.logging.progress_bar = True
  c.logging.archive_rollouts = True
  c.logging.text_samples = 4
  return c
