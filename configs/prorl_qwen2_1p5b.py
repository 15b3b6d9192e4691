"""ProRL arm of BroRL's comparison: N = 16 rollouts x 512 prompts per step.

  python -m brorl_jax.train --config configs/prorl_qwen2_1p5b.py \
      --workdir /shared/runs/prorl \
      --config.init.path=/models/Nemotron-Research-Reasoning-Qwen-1.5B \
      --config.data.train_files="('math.jsonl', 'code.jsonl', ...)"

On 64 GPUs or a TPU pod see launch/ (slurm_gpu.sbatch, tpu_pod.sh); size it
first with `--dry_run` (per-device memory, largest max_decode_rows).

The paper's ProRL row (PAPER.md §4.3 and Table 1: "ProRL, N 16, 512
prompts/step, +225 / +535 steps") continues the ProRLv2-3K checkpoint
(nvidia/Nemotron-Research-Reasoning-Qwen-1.5B, itself
DeepSeek-R1-Distill-Qwen-1.5B after 3,000 ProRL steps at 8k context) with:
clipped PPO with REINFORCE++-baseline advantages (group mean, global-batch
normalization), dynamic sampling, clip-higher, periodic reference resets,
truncated importance sampling, 16,384-token responses, 64 H100s.

Values the paper leaves unstated, and what we chose:
  * learning rate eta_0: 1e-6, constant (OpenRLHF's ProRLv2 example; ProRL
    v1 used 2e-6).
  * KL: beta 1e-4 with the k2 estimator (NeMo RL's prorlv2.yaml and the
    OpenRLHF example).
  * clip: eps_low 0.2, eps_high 0.28 (the ProRL v2 blog; NeMo RL uses 0.27).
  * PPO mini-batches per step: 8 (OpenRLHF: 512 prompts x 16 = 8,192
    samples, train batch 1,024). BroRL keeps this number for both arms.
  * micro-batch: 64 rows, one 17k-token row per device on 64 devices.
  * rollout temperature 1.0, top-p 1.0 (the sampler's log-probs are then
    exactly the loss's old log-probs); ProRL v1 used 1.2.
  * truncated IS cap C = 2 ("truncate" mode, Yao et al. 2025's example).
  * reference reset every 200 steps without an optimizer reset (ProRL v2
    resets every 200-500 steps and keeps the optimizer).
  * no oversampling (oversample_factor 1): groups dropped by dynamic
    sampling shrink the step's batch instead of being regenerated.
  * prompt length 1,024 tokens; no length penalty (ProRL v2's cosine
    penalty is cycled on and off with unpublished constants).
  * the data: the five task families (math, code, STEM, IFEval, Reasoning
    Gym) are not published for this continuation: set `data.train_files`.

`init.path` must point at the starting checkpoint (a Hugging Face directory
or an `hf import` output); the placeholder below fails at start-up with an
error naming the key.
"""

from configs import base

INIT_PLACEHOLDER = ("SET-ME:--config.init.path=/path/to/hf/"
                    "Nemotron-Research-Reasoning-Qwen-1.5B")


def get_config():
  c = base.get_config()
  c.seed = 0
  c.total_steps = 535                 # the paper's longest ProRL arm

  c.model.preset = "qwen2_1p5b"       # replaced by init.path's config.json
  c.model.param_dtype = "float32"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  # 64 H100s (8 nodes x 8): FSDP inside a node (NVLink), data parallel
  # across nodes. A v5p-64 slice (32 chips): (4, 8, 1).
  c.mesh.shape = (8, 8, 1)
  c.init.path = INIT_PLACEHOLDER

  c.rollout.prompts_per_step = 512
  c.rollout.n = 16
  c.rollout.max_prompt_len = 1024
  c.rollout.max_new_tokens = 16_384
  # The refilled decode (slots follow the work: a finished rollout's slot
  # takes the prompt's next one) and 8,192 slots: the GPU dry run
  # (--dry_run_topology=h100:8x1x8) puts the decode peak at ~63 GiB of an
  # H100's 79 (10.5k rows fit; 8,192 keeps the 15 % headroom), and its
  # estimate puts the refill ahead of fixed chunks (README, sizing).
  c.rollout.max_decode_rows = 8192
  c.rollout.refill = True
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0

  c.algo.num_minibatches = 8
  c.algo.micro_batch_size = 64
  c.algo.advantage.estimator = "reinforce_pp_baseline"
  c.algo.advantage.dynamic_sampling = True
  c.algo.loss.eps_low = 0.2
  c.algo.loss.eps_high = 0.28
  c.algo.loss.kl_coef = 1e-4
  c.algo.loss.kl_estimator = "k2"
  c.algo.loss.ratio_cap = 2.0
  c.algo.loss.ratio_cap_mode = "truncate"
  c.algo.reference.reset_every = 200
  c.algo.reference.reset_optimizer = False

  c.optim.learning_rate = 1e-6
  c.optim.schedule = "constant"
  # The ProRL arm's samples per step: the BroRL arm's lr scales from here.
  c.optim.reference_samples_per_step = 512 * 16

  c.checkpoint.every = 20             # ~5 h at the paper's ~0.25 h per step
  c.eval.every = 50
  c.eval.n = 16                       # paper: pass@1 over 16 samples,
  c.eval.temperature = 0.6            # T 0.6, top-p 0.95, 32k tokens
  c.eval.top_p = 0.95
  c.eval.max_new_tokens = 32_768
  # 32k-token evaluation rows hold twice the KV of a training row: 2,048
  # of them (BroRL's whole eval batch, 128 x 16) fit beside the state.
  c.eval.max_decode_rows = 2048
  c.logging.archive_every = 10        # ~1 GB of rollouts per archived step
  return c
