"""Base config: every section with its defaults. Variants import and override.

  python -m brorl_jax.train --config configs/base.py --workdir W \
      --config.data.train_files="('train.jsonl',)" --config.init.path=HF_DIR

Every key of every section's config dataclass is here with its default, so
any of them can be overridden on the command line (`--config.a.b=v`); a test
(tests/test_config_keys.py) keeps the key sets equal. Keys are documented
next to the dataclass that validates them (brorl_jax/config.py and each
stage's config class); the comments here say why a default was chosen.
Optional values are typed `None`s (`FieldReference(None, int)`), so a command
line such as `--config.model.num_layers=2` parses into the right type.
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
  # Training/prefill attention without [T, T] scores: "auto" = blockwise on
  # CPU, cuDNN on GPU, Pallas splash on TPU ("reference": full scores).
  c.model.attention_backend = "auto"
  # The preset's fields, overridable one by one; None keeps the preset's.
  c.model.vocab_size = ml_collections.FieldReference(None, int)
  c.model.embed_dim = ml_collections.FieldReference(None, int)
  c.model.num_layers = ml_collections.FieldReference(None, int)
  c.model.num_heads = ml_collections.FieldReference(None, int)
  c.model.num_kv_heads = ml_collections.FieldReference(None, int)
  c.model.head_dim = ml_collections.FieldReference(None, int)
  c.model.mlp_dim = ml_collections.FieldReference(None, int)
  c.model.rope_theta = ml_collections.FieldReference(None, float)
  c.model.rms_norm_eps = ml_collections.FieldReference(None, float)
  c.model.tie_embeddings = ml_collections.FieldReference(None, bool)
  c.model.qkv_bias = ml_collections.FieldReference(None, bool)
  c.model.qk_norm = ml_collections.FieldReference(None, bool)
  c.model.rope_type = ml_collections.FieldReference(None, str)
  c.model.rope_factor = ml_collections.FieldReference(None, float)
  c.model.rope_low_freq_factor = ml_collections.FieldReference(None, float)
  c.model.rope_high_freq_factor = ml_collections.FieldReference(None, float)
  c.model.rope_original_max_position_embeddings = (
      ml_collections.FieldReference(None, int))
  c.model.max_position_embeddings = ml_collections.FieldReference(None, int)
  c.model.bos_id = ml_collections.FieldReference(None, int)
  c.model.eos_id = ml_collections.FieldReference(None, int)

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
  # Column names of the prompt, the reference answer and the verifier in
  # every file (e.g. "question" / "solution"); dotted for nested columns.
  c.data.prompt_key = "prompt"
  c.data.answer_key = "answer"
  c.data.verifier_key = "verifier"
  c.data.default_verifier = ml_collections.FieldReference(None, str)
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
  # Typed `object`, not `dict`: the command line can then set, clear
  # (`--config.data.synthetic=None`) or edit (`...synthetic.train=100`) it.
  c.data.synthetic = ml_collections.FieldReference(None, object)

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
  # Rollouts per prompt: "fixed" (n each) or "adaptive" (rl/allocation.py:
  # a probe of probe_n each, then `budget` rows in all, water-filled by the
  # coupling bound; n is then the cap; needs refill=True).
  c.rollout.allocation = "fixed"
  c.rollout.budget = 0              # adaptive: rows per step, probe included
  c.rollout.probe_n = 4             # adaptive: first-round rollouts/prompt
  c.rollout.allocation_floor = 0    # adaptive: what unmixed probes end with
  c.rollout.allocation_block = 4    # adaptive: rollouts handed out at a time
  # The sampler's parameter copy, cast in the train-to-sample reshard;
  # None = model.dtype (bf16: half the f32 copy, same matmul inputs).
  c.rollout.param_dtype = ml_collections.FieldReference(None, str)

  c.rewards = ml_collections.ConfigDict()
  c.rewards.correct_threshold = 0.5
  c.rewards.num_workers = 0         # one per core
  c.rewards.worker_cpus = ()        # e.g. (2, 3): pinned away from XLA
  c.rewards.timeout_s = 10.0        # per item; bounds every verifier
  c.rewards.default_score = 0.0     # of an item that timed out or failed
  c.rewards.recycle_every = 10_000
  c.rewards.worker_memory_mb = 4096
  c.rewards.chunk_size = 8
  c.rewards.kill_grace_s = 1.0
  # Modules (or .py paths) that register verifiers, imported in the trainer
  # and in every verifier worker: ("my_rewards",) (rewards/plugins.py).
  c.rewards.plugins = ()
  c.rewards.format = ml_collections.ConfigDict()
  c.rewards.format.require = ()     # e.g. ("boxed",) or ("answer_tag",)
  c.rewards.format.after_think = False
  c.rewards.format.unmet_reward = 0.0
  c.rewards.math = ml_collections.ConfigDict()
  c.rewards.math.answer_pattern = ml_collections.FieldReference(None, str)
  c.rewards.math.allow_unboxed = False
  c.rewards.math.string_match = True  # ProRL: string match OR math-verify
  c.rewards.math.max_answer_chars = 1000
  c.rewards.math.signal_timeout_s = 0  # the pool's timeout is the bound
  c.rewards.numeric = ml_collections.ConfigDict()
  c.rewards.numeric.answer_pattern = ml_collections.FieldReference(None, str)
  c.rewards.numeric.rel_tol = 1e-6
  c.rewards.numeric.abs_tol = 1e-9
  c.rewards.numeric.last_number_fallback = True
  c.rewards.numeric.max_answer_chars = 1000
  c.rewards.choice = ml_collections.ConfigDict()
  c.rewards.choice.answer_pattern = ml_collections.FieldReference(None, str)
  c.rewards.choice.letters = "ABCDEFGHIJ"
  c.rewards.exact = ml_collections.ConfigDict()
  c.rewards.exact.answer_pattern = ml_collections.FieldReference(None, str)
  c.rewards.exact.case_sensitive = True
  c.rewards.code = ml_collections.ConfigDict()
  # None: derived from rewards.timeout_s (5 s as in ProRL, less when the
  # per-item timeout leaves no room for it).
  c.rewards.code.time_budget_s = ml_collections.FieldReference(None, float)
  c.rewards.code.memory_mb = 1024
  c.rewards.code.max_output_bytes = 1 << 20
  c.rewards.code.max_file_mb = 16
  c.rewards.code.max_open_files = 64
  c.rewards.code.tmpfs_mb = 64
  c.rewards.code.python = ml_collections.FieldReference(None, str)
  c.rewards.code.sandbox = "auto"   # bubblewrap, else util-linux unshare
  c.rewards.code.allow_unsandboxed = False  # trusted settings only
  c.rewards.reasoning_gym = ml_collections.ConfigDict()
  c.rewards.reasoning_gym.answer_tag = "answer"

  c.algo = ml_collections.ConfigDict()
  c.algo.num_minibatches = 4
  c.algo.micro_batch_size = 8
  c.algo.shuffle = True
  c.algo.vocab_chunk = 16_384
  c.algo.seq_chunk = 1024
  # Compiled row lengths of the update (halving the response from
  # max_new_tokens): each micro-batch runs at the smallest holding its
  # longest row, so the update's cost follows the tokens generated. 1 = off.
  c.algo.length_buckets = 4
  # Each prompt computed once per slot of gcd(micro_batch_size, n) of its
  # rollouts (forward, backward, KL reference, re-scoring), not once per
  # rollout; False: every rollout its own `prompt ++ response` row. On by
  # measurement: 0.53-0.67 of the repeated rows' update time at the demo's
  # shapes, 0.20 at prompts of 512 (`bench step --prefix_only`, README).
  c.algo.shared_prefix = True
  # Compiled prompt widths (halving max_prompt_len): each micro-batch runs
  # its prompts at the smallest holding its longest. 1 = no cut.
  c.algo.prompt_buckets = 2
  c.algo.advantage = ml_collections.ConfigDict()
  c.algo.advantage.estimator = "reinforce_pp_baseline"
  c.algo.advantage.eps = 1e-6
  c.algo.advantage.dynamic_sampling = True
  c.algo.advantage.oversample_factor = 1.0
  c.algo.loss = ml_collections.ConfigDict()
  c.algo.loss.eps_low = 0.2
  c.algo.loss.eps_high = 0.28       # clip-higher (ProRL v2)
  c.algo.loss.aggregation = "token_mean"
  c.algo.loss.kl_coef = 1e-4        # ProRL v2 (NeMo RL / OpenRLHF examples)
  c.algo.loss.kl_estimator = "k2"
  c.algo.loss.kl_log_ratio_clamp = 10.0
  c.algo.loss.log_ratio_clamp = 20.0
  c.algo.loss.ratio_cap = ml_collections.FieldReference(None, float)
  c.algo.loss.ratio_cap_mode = "truncate"
  c.algo.loss.ratio_cap_low = 0.0
  c.algo.loss.entropy_coef = 0.0
  c.algo.loss.ratio = "token"       # "sequence": GSPO's sequence ratio
  c.algo.loss.mask_truncated = False  # DAPO overlong filtering: no loss
  c.algo.shaping = ml_collections.ConfigDict()  # all off
  c.algo.shaping.truncation_reward = ml_collections.FieldReference(None, float)
  c.algo.shaping.truncation_penalty = 0.0
  c.algo.shaping.cosine_length_coef = 0.0
  c.algo.shaping.cosine_eta_min = -1.0
  c.algo.shaping.cosine_eta_max = 0.0
  c.algo.shaping.cosine_length_limit = ml_collections.FieldReference(None, int)
  c.algo.shaping.cosine_cycle_on = 0
  c.algo.shaping.cosine_cycle_off = 0
  c.algo.shaping.overlong_cache = 0
  c.algo.shaping.overlong_coef = 1.0
  c.algo.reference = ml_collections.ConfigDict()
  c.algo.reference.reset_every = 0
  c.algo.reference.reset_kl_above = ml_collections.FieldReference(None, float)
  c.algo.reference.reset_on_eval_drop = ml_collections.FieldReference(
      None, float)
  c.algo.reference.reset_optimizer = False

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"     # or "cosine" / "linear" over decay_steps
  c.optim.decay_steps = 0
  c.optim.end_lr_ratio = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.reference_samples_per_step = ml_collections.FieldReference(None, int)
  # The update's result guard: K skipped mini-batches in a row stop the run;
  # a parameter-norm growth past this factor in one update warns (0 = off).
  c.optim.max_consecutive_skips = 8
  c.optim.param_norm_jump = 2.0

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  c.checkpoint.preempt_grace_s = 30.0
  # One run per workdir: "auto" = flock on a local filesystem, a lease file
  # with a heartbeat on shared ones (NFS, Lustre, GCS FUSE); "off".
  c.checkpoint.lock = "auto"
  c.checkpoint.lock_lease_s = 60.0  # a silent lease is taken over after it

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
  # Off: a run stops at total_steps / max_generated_tokens. configs/
  # plateau_cpu.py trains until held-out pass@1 stops rising.
  c.eval.plateau_window = 0
  c.eval.plateau_confidence = 0.95
  # "math": MATH-500, AIME 2024, AMC 2023, GSM8K at every evaluation too.
  c.eval.suite = ml_collections.FieldReference(None, str)

  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.every = 1
  c.diagnostics.rescore_rollouts = 64

  c.warmstart = ml_collections.ConfigDict()
  c.warmstart.steps = 0             # off: real runs start from a checkpoint
  c.warmstart.batch_size = 32
  c.warmstart.learning_rate = 1e-3
  c.warmstart.warmup_steps = 20
  c.warmstart.schedule = "cosine"
  c.warmstart.weight_decay = 0.0
  c.warmstart.grad_clip = 1.0
  c.warmstart.max_solution_len = 128
  c.warmstart.eval_every = 0
  c.warmstart.log_every = 20
  c.warmstart.seed = ml_collections.FieldReference(None, int)  # None: `seed`

  c.init = ml_collections.ConfigDict()
  c.init.path = ml_collections.FieldReference(None, str)
  c.init.tokenizer = ml_collections.FieldReference(None, str)
  c.init.tokenizer_vocab_size = 512

  c.logging = ml_collections.ConfigDict()
  c.logging.tensorboard = True
  # None: a bar on a terminal, one line per step otherwise (pod logs).
  c.logging.progress = ml_collections.FieldReference(None, str)
  c.logging.progress_bar = ml_collections.FieldReference(None, bool)  # alias
  c.logging.archive_rollouts = True
  c.logging.archive_every = 1
  c.logging.text_samples = 4
  # Weights & Biases (the [wandb] extra): every metrics row and the config.
  c.logging.wandb = False
  c.logging.wandb_project = ml_collections.FieldReference(None, str)
  c.logging.wandb_entity = ml_collections.FieldReference(None, str)
  c.logging.wandb_name = ml_collections.FieldReference(None, str)  # workdir's
  c.logging.wandb_group = ml_collections.FieldReference(None, str)
  c.logging.wandb_tags = ()
  c.logging.wandb_mode = "online"   # "offline": W/wandb/, `wandb sync` later
  return c
