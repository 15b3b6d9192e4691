"""Benchmarks: `python -m brorl_jax.bench sampler|step|verifiers [--json P]`.

Each prints ratios against a baseline measured in the same run, never
absolute numbers alone.
"""
