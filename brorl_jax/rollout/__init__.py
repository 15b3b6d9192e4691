"""The sampler: sampling rules, shared-prefix attention, the decode loop."""

from brorl_jax.rollout.sampler import (Prefill, Rollouts, Sampler,  # noqa
                                       SamplerConfig)
