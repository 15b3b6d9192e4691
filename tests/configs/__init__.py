"""Small configs for end-to-end tests (`--config tests/configs/tiny_rl.py`)."""
