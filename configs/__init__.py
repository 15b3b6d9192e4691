"""Experiment configs: each module exposes `get_config()` -> ConfigDict."""
