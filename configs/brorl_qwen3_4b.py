"""BroRL on Qwen3-4B: N = 512 rollouts x 128 prompts per step.

  python -m brorl_jax.train --config configs/brorl_qwen3_4b.py \
      --workdir /shared/runs/brorl_qwen3_4b \
      --config.init.path=/models/Qwen3-4B \
      --config.data.train_files="('math.jsonl', 'code.jsonl', ...)"

The BroRL arm of `brorl_qwen2_1p5b` (N = 512, 128 prompts per step, 8 PPO
mini-batches, lr sqrt(8) x the ProRL arm's 1e-6, KL 1e-4 with resets,
16,384-token responses, refilled decode, 64 H100s as (8, 8, 1); see that
file and `prorl_qwen2_1p5b`) moved to Qwen3-4B (Qwen/Qwen3-4B: 36 layers,
32 query / 8 KV heads of 128, q/k norms, tied embeddings, 4.02B parameters,
40,960 positions). Only what the model changes is overridden here:

  * the model: the `qwen3_4b` preset (replaced by init.path's config.json);
  * decode slots: a rollout's KV is 36 layers x 8 heads x 128 x 2 (K, V) x
    2 bytes = 144 KiB a token, 2.25 GiB for 1,024 + 16,384 tokens (4.8x the
    1.5B's 0.47), so the refilled decode gets 1,280 slots (10 per prompt)
    instead of 8,192: the GPU dry run (`--dry_run_topology=h100:8x1x8`)
    lets 1,792 slots fill an H100's 79.1 GiB; 1,280 hold the refill phase
    at 60.4 GiB, under the 68 GiB (85 %) bar;
  * evaluation slots: a 32k-token evaluation row holds 4.6 GiB of KV, so
    512 slots instead of 2,048 (evaluation peak 52.2 GiB).

On a v5p-64 (32 chips, mesh (4, 8, 1)) each chip holds twice the rows'
share of KV, so halve the slots: `--config.mesh.shape='(4,8,1)'
--config.rollout.max_decode_rows=640 --config.eval.max_decode_rows=256`
(the arithmetic's choice: that TPU compile did not finish on the shared
machine; README, sizing).
"""

from configs import brorl_qwen2_1p5b

INIT_PLACEHOLDER = "SET-ME:--config.init.path=/path/to/hf/Qwen3-4B"


def get_config():
  c = brorl_qwen2_1p5b.get_config()
  c.model.preset = "qwen3_4b"         # replaced by init.path's config.json
  c.init.path = INIT_PLACEHOLDER
  c.rollout.max_decode_rows = 1280    # refill: 10 slots per prompt
  c.eval.max_decode_rows = 512        # 32k-token rows: 4.6 GiB of KV each
  return c
