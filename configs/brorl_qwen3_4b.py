"""BroRL on Qwen3-4B: N = 512 rollouts x 128 prompts per step.

  python -m brorl_jax.train --config configs/brorl_qwen3_4b.py \
      --workdir /shared/runs/brorl_qwen3_4b \
      --config.init.path=/models/Qwen3-4B \
      --config.data.train_files="('math.jsonl', 'code.jsonl', ...)"

The BroRL arm of `brorl_qwen2_1p5b` (N = 512, 128 prompts per step, 8 PPO
mini-batches, lr sqrt(8) x the ProRL arm's 1e-6, KL 1e-4 with resets,
16,384-token responses; see that file and `prorl_qwen2_1p5b`) moved to
Qwen3-4B (Qwen/Qwen3-4B: 36 layers, 32 query / 8 KV heads of 128, q/k norms,
tied embeddings, 4.02B parameters, 40,960 positions). Only what the model
changes is overridden here:

  * the model: the `qwen3_4b` preset (replaced by init.path's config.json);
  * decode chunks: a rollout's KV is 36 layers x 8 heads x 128 x 2 (K, V) x
    2 bytes = 144 KiB a token, 2.4 GiB for 1,024 + 16,384 tokens (5.4x the
    1.5B's), so `max_decode_rows` is 1,024 instead of 4,096 (16 rows per
    H100 on the (8, 8, 1) mesh, 32 per v5p chip on (4, 8, 1)); the value
    comes from `--dry_run` (README, sizing table).

Size it first: `python -m brorl_jax.train --config configs/brorl_qwen3_4b.py
--dry_run` (64 H100s: 64 fake CPU devices and `--device_memory_gb=80`;
v5p-64: `--dry_run_topology=v5p:4x4x2 --config.mesh.shape='(4,8,1)'`).
"""

from configs import brorl_qwen2_1p5b

INIT_PLACEHOLDER = "SET-ME:--config.init.path=/path/to/hf/Qwen3-4B"


def get_config():
  c = brorl_qwen2_1p5b.get_config()
  c.model.preset = "qwen3_4b"         # replaced by init.path's config.json
  c.init.path = INIT_PLACEHOLDER
  c.rollout.max_decode_rows = 1024    # --dry_run: 64 chunks of 8 x 128
  return c
