"""Pallas Triton kernels for GPUs, vendored from JAX 0.11.2 (Apache 2.0):
the flash-attention `mha` with segment ids (`flash_attention`) and the
decode kernel `gqa` with per-row lengths (`decode_attention`). JAX 0.12
removed these example kernels from `jax.experimental.pallas.ops.gpu`;
the Pallas Triton API they are written against is still public there."""
