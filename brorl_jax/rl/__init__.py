"""RL on device: advantages, shaping, log-probs, losses, the update."""
