"""The reward pool: order, timeouts with kill escalation, crashes, recycling,
memory limits, counters, no JAX in workers, a close() that never hangs."""

import os
import subprocess
import sys
import tempfile
import textwrap
import time
import types

import pytest

from brorl_jax.rewards import registry, sandbox
from brorl_jax.rewards.config import CodeConfig, RewardsConfig
from brorl_jax.rewards.pool import RewardPool
from brorl_jax.rewards.registry import VerifyItem
from tests.rewards import hostile_verifiers
from tests.rewards.sandbox_marks import (BACKENDS, fresh_choices,
                                         needs_sandbox)

T = 2.0         # per-item timeout of these tests
GRACE = 0.5
VERIFIERS = {**registry.VERIFIERS, **hostile_verifiers.ALL}
CONFIG = RewardsConfig(timeout_s=T, kill_grace_s=GRACE, worker_memory_mb=1024,
                       code=CodeConfig(time_budget_s=0.5))
GOOD = VerifyItem("so \\boxed{\\frac{1}{2}}", "0.5", "math")
BAD = VerifyItem("so \\boxed{3}", "0.5", "math")


def _item(verifier, completion="", answer=""):
  return VerifyItem(completion, answer, verifier)


@pytest.fixture(scope="module")
def pool():
  with RewardPool(CONFIG, num_workers=2, verifiers=VERIFIERS) as p:
    assert p.wait_ready()
    yield p


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_workers_have_no_jax_and_a_memory_limit(pool):
  info = pool.worker_info()
  assert len(info) == 2
  assert all(not i["jax_imported"] for i in info)
  assert all(i["rlimit_as"] == 1024 << 20 for i in info)
  assert "jax" in sys.modules  # while this (parent) process has it
  results = pool.score([_item("jax_loaded")] * 4)
  assert [r.reward for r in results] == [0.0] * 4


@needs_sandbox
def test_results_come_back_in_input_order(pool):
  items = [GOOD, BAD] * 20 + [
      VerifyItem("18", "18", "numeric"),
      VerifyItem("\\boxed{B}", "B", "choice"),
      VerifyItem("<answer>Paris</answer>", "Paris", "exact"),
      VerifyItem("```python\nprint(int(input()) * 2)\n```", "", "code",
                 tests={"inputs": ["2", "3"], "outputs": ["4", "7"]})]
  results = pool.submit(items).result(timeout=60)
  assert [r.reward for r in results] == [1.0, 0.0] * 20 + [1.0, 1.0, 1.0, 0.5]
  assert all(r.status == "ok" and r.error is None for r in results)


def test_submit_returns_at_once_and_futures_overlap(pool):
  start = time.monotonic()
  first = pool.submit([GOOD] * 200)
  second = pool.submit([BAD] * 200)
  assert time.monotonic() - start < 0.5
  assert [r.reward for r in second.result(timeout=60)] == [0.0] * 200
  assert [r.reward for r in first.result(timeout=60)] == [1.0] * 200


@pytest.mark.parametrize("hang", ["sleep_forever", "ignore_sigterm_and_sleep"])
def test_timeout_kills_replaces_and_keeps_the_rest(pool, hang):
  pool.pop_stats()
  items = [GOOD, _item(hang), BAD, GOOD, GOOD]
  start = time.monotonic()
  results = pool.submit(items).result(timeout=60)
  assert time.monotonic() - start < T + GRACE + 5.0
  assert [r.status for r in results] == ["ok", "timeout", "ok", "ok", "ok"]
  assert [r.reward for r in results] == [1.0, 0.0, 0.0, 1.0, 1.0]
  assert results[1].seconds >= T
  stats = pool.pop_stats()
  assert stats["timeouts"] == 1 and stats["restarts"] == 1
  assert stats[f"{hang}/timeouts"] == 1 and stats["math/count"] == 4
  assert pool.wait_ready()
  assert all(_alive(i["pid"]) for i in pool.worker_info())


def test_crash_and_errors_give_the_default_score(pool):
  pool.pop_stats()
  items = [GOOD, _item("crash"), GOOD, _item("nan"), _item("allocate", "4096"),
           VerifyItem("1", "x", "numeric"), GOOD]
  results = pool.submit(items).result(timeout=60)
  assert [r.status for r in results] == [
      "ok", "error", "ok", "error", "error", "error", "ok"]
  assert [r.reward for r in results] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
  assert "worker died" in results[1].error
  assert "returned nan" in results[3].error
  assert "MemoryError" in results[4].error
  assert "'x' is not a number" in results[5].error
  stats = pool.pop_stats()
  assert stats["errors"] == 4 and stats["numeric/errors"] == 1
  assert stats["math/mean_reward"] == 1.0


@pytest.mark.parametrize("completion", [
    "\\boxed{10^{10^{10^{10}}}}",                      # a tower of powers
    "\\boxed{" + "\\frac{1}{" * 100 + "2" + "}" * 100 + "}",  # 100-deep
    "\\boxed{" + "(" * 100 + "1" + ")" * 100 + "}",
    "x" * (1 << 20) + "\\boxed{2}",                    # a 1 MB completion
    "\udcff\udcfe invalid utf-8 \ud800 \\boxed{\udcff}",
])
def test_adversarial_math_is_bounded(pool, completion):
  start = time.monotonic()
  result = pool.submit([VerifyItem(completion, "5", "math")]).result(
      timeout=T + GRACE + 30)
  assert time.monotonic() - start < T + GRACE + 5.0
  assert result[0].reward == 0.0
  assert pool.score([GOOD])[0].reward == 1.0  # and the pool keeps serving


def test_unknown_verifier_fails_fast(pool):
  with pytest.raises(KeyError, match="'mathh'.*registered verifiers: .*math"):
    pool.submit([GOOD, _item("mathh")])
  assert pool.submit([]).result() == []


def test_recycling_and_cpu_pinning():
  config = RewardsConfig(recycle_every=3, chunk_size=2, worker_cpus=(0,))
  with RewardPool(config, num_workers=1, verifiers=VERIFIERS) as pool:
    assert pool.wait_ready()
    assert pool.worker_info()[0]["cpus"] == [0]
    pids = [int(r.reward) for r in pool.score([_item("pid")] * 6)]
    assert pids[:4] == [pids[0]] * 4 and pids[4:] == [pids[4]] * 2
    assert pids[0] != pids[4]
    assert pool.stats()["recycled"] >= 1
    assert not _alive(pids[0])


def test_close_never_hangs_and_leaves_no_process():
  pool = RewardPool(CONFIG, num_workers=2, verifiers=VERIFIERS)
  assert pool.wait_ready()
  pids = [i["pid"] for i in pool.worker_info()]
  pending = pool.submit([_item("ignore_sigterm_and_sleep")] * 2 + [GOOD] * 3)
  time.sleep(0.5)
  start = time.monotonic()
  pool.close()
  assert time.monotonic() - start < GRACE + 3.0
  with pytest.raises(RuntimeError, match="closed"):
    pending.result(timeout=5)
  assert not any(_alive(pid) for pid in pids)
  with pytest.raises(RuntimeError, match="closed"):
    pool.submit([GOOD])
  pool.close()  # twice is fine


def test_no_jax_in_workers_when_main_imports_jax(tmp_path):
  """multiprocessing's spawn would re-import this __main__ (and JAX)."""
  script = tmp_path / "train_like.py"
  script.write_text(textwrap.dedent("""
      import jax  # the parent's __main__ imports JAX at the top
      from brorl_jax.rewards import RewardPool, VerifyItem
      if __name__ == "__main__":
        with RewardPool(num_workers=1) as pool:
          assert pool.wait_ready()
          result = pool.score([VerifyItem("\\\\boxed{1}", "1", "math")])
          print(result[0].reward, pool.worker_info()[0]["jax_imported"])
      """))
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  out = subprocess.run([sys.executable, str(script)], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": root})
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["1.0", "False"]


def test_verifiers_must_be_importable_by_workers():
  local = lambda completion, answer, **meta: 1.0  # noqa: E731
  with pytest.raises(ValueError, match="'local' cannot be sent to worker"):
    RewardPool(CONFIG, num_workers=1, verifiers={"local": local})


def test_workers_that_cannot_start_break_the_pool_without_hanging(
    monkeypatch):
  # A module the parent has but a fresh interpreter cannot import.
  module = types.ModuleType("brorl_ephemeral_verifiers")
  exec("def one(completion, answer, **meta):\n  return 1.0", module.__dict__)
  monkeypatch.setitem(sys.modules, module.__name__, module)
  with RewardPool(CONFIG, num_workers=1,
                  verifiers={"one": module.one}) as pool:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="failed to start"):
      pool.wait_ready(timeout=60)
    assert time.monotonic() - start < 60
    with pytest.raises(RuntimeError, match="failed to start"):
      pool.submit([_item("one")])


@needs_sandbox
def test_hostile_code_leaves_no_process_behind_the_pool():
  token = f"brorl-pool-child-{os.getpid()}-{time.time_ns()}"
  hostile = ("```python\nimport os, time\nfor _ in range(20):\n"
             "  if os.fork() == 0:\n    os.setsid()\n"
             f"    os.execv('/usr/bin/sleep', ['{token}', '300'])\n"
             "time.sleep(30)\n```")
  tests = {"inputs": [""], "outputs": ["x"]}
  correct = VerifyItem("```python\nprint(input())\n```", "", "code",
                       tests={"inputs": ["hi"], "outputs": ["hi"]})
  with RewardPool(CONFIG, num_workers=1) as pool:
    results = pool.score([VerifyItem(hostile, "", "code", tests=tests),
                          correct])
  assert [r.reward for r in results] == [0.0, 1.0]
  assert results[0].status == "ok"  # the sandbox's budget stopped it
  leftovers = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if token.encode() in f.read():
          leftovers.append(pid)
    except OSError:
      pass
  assert leftovers == []


def test_a_worker_killed_mid_item_leaves_no_scratch_directory(tmp_path,
                                                              monkeypatch):
  # Every worker killed mid-item once left an empty brorl_code_* directory.
  monkeypatch.setenv("TMPDIR", str(tmp_path))          # the workers'
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this process'
  config = RewardsConfig(timeout_s=5.0, kill_grace_s=0.5, code=CodeConfig(
      time_budget_s=2.0, allow_unsandboxed=True))
  sleeper = VerifyItem("```python\nimport time\ntime.sleep(60)\n```", "",
                       "code", {"inputs": [""], "outputs": ["x"]})
  for backend in ["none"] + BACKENDS:  # "none": unsandboxed, trusted code
    with fresh_choices():
      sandbox.use_tested_backend(config.code, backend)
      pool = RewardPool(config, num_workers=1,
                        verifiers={"code": registry.VERIFIERS["code"]})
      assert pool.wait_ready()
      future = pool.submit([sleeper])
      time.sleep(1.0)  # the program is running in its sandbox
      pool.close()     # SIGTERM to the busy worker
      assert future.exception() is not None
    assert list(tmp_path.glob("brorl_code_*")) == [], backend
