"""The policy: Qwen2-family decoder (NNX), attention/KV cache, sharding."""
