"""Benchmarks: `python -m brorl_jax.bench sampler|step|verifiers|attention|gpu
[--json P]`.

Each prints ratios against a baseline measured in the same run, never
absolute numbers alone; `gpu` checks a lent GPU (its kernels against a
float32 reference, decode and update throughput beside the compiled
programs' expected times).
"""
