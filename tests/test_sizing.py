"""`train --dry_run`: compiled per-device memory and the decode-row limit."""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

from brorl_jax import checkpointing, hf
from brorl_jax import config as config_lib
from brorl_jax import run_config
from brorl_jax import sizing
from brorl_jax.loop import experiment, programs
from brorl_jax.model.sharding import make_mesh
from brorl_jax.rl import update as update_lib
from brorl_jax.rl.buckets import bucket_targets

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import brorl_qwen2_1p5b, brorl_qwen3_4b  # noqa: E402
from configs import prorl_qwen2_1p5b  # noqa: E402
from tests.configs import tiny_rl  # noqa: E402


def _tiny(**overrides):
  c = tiny_rl.get_config()
  c.mesh.shape = (8, 1, 1)
  c.algo.loss.kl_coef = 1e-3            # hold reference parameters too
  for key, value in overrides.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return run_config.load(c)


@pytest.fixture(scope="module")
def tiny_report():
  lines = []
  result = sizing.dry_run(_tiny(), out=lines.append)
  return result, "\n".join(lines)


@pytest.mark.slow
def test_dry_run_prints_compiled_figures_and_the_row_limit(tiny_report):
  result, text = tiny_report
  assert "compiled (CPU backend)" in text
  assert "8 CPU devices, mesh data=8 fsdp=1 tensor=1" in text
  assert (f"largest max_decode_rows that fits: {result['max_decode_rows']} "
          in text)
  # 80 GiB holds the whole step of the tiny model: P x G = 4 x 8 rows.
  assert result["max_decode_rows"] == 32
  figures = {name.strip(): (gib, src) for name, gib, src in
             result["figures"]}
  compiled = [n for n, (_, src) in figures.items() if src.startswith(
      "compiled")]
  assert "update: temporaries (activations, gradients)" not in compiled
  assert "temporaries (activations, gradients)" in compiled
  assert "memory per decoded row, per device" in compiled
  assert figures["temporaries (activations, gradients)"][0] > 0
  # The diagnostics' re-scoring is compiled too, and the update's peak no
  # longer counts the sampling copy (the loop frees it first).
  assert figures["re-scoring: temporaries"][0] > 0
  assert figures["re-scoring: temporaries"][1].startswith("compiled")
  assert result["peak_diagnostics_gib"] > 0
  assert result["peak_update_gib"] == pytest.approx(
      figures["peak while updating"][0])


@pytest.mark.slow
def test_analytic_figures_match_the_model(tiny_report):
  result, _ = tiny_report
  figures = {name.strip(): gib * sizing.GiB for name, gib, _ in
             result["figures"]}
  n = _tiny().model.num_params()
  # Mesh (8, 1, 1): nothing is sharded over fsdp or tensor, so every device
  # holds all f32 parameters, Adam's two moments and the reference copy.
  assert figures["parameters, train layout"] == 4 * n
  # The sampling copy takes the compute dtype (tiny_rl: f32, as here).
  assert result["sample_param_dtype"] == _tiny().model.dtype == "float32"
  assert figures["parameters, sampling copy"] == 4 * n
  assert figures["reference parameters (KL)"] == 4 * n
  assert figures["optimizer state (AdamW mu, nu)"] == pytest.approx(
      8 * n, abs=64)
  mc = _tiny().model
  kv_row = 2 * mc.num_layers * 10 * mc.num_kv_heads * mc.head_dim * 4
  assert figures["KV cache per decoded row (whole row, unsharded)"] == kv_row


@pytest.mark.slow
def test_row_limit_follows_the_memory_budget(tiny_report):
  result, _ = tiny_report
  slope = result["per_row_bytes"]
  fixed = result["device_memory_gib"] * sizing.GiB - slope * result[
      "fit_rows"]
  # A budget for 20.5 rows: chunks are P x a divisor of G = 4 x 4.
  budget = (fixed + 20.5 * slope) / sizing.GiB
  lines = []
  small = sizing.dry_run(_tiny(), device_memory_gb=budget, out=lines.append)
  assert 19 <= small["fit_rows"] <= 21
  assert small["max_decode_rows"] == 16 and small["decode_plan"] == (4, 4)
  # Refilled pools need no divisor of G: 4 prompts x 5 slots use 20 rows.
  assert small["refill_slots"] == (4, 5)
  assert "refill decode: 20 slots fit (4 prompts x 5 slots each" in "\n".join(
      lines)


@pytest.mark.slow
def test_deep_models_extrapolate_from_two_depths():
  lines = []
  result = sizing.dry_run(_tiny(**{"model.num_layers": 6}), out=lines.append)
  text = "\n".join(lines)
  assert "1+2 layers, extrapolated to 6" in text
  full = sizing.dry_run(_tiny(**{"model.num_layers": 6}), layers=6,
                        out=lambda _: None)
  # Linear in depth: the extrapolated update arguments are exact (they are
  # parameters, optimizer state and the batch).
  key = "arguments (state + rollout batch)"
  assert _figure(result, key) == pytest.approx(_figure(full, key), rel=1e-3)


def test_the_longest_bucket_bounds_the_whole_switch():
  # The dry run compiles the update at its longest length bucket alone
  # (`StepPrograms.update`); the loop's update holds every bucket as a branch
  # of one lax.switch, which runs one branch at a time.
  cfg = _tiny(**{"rollout.max_prompt_len": 8, "rollout.max_new_tokens": 32,
                 "algo.length_buckets": 3, "mesh.shape": (1, 1, 1),
                 "algo.loss.kl_coef": 0.0})
  mesh = make_mesh(cfg.mesh.shape, jax.devices()[:1])
  b = programs.StepPrograms(cfg, cfg.model, mesh, 1)
  assert bucket_targets(8, 32, 3, "blockwise") == (9, 17, 32)
  switch = update_lib.compile_update(
      b.policy, cfg.update, cfg.loss, b.build.optimizer,
      temperature=cfg.rollout.logprob_temperature,
      mesh_rules=b.train_rules, state=b.state, batch=b.batch())
  whole, longest = programs.Mem.of(switch), programs.Mem.of(b.update().compile())
  assert longest.args == whole.args
  assert longest.temp == pytest.approx(whole.temp, rel=0.01)


def _figure(result, name):
  return {n.strip(): gib for n, gib, _ in result["figures"]}[name]


def test_mem_lerp_and_peak():
  a = programs.Mem(args=10, out=4, alias=4, temp=6)
  b = programs.Mem(args=20, out=8, alias=8, temp=7)
  assert a.peak == 16
  c = a.lerp(b, 1, 2, 28)
  assert (c.args, c.temp, c.peak) == (280, 33, 313)
  # A figure that shrinks at the deeper compile (another schedule) keeps the
  # larger compiled value instead of extrapolating below zero.
  shrinks = programs.Mem(args=10, out=0, alias=0, temp=30).lerp(
      programs.Mem(args=10, out=0, alias=0, temp=20), 2, 4, 28)
  assert (shrinks.args, shrinks.temp) == (10, 30)


def test_per_device_bytes_follows_shardings():
  mesh = jax.make_mesh((4, 2), ("a", "b"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a"))
  x = jax.ShapeDtypeStruct((8, 6), jnp.bfloat16, sharding=sh)
  assert sizing.per_device_bytes({"x": x}) == 2 * 6 * 2


def test_row_plans():
  assert programs.row_plans(128, 512, 4096) == ((128, 32), (128, 16))
  assert programs.row_plans(4, 8, 16) == ((4, 4), (4, 2))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None,
                    reason="libtpu is installed: the topology exists")
def test_tpu_topology_without_libtpu_is_a_clear_error():
  with pytest.raises(SystemExit, match="Install libtpu"):
    sizing.dry_run(_tiny(), topology="v5p:4x4x2", out=lambda _: None)


@pytest.mark.slow
def test_dry_run_cli(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "brorl_jax.train", "--config",
       str(ROOT / "tests/configs/tiny_rl.py"), "--dry_run",
       "--device_memory_gb=0.5", "--config.mesh.shape=(4,2,1)",
       f"--json={tmp_path / 'dry.json'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert run.returncode == 0, run.stderr
  assert "mesh data=4 fsdp=2 tensor=1" in run.stdout
  assert "device memory: 0.5 GiB (--device_memory_gb)" in run.stdout
  assert "largest max_decode_rows that fits: 32" in run.stdout
  summary = json.loads((tmp_path / "dry.json").read_text())
  assert summary["device_memory_gib"] == 0.5
  assert summary["max_decode_rows_fit"] == 32
  peaks = [summary[k] for k in ("peak_decode_gib", "peak_update_gib",
                                "peak_diagnostics_gib")]
  assert all(p > 0 for p in peaks)
  assert summary["fits"] == (max(peaks + [summary["peak_prefill_gib"]])
                             <= 0.5)
  assert summary["compile_s"] > 0
  assert set(summary["sources"].values()) <= {"compiled", "analytic", "sum"}
  assert summary["sources"]["max_decode_rows_fit"] == "compiled"


# ---- the two 1.5B configs (sized by the dry run) ----------------------------

def test_the_two_arms_differ_only_as_the_paper_says():
  prorl = run_config.load(prorl_qwen2_1p5b.get_config())
  brorl = run_config.load(brorl_qwen2_1p5b.get_config())
  assert (prorl.rollout.n, prorl.loop.prompts_per_step) == (16, 512)
  assert (brorl.rollout.n, brorl.loop.prompts_per_step) == (512, 128)
  assert prorl.update.num_minibatches == brorl.update.num_minibatches
  def lr(c):
    return c.optim.peak_lr(c.loop.prompts_per_step * c.rollout.n)
  assert lr(brorl) / lr(prorl) == pytest.approx(math.sqrt(8))
  assert prorl.loss == brorl.loss and prorl.advantage == brorl.advantage
  assert prorl.rollout.max_new_tokens == 16_384
  assert (prorl.loss.kl_coef, prorl.loss.kl_estimator) == (1e-4, "k2")


def test_the_qwen3_4b_recipe_is_the_brorl_arm_on_qwen3_4b():
  brorl = run_config.load(brorl_qwen2_1p5b.get_config())
  qwen3 = run_config.load(brorl_qwen3_4b.get_config())
  assert qwen3.model.num_params() == 4_022_468_096  # Qwen/Qwen3-4B: 4.02B
  assert qwen3.model.qk_norm and qwen3.model.head_dim == 128
  assert (qwen3.rollout.max_decode_rows, qwen3.eval.max_decode_rows) == (
      1280, 512)
  assert dataclasses.replace(
      qwen3.rollout, max_decode_rows=brorl.rollout.max_decode_rows) == \
      brorl.rollout
  for section in ("loop", "loss", "advantage", "update", "optim", "mesh"):
    assert getattr(qwen3, section) == getattr(brorl, section), section


def test_the_init_path_placeholder_fails_clearly(tmp_path):
  cfg = run_config.load(brorl_qwen2_1p5b.get_config())
  with pytest.raises(config_lib.ConfigError, match="'init.path'.*SET-ME"):
    experiment.build(cfg, tmp_path / "run")


def test_imported_model_keeps_the_runs_attention_backend(tmp_path, tiny_cfg,
                                                          tiny_params):
  # Dry run and training both rebuild the model from init.path's config.json
  # and must keep the run's backend, as they keep its dtypes.
  hf.save_hf(tiny_params, tiny_cfg, tmp_path / "hf")
  cfg = _tiny(**{"init.path": str(tmp_path / "hf"),
                 "model.attention_backend": "reference"})
  assert programs.model_config(cfg)[0].attention_backend == "reference"
  tokenizer = types.SimpleNamespace(vocab_size=tiny_cfg.vocab_size)
  checkpointing.save_model_config(tiny_cfg, tmp_path / "resumed")   # saved with "auto"
  for workdir in (tmp_path / "fresh", tmp_path / "resumed"):
    model_cfg = experiment.model_config_for(cfg, workdir, tokenizer)
    assert model_cfg.attention_backend == "reference"
