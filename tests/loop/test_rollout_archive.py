"""Tests for brorl_jax.rollout_archive: exact round trip, reopen, truncate."""

import numpy as np
import pytest

from brorl_jax.loop import rollout_archive as archive_lib
from brorl_jax.loop.rollout_archive import RolloutArchive


def _step_data(seed: int, num_prompts: int = 3, group: int = 4,
               max_len: int = 6) -> dict:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_len + 1, (num_prompts, group))
  lengths[0, 0], lengths[-1, -1] = 0, max_len       # both extremes
  return {
      "prompt_ids": [rng.integers(0, 151_000, n)
                     for n in rng.integers(1, 9, num_prompts)],
      "completion_ids": rng.integers(0, 151_000, (num_prompts, group,
                                                  max_len)),
      "lengths": lengths,
      "logprobs": -rng.random((num_prompts, group, max_len)).astype(
          np.float32) * 5,
      "rewards": rng.choice([0.0, 1.0, 0.25, np.nan],
                            (num_prompts, group)).astype(np.float32),
      "status": rng.choice(["ok", "timeout", "error"], (num_prompts, group)),
  }


def _assert_step(read: dict, data: dict, step: int) -> None:
  num_prompts, group, _ = data["completion_ids"].shape
  assert read["step"] == step
  assert len(read["prompt_ids"]) == num_prompts
  for got, want in zip(read["prompt_ids"], data["prompt_ids"]):
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32
  np.testing.assert_array_equal(read["prompt_index"],
                                np.repeat(np.arange(num_prompts), group))
  np.testing.assert_array_equal(read["rollout_index"],
                                np.tile(np.arange(group), num_prompts))
  np.testing.assert_array_equal(read["lengths"], data["lengths"].ravel())
  np.testing.assert_array_equal(read["rewards"], data["rewards"].ravel())
  np.testing.assert_array_equal(
      read["status"], archive_lib.encode_status(data["status"]).ravel())
  assert len(read["completion_ids"]) == num_prompts * group
  for r, (p, g) in enumerate(np.ndindex(num_prompts, group)):
    n = data["lengths"][p, g]
    np.testing.assert_array_equal(read["completion_ids"][r],
                                  data["completion_ids"][p, g, :n])
    np.testing.assert_array_equal(read["logprobs"][r],   # bit-exact f32
                                  data["logprobs"][p, g, :n])


def test_round_trip_reopen_and_append(tmp_path):
  data = {step: _step_data(step) for step in (1, 2, 5)}
  with RolloutArchive(tmp_path / "rollouts") as archive:
    archive.append(1, **data[1])
    archive.append(2, **data[2])
    assert archive.steps() == [1, 2]
    _assert_step(archive.read_step(1), data[1], 1)
  with RolloutArchive(tmp_path / "rollouts") as archive:   # a new process
    assert archive.steps() == [1, 2]
    archive.append(5, **data[5])
  archive = RolloutArchive(tmp_path / "rollouts")
  assert archive.steps() == [1, 2, 5]
  for step in (1, 2, 5):
    _assert_step(archive.read_step(step), data[step], step)
  with pytest.raises(KeyError, match="step 3 is not in"):
    archive.read_step(3)


def test_status_codes_and_bad_input(tmp_path):
  np.testing.assert_array_equal(
      archive_lib.encode_status([["ok", "timeout", "error"]]), [[0, 1, 2]])
  np.testing.assert_array_equal(archive_lib.encode_status(np.array([[2, 0]])),
                                [[2, 0]])
  with pytest.raises(ValueError, match="unknown verifier status"):
    archive_lib.encode_status([["fine"]])
  with pytest.raises(ValueError, match="status codes"):
    archive_lib.encode_status([[3]])
  archive = RolloutArchive(tmp_path)
  data = _step_data(0)
  with pytest.raises(ValueError, match=r"rewards must have shape \(3, 4\)"):
    archive.append(0, **(data | {"rewards": np.zeros((3, 5))}))
  with pytest.raises(ValueError, match="lengths must lie"):
    archive.append(0, **(data | {"lengths": data["lengths"] + 7}))
  with pytest.raises(ValueError, match="prompt_ids has 2 prompts"):
    archive.append(0, **(data | {"prompt_ids": data["prompt_ids"][:2]}))
  archive.append(4, **data)
  with pytest.raises(ValueError, match="truncate_after"):
    archive.append(4, **data)
  assert archive.steps() == [4]


def test_truncate_after_then_resume(tmp_path):
  data = {step: _step_data(10 + step) for step in range(5)}
  archive = RolloutArchive(tmp_path)
  for step in range(5):
    archive.append(step, **data[step])
    archive.write_text_samples(step, [
        {"prompt": "1+1=", "completion": f"{step}", "reward": np.float32(1),
         "status": "ok"},
        {"prompt": "2+2=", "completion": "x", "reward": float("nan"),
         "status": "error", "answer": "4"}])
  # Resume from checkpoint step 2, in a new process.
  resumed = RolloutArchive(tmp_path)
  assert resumed.truncate_after(2) == [3, 4]
  assert resumed.steps() == [0, 1, 2]
  samples = resumed.read_text_samples()
  assert [s["step"] for s in samples] == [0, 0, 1, 1, 2, 2]
  assert samples[1] == {"step": 0, "prompt": "2+2=", "completion": "x",
                        "reward": None, "status": "error", "answer": "4"}
  assert samples[0]["reward"] == 1.0
  resumed.write_text_samples(2, [{"prompt": "p", "completion": "c",
                                  "reward": None}])
  assert resumed.read_text_samples()[-1] == {
      "step": 2, "prompt": "p", "completion": "c", "reward": None,
      "status": None}
  with pytest.raises(ValueError, match="lacks"):
    resumed.write_text_samples(2, [{"prompt": "p"}])
  assert resumed.truncate_after(2) == []
  assert len(resumed.read_text_samples()) == 7
  # The arrays shrank to exactly the kept rows.
  rows = sum(d["lengths"].size for s, d in data.items() if s <= 2)
  tokens = sum(int(d["lengths"].sum()) for s, d in data.items() if s <= 2)
  assert resumed._arrays["reward"].shape == (rows,)
  assert resumed._arrays["completion_tokens"].shape == (tokens,)
  other = {step: _step_data(100 + step) for step in (3, 4)}
  for step in (3, 4):
    resumed.append(step, **other[step])
  reopened = RolloutArchive(tmp_path)
  assert reopened.steps() == [0, 1, 2, 3, 4]
  for step in range(5):
    want = data[step] if step <= 2 else other[step]
    _assert_step(reopened.read_step(step), want, step)
  assert reopened.truncate_after(10) == []
  assert reopened.truncate_after(-1) == [0, 1, 2, 3, 4]
  assert RolloutArchive(tmp_path).steps() == []


def _crash_before_commit(archive, monkeypatch, step, data):
  """Runs `append` so that it fails after the data writes, before the
  step's commit row (as a crash would)."""
  class CrashingSteps:
    shape = archive._steps.shape

    def resize(self, *args, **kwargs):
      raise OSError("simulated crash")

  monkeypatch.setattr(archive, "_steps", CrashingSteps())
  with pytest.raises(OSError, match="simulated"):
    archive.append(step, **data)
  monkeypatch.undo()


def test_crash_before_commit_is_ignored_and_cut(tmp_path, monkeypatch):
  archive = RolloutArchive(tmp_path)
  archive.append(0, **_step_data(0))
  _crash_before_commit(archive, monkeypatch, 1, _step_data(1))
  assert archive._arrays["reward"].shape == (24,)       # data was written
  reader = RolloutArchive(tmp_path, read_only=True)      # beside a writer
  assert reader.steps() == [0]
  assert reader._arrays["reward"].shape == (24,)        # nothing cut
  _assert_step(reader.read_step(0), _step_data(0), 0)
  with pytest.raises(PermissionError, match="read-only"):
    reader.append(1, **_step_data(1))
  reopened = RolloutArchive(tmp_path)                    # the restarted run
  assert reopened.steps() == [0]
  assert reopened._arrays["reward"].shape == (12,)      # cut by a writer
  reopened.append(1, **_step_data(2))
  _assert_step(RolloutArchive(tmp_path).read_step(1), _step_data(2), 1)


def test_failed_append_then_same_process_carries_on(tmp_path, monkeypatch):
  archive = RolloutArchive(tmp_path)
  archive.append(0, **_step_data(0))
  _crash_before_commit(archive, monkeypatch, 1, _step_data(1))
  archive.append(7, **_step_data(7, num_prompts=1))
  assert archive.steps() == [0, 7]
  reopened = RolloutArchive(tmp_path)
  assert reopened._arrays["reward"].shape == (16,)
  _assert_step(reopened.read_step(0), _step_data(0), 0)
  _assert_step(reopened.read_step(7), _step_data(7, num_prompts=1), 7)


def test_read_only_needs_an_archive(tmp_path):
  with pytest.raises(FileNotFoundError, match="no rollout archive"):
    RolloutArchive(tmp_path / "none", read_only=True)
  assert not (tmp_path / "none").exists()


def test_disabled_archive_is_a_no_op(tmp_path):
  archive = RolloutArchive(tmp_path / "r", enabled=False)
  assert archive.append(0, **_step_data(0)) == 0.0
  archive.write_text_samples(0, [{"prompt": "", "completion": "",
                                  "reward": 0, "status": "ok"}])
  assert archive.steps() == [] and archive.truncate_after(0) == []
  assert not (tmp_path / "r").exists()


def test_append_time_brorl_sized_step(tmp_path):
  """P = 8, G = 64, T = 256 (512 rollouts, ~64k tokens): well under 1 s."""
  rng = np.random.default_rng(0)
  shape = (8, 64, 256)
  data = {
      "prompt_ids": [rng.integers(0, 151_000, 200) for _ in range(8)],
      "completion_ids": rng.integers(0, 151_000, shape),
      "lengths": rng.integers(0, 257, shape[:2]),
      "logprobs": rng.normal(size=shape).astype(np.float32),
      "rewards": rng.random(shape[:2]).astype(np.float32),
      "status": np.zeros(shape[:2], np.int64)}
  archive = RolloutArchive(tmp_path)
  seconds = [archive.append(step, **data) for step in range(3)]
  print(f"append P=8 G=64 T=256: {[round(s * 1e3, 1) for s in seconds]} ms")
  assert max(seconds) < 5.0      # generous: a shared, noisy CPU
  assert len(RolloutArchive(tmp_path).read_step(2)["logprobs"]) == 512


def test_samples_survive_text_utf8_cannot_encode(tmp_path):
  # A lone surrogate (e.g. from a data row) once crashed step 1 here.
  archive = RolloutArchive(tmp_path)
  archive.write_text_samples(1, [{"prompt": "p\ud800", "completion": "c",
                                  "answer": "69\udfff", "reward": 1.0,
                                  "status": "ok"}])
  sample = RolloutArchive(tmp_path).read_text_samples()[0]
  assert (sample["prompt"], sample["answer"]) == ("p\\ud800", "69\\udfff")
