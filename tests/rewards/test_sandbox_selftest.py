"""The sandbox's self-test, and what model code runs as (issue 36.1).

Run as root without bubblewrap, the unshare fallback once let a program
open /proc/sys/kernel/core_pattern for writing (bubblewrap run by root
too). Files are only opened and closed here, never written.
"""

import json
import os

import pytest

from brorl_jax.rewards import __main__ as cli
from brorl_jax.rewards import sandbox, sandbox_selftest
from brorl_jax.rewards.code_verifier import verify_code
from brorl_jax.rewards.config import CodeConfig, RewardsConfig
from brorl_jax.rewards.pool import RewardPool
from brorl_jax.rewards.registry import VerifyItem
from tests.rewards.sandbox_marks import (BACKENDS, FAILURES, REQUIRED,
                                         fresh_choices, needs_sandbox)

HOST_FILES = ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/overcommit_memory",
              "/proc/sysrq-trigger", "/proc/sys/kernel/modprobe")
CONTROL = {"completion": "```python\nprint(input())\n```", "verifier": "code",
           "tests": {"inputs": ["ping"], "outputs": ["ping"]}}


def _opener(path):
  # Passes its test only if the file opens for writing (nothing written).
  program = (f"import os\nos.close(os.open({path!r}, os.O_WRONLY))\n"
             "print('opened')\n")
  return {"completion": f"```python\n{program}```", "verifier": "code",
          "tests": {"inputs": [""], "outputs": ["opened"]},
          "meta": {"path": path}}


@pytest.fixture(name="fresh")
def _fresh():
  with fresh_choices():
    yield


def test_ci_runs_the_probes_on_bubblewrap():
  if REQUIRED:
    assert FAILURES["bwrap"] is None, FAILURES


@needs_sandbox
@pytest.mark.parametrize("backend", BACKENDS)
def test_host_kernel_files_score_zero_and_a_control_passes(backend):
  config = RewardsConfig(code=CodeConfig(sandbox=backend, time_budget_s=5.0))
  for record in [_opener(p) for p in HOST_FILES]:
    assert verify_code(record["completion"], tests=record["tests"],
                       config=config) == 0.0, record["meta"]
  assert verify_code(CONTROL["completion"], tests=CONTROL["tests"],
                     config=config) == 1.0


@needs_sandbox
def test_the_scoring_cli_gives_them_zero(tmp_path):
  src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in
                         [_opener(p) for p in HOST_FILES] + [CONTROL]))
  assert cli.main(["--input", str(src), "--output", str(dst),
                   "--workers", "1"]) == 0
  scored = [json.loads(line) for line in dst.read_text().splitlines()]
  assert [s["reward"] for s in scored] == [0.0] * len(HOST_FILES) + [1.0]
  assert all(s["status"] == "ok" for s in scored)


@needs_sandbox
@pytest.mark.parametrize("backend", BACKENDS)
def test_code_runs_unprivileged(backend):
  program = ("import os\nstatus = open('/proc/self/status').read()\n"
             "print(os.geteuid() != 0, 'NoNewPrivs:\\t1' in status,\n"
             "      'CapBnd:\\t0000000000000000' in status)\n"
             "print(' ro,' in [l for l in open('/proc/self/mounts')"
             " if ' /proc/sys ' in l][0])\n")
  runs = sandbox.run_program(program, [""], mode="stdin", fn_name=None,
                             config=CodeConfig(sandbox=backend,
                                               time_budget_s=5.0))
  assert runs[0].status == "ok"
  assert runs[0].stdout.split() == ["True"] * 4


def test_the_probes_find_what_an_unconfined_program_can_do(monkeypatch):
  monkeypatch.setattr(sandbox_selftest, "_REAP_S", 0.3)
  found = sandbox.self_test("none", CodeConfig(allow_unsandboxed=True))
  assert isinstance(found, list)
  text = "; ".join(found)
  assert "connected to a host listener on 127.0.0.1" in text
  assert "on the host" in text  # wrote outside
  assert "alive after its deadline" in text
  if os.geteuid() == 0:
    assert "runs as uid 0 of the host's user namespace" in text
    assert "opened /proc/sys/kernel/core_pattern for writing" in text
  assert not [p for p in os.listdir("/proc") if p.isdigit() and "brorl-self"
              in open(f"/proc/{p}/cmdline", errors="replace").read()]


@needs_sandbox
@pytest.mark.skipif(os.geteuid() != 0, reason="weakens the root path")
def test_a_sandbox_that_fails_a_probe_is_refused_in_one_line(
    monkeypatch, tmp_path, capsys, fresh):
  # The old behaviour: no switch to nobody, code runs as the host's root.
  monkeypatch.setattr(sandbox, "_drop_to_nobody", lambda: ["/usr/bin/env"])
  config = RewardsConfig(code=CodeConfig(sandbox=BACKENDS[0]))
  with pytest.raises(sandbox.SandboxUnavailable) as caught:
    sandbox.backend_for(config.code)
  message = str(caught.value)
  assert "\n" not in message
  assert (f"'{BACKENDS[0]}' failed its self-test: runs as uid 0 of the "
          "host's user namespace" in message)
  assert "Fix: install bubblewrap" in message
  with RewardPool(config, num_workers=1) as pool:
    assert pool.score([VerifyItem("\\boxed{1}", "1", "math")])[0].reward == 1
    with pytest.raises(sandbox.SandboxUnavailable):
      pool.submit([VerifyItem(CONTROL["completion"], "", "code",
                              CONTROL["tests"])])
  src = tmp_path / "in.jsonl"
  src.write_text(json.dumps(CONTROL) + "\n")
  assert cli.main(["--input", str(src), "--output", str(tmp_path / "o"),
                   "--set", f"code.sandbox={BACKENDS[0]}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err
