"""The sampler: sampling rules, shared-prefix attention, the decode loop."""

from brorl_jax.rollout.config import SamplerConfig
from brorl_jax.rollout.sampler import Prefill, Rollouts, Sampler

__all__ = ["Prefill", "Rollouts", "Sampler", "SamplerConfig"]
