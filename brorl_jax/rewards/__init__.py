"""Host verifiers and the process pool that runs them (DESIGN.md §3, §4).

    from brorl_jax import rewards
    config = rewards.RewardsConfig.from_mapping(cfg.rewards)
    rewards.score(rewards.VerifyItem(text, "\\\\frac{1}{2}", "math"), config)
    with rewards.RewardPool(config) as pool:
      results = pool.submit(items).result()
    correct = rewards.is_correct(reward_array, config.correct_threshold)

Verifiers by name: `math` (math_verifier), `numeric`, `choice`, `exact`
(basic), `code` (code_verifier, in the sandbox), `reasoning_gym`
(gym_verifier). Offline scoring: `python -m brorl_jax.rewards --help`.
Nothing here imports JAX; math-verify and reasoning-gym load on first use.
"""

from brorl_jax.rewards.config import RewardsConfig, is_correct
from brorl_jax.rewards.pool import RewardPool
from brorl_jax.rewards.registry import (STATUS_CODES, VERIFIERS, VerifyItem,
                                        VerifyResult, get_verifier, register,
                                        score)
from brorl_jax.rewards.sandbox import SandboxUnavailable

__all__ = [
    "RewardsConfig", "is_correct", "RewardPool", "STATUS_CODES", "VERIFIERS",
    "VerifyItem", "VerifyResult", "get_verifier", "register", "score",
    "SandboxUnavailable",
]
