"""compare.py's bookkeeping: arm configs, overrides, per-run figures."""

import pathlib

import pytest

from brorl_jax import compare, run_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "compare_cpu.py")
PLATEAU = str(ROOT / "configs" / "plateau_cpu.py")


def test_arms_load_and_the_adaptive_arm_spends_the_prorl_budget():
  prorl = run_config.load(compare.load_config(CONFIG, "prorl"))
  adaptive = run_config.load(compare.load_config(CONFIG, "adaptive"))
  alloc = adaptive.allocation()
  assert prorl.allocation() is None
  assert alloc.budget == prorl.loop.prompts_per_step * prorl.rollout.n
  assert alloc.num_prompts == prorl.loop.prompts_per_step
  assert adaptive.max_generated_tokens == prorl.max_generated_tokens
  with pytest.raises(ValueError, match="arm must be one of"):
    compare.load_config(CONFIG, "nope")


def test_overrides_apply_as_literals():
  config = compare.apply_overrides(
      compare.load_config(CONFIG, "adaptive"),
      ["--config.rollout.budget=256", "--config.data.instruction=Solve",
       "--config.warmstart.steps=5"])
  assert config.rollout.budget == 256
  assert config.warmstart.steps == 5
  assert config.data.instruction == "Solve"


def test_summarize_reads_a_run():
  records = [
      {"step": 0, "eval/pass@1": 0.10},
      {"step": 1, "rollout/generated_tokens": 10,
       "rollout/generated_tokens_total": 10, "rollout/mixed_share": 0.5,
       "mass/u2": 0.02, "mass/frac_margin_positive": 0.25},
      {"step": 2, "rollout/generated_tokens": 12,
       "rollout/generated_tokens_total": 22, "rollout/mixed_share": 0.7,
       "mass/u2": 0.04, "mass/frac_margin_positive": None,
       "eval/pass@1": 0.16, "optim/updates_total": 4},
  ]
  out = compare.summarize(records)
  assert out["pass1_start"] == 0.10 and out["pass1_end"] == 0.16
  assert out["gain"] == pytest.approx(0.06)
  assert (out["steps"], out["tokens"], out["updates"]) == (2, 22, 4)
  assert out["mixed_group_share"] == pytest.approx(0.6)
  assert out["mass_u2"] == pytest.approx(0.03)
  assert out["frac_margin_positive"] == pytest.approx(0.25)
  with pytest.raises(ValueError, match="no held-out pass@1"):
    compare.summarize(records[1:2])


def test_plateau_arms_branch_at_one_budget():
  base = run_config.load(compare.load_config(PLATEAU, "base"))
  prorl = run_config.load(compare.load_config(PLATEAU, "prorl"))
  brorl = run_config.load(compare.load_config(PLATEAU, "brorl"))
  # The base run stops on the plateau test, not on a budget.
  assert base.eval.plateau_window >= 3 and base.max_generated_tokens is None
  assert base.checkpoint.every > 0
  # The branches: ProRL's own settings against more rollouts per prompt, at
  # one token budget, evaluated at equal token intervals.
  assert prorl.max_generated_tokens == brorl.max_generated_tokens
  assert (prorl.rollout.n, prorl.loop.prompts_per_step) == (
      base.rollout.n, base.loop.prompts_per_step)
  assert brorl.rollout.n >= 128 > brorl.loop.prompts_per_step
  assert prorl.eval.plateau_window == brorl.eval.plateau_window == 0
  assert (prorl.eval.every * prorl.loop.prompts_per_step * prorl.rollout.n
          == brorl.eval.every * brorl.loop.prompts_per_step * brorl.rollout.n)
  with pytest.raises(ValueError, match="arm must be one of"):
    compare.load_config(PLATEAU, "adaptive")
