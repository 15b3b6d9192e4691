"""GPU kinds and topologies for ahead-of-time compiles (no plugin needed)."""

import pytest

from brorl_jax.aot import topology


def test_shipped_targets_give_the_published_figures():
  h100, h200 = topology.load_target("h100"), topology.load_target("h200")
  assert h100.name == "NVIDIA H100 80GB HBM3"
  assert h100.bandwidth == 3.35232e12
  assert h100.bf16_flops == pytest.approx(989e12, rel=0.002)   # dense bf16
  assert h100.memory_bytes / 2**30 == pytest.approx(79.1, abs=0.05)
  # The H200: the same chip, NVIDIA's memory size and bandwidth.
  assert (h200.bandwidth, h200.memory_bytes) == (4.8e12, 141e9)
  assert h200.bf16_flops == h100.bf16_flops
  assert "derived from h100_sxm_80gb" in h200.text


def test_parse_names_kind_and_layout():
  t = topology.parse("h100:8x1x8")
  assert (t.slices, t.hosts, t.per_host, t.num_devices) == (8, 1, 8, 64)
  assert str(t) == "h100:8x1x8" and t.target.kind == "h100"
  assert topology.parse("v5p:4x4x2") is None          # a TPU: not ours
  with pytest.raises(ValueError, match="h200:8x1x8"):
    topology.parse("h200:8x8")
  with pytest.raises(ValueError, match="known kinds"):
    topology.load_target("a100")


def test_a_target_without_a_bf16_rate_is_refused():
  text = topology.load_target("h100").text
  with pytest.raises(ValueError, match="bf16 rate"):
    topology.parse_target("x", text.replace("key: 16", "key: 11"))
