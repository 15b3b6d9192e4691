"""The workdir's life cycle: checked first, config recorded and compared,
logs cut back to the last checkpoint (or to nothing)."""

import json
import logging
import pathlib

import numpy as np
import pytest

from brorl_jax.loop import workdir as workdir_lib
from brorl_jax.config import ConfigError
from brorl_jax.loop.metrics import MetricsWriter, read_metrics
from brorl_jax.loop.rollout_archive import RolloutArchive


def test_a_file_or_unwritable_path_is_one_line(tmp_path):
  file = tmp_path / "file"
  file.write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is a file"):
    workdir_lib.check_writable(file)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"/proc/brorl_test/w cannot be written \(\[Errno"):
    workdir_lib.check_writable(pathlib.Path(
        "/proc/brorl_test/w"))
  assert issubclass(workdir_lib.WorkdirError, ConfigError)
  # A usable one is created and left empty.
  workdir_lib.check_writable(tmp_path / "new" / "run")
  assert list((tmp_path / "new" / "run").iterdir()) == []


def test_a_changed_model_is_refused_naming_the_keys(tmp_path, caplog):
  raw = {"model": {"preset": "demo"}, "rollout": {"n": 8}, "seed": 0}
  workdir_lib.record_config(tmp_path, raw)
  recorded = json.loads((tmp_path / workdir_lib.RUN_CONFIG_FILE).read_text())
  assert recorded == raw
  changed = {"model": {"preset": "tiny"}, "rollout": {"n": 8}, "seed": 0,
             "init": {"tokenizer_vocab_size": 320}}
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.record_config(tmp_path, changed)
  message = str(e.value)
  assert "model.preset 'demo' -> 'tiny'" in message
  assert "init.tokenizer_vocab_size '(unset)' -> 320" in message
  assert "rollout.n" not in message and "\n" not in message
  # Other changes are applied and listed in the log.
  with caplog.at_level(logging.WARNING, "brorl_jax.loop.workdir"):
    workdir_lib.record_config(tmp_path, {**raw, "rollout": {"n": 16}})
  assert "rollout.n 8 -> 16" in caplog.text
  assert json.loads((tmp_path / workdir_lib.RUN_CONFIG_FILE).read_text())[
      "rollout"] == {"n": 16}


def _log_steps(writer, archive, steps):
  for step in steps:
    writer.write(step, {"reward/mean": 0.5})
    archive.append(step, prompt_ids=[np.array([1, 2])],
                   completion_ids=np.ones((1, 2, 3), np.int32),
                   lengths=np.array([[3, 1]]), logprobs=np.zeros((1, 2, 3)),
                   rewards=np.zeros((1, 2)), status=np.zeros((1, 2), int))
    archive.write_text_samples(step, [{"prompt": "p", "completion": "c"}])


@pytest.mark.parametrize("checkpoint", [None, 2])
def test_cut_back_to_the_checkpoint_or_to_nothing(tmp_path, checkpoint):
  writer = MetricsWriter(tmp_path, tensorboard=False)
  archive = RolloutArchive(tmp_path / "rollouts")
  _log_steps(writer, archive, [0, 1, 2, 3])
  # A restart: reopened, then cut back.
  writer = MetricsWriter(tmp_path, tensorboard=False)
  archive = RolloutArchive(tmp_path / "rollouts")
  workdir_lib.cut_back(checkpoint, writer, archive)
  kept = [0, 1, 2] if checkpoint == 2 else []
  assert [r["step"] for r in read_metrics(tmp_path)] == kept
  assert archive.steps() == kept
  assert [r["step"] for r in archive.read_text_samples()] == kept
  # ...and the steps after it are written again without complaint.
  _log_steps(writer, archive, [s for s in [0, 1, 2, 3] if s not in kept])
  assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
  assert archive.steps() == [0, 1, 2, 3]
