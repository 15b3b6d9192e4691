"""End-to-end runs of the loop's production paths the basic tests skip.

A KL term with its reference (saved, restored, reset), asynchronous saves, a
checkpoint restored on fewer devices, the generated-token budget, prompt
oversampling and reward shaping: each through `train.train` on the tiny
config, with evaluation and the post-update diagnostics off to stay fast.
"""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from brorl_jax import checkpointing, cli
from brorl_jax.data import tasks
from brorl_jax.data.tokenizer_loader import load_tokenizer
from brorl_jax.loop.metrics import read_metrics
from brorl_jax.rl import advantages as adv_lib
from brorl_jax.rl.shaping import ShapingConfig, shape_rewards
from brorl_jax.loop.rollout_archive import RolloutArchive

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.configs import tiny_rl  # noqa: E402

TIMING = ("time/", "throughput/", "latency")
# The tiny runs: no held-out set (no evaluation), no realized diagnostics.
FAST = {"data.synthetic": {"task": "arithmetic", "train": 300, "eval": 0,
                           "seed": 0, "difficulty": [1]},
        "diagnostics.every": 0, "logging.tensorboard": False}
# KL to a reference reset on a schedule, saved asynchronously every step, on
# an FSDP mesh (the parameters and the reference are sharded 4 ways).
KL = {**FAST, "algo.loss.kl_coef": 0.05, "algo.reference.reset_every": 3,
      "checkpoint.async_save": True, "checkpoint.every": 1,
      "checkpoint.keep": 5, "mesh.shape": (2, 4, 1)}


def run(workdir, overrides):
  """`train.train` on the tiny config with dotted-key overrides."""
  from brorl_jax import train
  return train.train(cli.set_keys(tiny_rl.get_config(), overrides),
                     str(workdir))


def _comparable(rows):
  return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)}
          for r in rows]


def _item(workdir, step, item):
  """One saved item of a training checkpoint, as numpy leaves by path."""
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(pathlib.Path(workdir).absolute() / "checkpoints" /
                         str(step) / item)
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _ref_and_params(workdir, step):
  """(reference parameters, policy parameters) of checkpoint `step`."""
  ref = _item(workdir, step, checkpointing.OPT)
  ref = {k.split("['ref_params']", 1)[1]: v for k, v in ref.items()
         if k.startswith("['ref_params']")}
  return ref, _item(workdir, step, checkpointing.PARAMS)


def _saved_steps(workdir):
  """Finished checkpoints (orbax writes into a temporary name first)."""
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit())


def _equal(a, b):
  assert a.keys() == b.keys()
  return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def kl_runs(tmp_path_factory):
  """A 4-step KL run, and the same run stopped at 2 and resumed to 4."""
  base = tmp_path_factory.mktemp("kl")
  run(base / "resumed", {**KL, "total_steps": 2})
  # What is on disk the moment `train` returns: its async saves finished.
  saved_at_return = _saved_steps(base / "resumed")
  shutil.copytree(base / "resumed", base / "at2")
  run(base / "straight", {**KL, "total_steps": 4})
  return base, saved_at_return


@pytest.mark.slow
def test_kl_run_resumes_exactly_with_its_reference_and_async_saves(
    kl_runs, caplog):
  base, saved_at_return = kl_runs
  straight, resumed = base / "straight", base / "resumed"
  # The async save of the last step was complete when the run returned...
  assert saved_at_return == [1, 2]
  with caplog.at_level(logging.INFO, logger="brorl_jax.loop.trainer"):
    run(resumed, {**KL, "total_steps": 4})
  # ...and the resumed run started from it.
  assert "resumed from step 2" in caplog.text
  for step in (2, 3, 4):
    ref_a, params_a = _ref_and_params(straight, step)
    ref_b, params_b = _ref_and_params(resumed, step)
    assert ref_a and _equal(ref_a, ref_b) and _equal(params_a, params_b), step
  rows = _comparable(read_metrics(straight))
  assert rows == _comparable(read_metrics(resumed))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  # The KL term is live: the policy moved away from its reference.
  assert all(r["loss/kl_ref"] > 0 for r in rows)
  # The schedule's reset fired at step 3 only: the reference held the
  # initial policy until then, the step-3 policy after.
  assert [r.get("ref/resets") for r in rows] == [None, None, 1, None]
  ref1, params1 = _ref_and_params(straight, 1)
  ref2, _ = _ref_and_params(straight, 2)
  ref3, params3 = _ref_and_params(straight, 3)
  ref4, params4 = _ref_and_params(straight, 4)
  assert _equal(ref1, ref2) and not _equal(ref1, params1)
  assert _equal(ref3, params3) and _equal(ref4, ref3)
  assert not _equal(ref4, params4)
  assert rows[3]["loss/kl_ref"] < rows[2]["loss/kl_ref"]


def _run_on(devices: int, workdir, overrides):
  """Starts `run` in a subprocess that sees `devices` CPU devices."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  code = ("import json, logging, sys; logging.basicConfig(level='INFO'); "
          "from tests.test_train_paths import run; "
          "run(sys.argv[1], json.loads(sys.argv[2]))")
  return subprocess.Popen(
      [sys.executable, "-c", code, str(workdir), json.dumps(overrides)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_4_and_on_1(kl_runs, tmp_path):
  base, _ = kl_runs
  # Step 2 of an FSDP run on 8 devices; one more step (with the reference
  # reset) on 4 devices (2x2 mesh) and on 1.
  procs = {}
  for devices, mesh in ((4, [2, 2, 1]), (1, [1, 1, 1])):
    workdir = tmp_path / f"on{devices}"
    shutil.copytree(base / "at2", workdir)
    procs[devices] = (workdir, _run_on(devices, workdir, {
        **KL, "total_steps": 3, "mesh.shape": mesh}))
  want = read_metrics(base / "straight")[2]
  assert want["step"] == 3
  for devices, (workdir, proc) in procs.items():
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "resumed from step 2" in out, out
    got = read_metrics(workdir)[-1]
    assert got["step"] == 3 and got["ref/resets"] == 1
    # Other device counts reduce in another order: equal up to rounding.
    for key in ("reward/mean", "rollout/generated_tokens", "loss/kl_ref",
                "loss/entropy", "loss/pg_loss", "optim/grad_norm",
                "rollout/generated_tokens_total", "optim/updates_total"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=1e-6,
                                 err_msg=f"{key} on {devices} devices")


def _numeric_data(directory) -> str:
  """The tiny arithmetic prompts scored by the `numeric` verifier: with
  `rel_tol` 1, a completion that ends in a number of the answer's sign
  scores 1, so even a random policy's groups are mixed."""
  train, _ = tasks.materialize(str(directory), task="arithmetic", train=300,
                               eval=0, seed=0, difficulty=(1,))
  path = pathlib.Path(directory) / "numeric.jsonl"
  rows = [json.loads(line) for line in pathlib.Path(train).read_text()
          .splitlines()]
  path.write_text("".join(json.dumps({**r, "verifier": "numeric"}) + "\n"
                          for r in rows))
  return str(path)


def _mixed_rewards(directory):
  return {**FAST, "data.synthetic": None,
          "data.train_files": (_numeric_data(directory),),
          "rewards.numeric": {"rel_tol": 1.0}}


@pytest.mark.slow
def test_oversampling_refills_groups_that_dynamic_sampling_drops(tmp_path,
                                                                 capsys):
  workdir = tmp_path / "run"
  run(workdir, {**_mixed_rewards(tmp_path), "total_steps": 2,
                "algo.advantage.dynamic_sampling": True,
                "algo.advantage.oversample_factor": 2.0})
  rows = read_metrics(workdir)
  archive = RolloutArchive(workdir / "rollouts")
  mixed_seen = 0
  for r in rows:
    stored = archive.read_step(r["step"])
    # 2 x P = 8 prompts sampled, scored and archived per step...
    assert len(stored["prompt_ids"]) == 8
    rewards = stored["rewards"].reshape(8, 8)
    correct = (rewards >= 0.5).sum(1)
    mixed = int(((correct > 0) & (correct < 8)).sum())
    assert r["group/mixed_frac"] == pytest.approx(mixed / 8)
    # ...of which the first P = 4 informative groups were trained.
    assert r["group/trained"] == min(4, mixed)
    mixed_seen += mixed
  archive.close()
  assert mixed_seen > 0           # the data gave the refill something to do
  assert rows[-1]["optim/updates_total"] == 4
  # `logging.progress = "lines"`: one line per step, then the summary.
  out = capsys.readouterr().out.splitlines()
  assert [line.split("  ")[0] for line in out
          if line.startswith("RL step")] == ["RL step 1/2", "RL step 2/2"]
  assert out[-1].startswith("done: step 2 (2 this run")


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
  """Truncation shaping, and a token budget that ends the run early."""
  base = tmp_path_factory.mktemp("budget")
  run(base / "run", {**_mixed_rewards(base), "total_steps": 10,
                     "max_generated_tokens": 500,
                     "algo.shaping.truncation_reward": -1.0})
  return base / "run"


@pytest.mark.slow
def test_token_budget_stops_the_run_and_saves(budget_run):
  rows = read_metrics(budget_run)
  totals = [r["rollout/generated_tokens_total"] for r in rows]
  # A step generates at most 4 x 8 x 10 = 320 tokens: the budget of 500 is
  # reached at step 2 or 3, long before total_steps = 10.
  assert len(rows) < 10 and totals[-1] >= 500 and totals[-2] < 500
  # The pipeline's counts ride along in every row.
  assert all(r["data/train/rows"] == 300 and r["data/train/kept"] == 300
             and r["data/train/too_long"] == 0 for r in rows)
  saved = checkpointing.TrainCheckpointer(budget_run / "checkpoints", keep=3)
  assert saved.latest_step() == rows[-1]["step"]
  saved.close()


@pytest.mark.slow
def test_shaping_reaches_the_advantages(budget_run):
  rows = read_metrics(budget_run)
  tokenizer = load_tokenizer(budget_run / "tokenizer")
  archive = RolloutArchive(budget_run / "rollouts")
  for r in rows:
    stored = archive.read_step(r["step"])
    rewards = stored["rewards"].reshape(4, 8)
    lengths = stored["lengths"].reshape(4, 8)
    stopped = np.array([len(ids) > 0 and int(ids[-1]) in tokenizer.stop_ids
                        for ids in stored["completion_ids"]]).reshape(4, 8)
    shaped = shape_rewards(rewards, lengths, stopped, 10,
                           ShapingConfig(truncation_reward=-1.0))
    # Dynamic sampling is off: every rollout is in the update.
    assert r["reward/shaped_mean"] == pytest.approx(float(shaped.mean()),
                                                    abs=1e-6)
    adv, _ = adv_lib.compute_advantages(
        rewards, np.ones((4, 8), bool), np.ones(4, bool),
        adv_lib.AdvantageConfig(dynamic_sampling=False),
        correct_threshold=0.5, shaped_rewards=shaped)
    assert r["advantage/abs_mean"] == pytest.approx(
        float(np.abs(adv).mean()), rel=1e-5, abs=1e-6)
  archive.close()
  # Truncated rollouts scored -1 whatever the verifier said.
  assert any(r["reward/shaped_mean"] < r["reward/mean"] for r in rows)


@pytest.mark.slow
def test_adaptive_allocation_runs_unequal_groups_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  run(workdir, {**_mixed_rewards(tmp_path), "total_steps": 2,
                "checkpoint.every": 0, "algo.advantage.dynamic_sampling": True,
                "rollout.allocation": "adaptive", "rollout.budget": 20,
                "rollout.probe_n": 2, "rollout.allocation_block": 2})
  rows = read_metrics(workdir)
  archive = RolloutArchive(workdir / "rollouts")
  for r in rows:
    # P = 4 prompts x G_max = 8 padded rows, 20 of them real.
    stored = archive.read_step(r["step"])
    assert stored["rewards"].size == 4 * 8
    assert r["rollout/n_mean"] == pytest.approx(20 / 4)
    assert 2 <= r["rollout/n_min"] <= r["rollout/n_mean"] <= \
        r["rollout/n_max"] <= 8
    # Only real rows count: at most 20 x 10 tokens, and fewer than the
    # archive's padded rows hold.
    assert 20 <= r["rollout/generated_tokens"] <= 200
    assert r["rollout/generated_tokens"] < int(np.sum(stored["lengths"]))
    assert 0.0 <= r["rollout/budget_mixed_share"] <= 1.0
    assert r["rollout/coupling_pred"] >= 0.0
    assert r["rollout/coupling_measured"] >= 0.0
  archive.close()
  assert rows[-1]["optim/updates_total"] == 4
