"""W&B logging: every metrics row and the config into an offline run, the
run id kept in the workdir so a resumed run continues the same W&B run."""

import sys

import pytest

from brorl_jax import run_config
from brorl_jax.loop import metrics, wandb_writer
from brorl_jax.config import ConfigError
from configs import base
from tests import wandb_records


def _settings(**kw):
  return wandb_writer.WandbSettings(mode="offline", project="brorl-test",
                                    **kw)


def test_rows_and_config_reach_an_offline_run_and_resume_keeps_the_id(
    tmp_path):
  workdir = tmp_path / "run_a"
  cfg = run_config.load(base.get_config())
  config = run_config.resolved(cfg)
  wb = wandb_writer.WandbWriter(workdir, _settings(tags=("x",)), config)
  with metrics.MetricsWriter(workdir, tensorboard=False, wandb=wb) as writer:
    writer.write(1, {"reward/mean": 0.25, "loss/pg": float("nan")})
    writer.write(2, {"reward/mean": 0.5})
    writer.write(2, {"eval/pass@1": 0.125})
  run_id = (workdir / wandb_writer.RUN_ID_FILE).read_text().strip()
  [first] = wandb_records.run_files(workdir)
  assert first.endswith(f"run-{run_id}.wandb")
  rows = wandb_records.history(first)
  assert [(r["step"], r.get("reward/mean"), r.get("eval/pass@1"))
          for r in rows] == [(1, 0.25, None), (2, 0.5, None),
                             (2, None, 0.125)]
  assert str(rows[0]["loss/pg"]) == "nan"       # non-finite kept
  record = wandb_records.run(first)
  assert (record.run_id, record.project, record.display_name) == (
      run_id, "brorl-test", "run_a")
  assert list(record.tags) == ["x"]
  logged = wandb_records.config(first)
  assert logged["rollout"]["n"] == cfg.rollout.n
  assert logged["algo"]["loss"]["ratio"] == "token"

  # A resumed run (same workdir) continues the same W&B run.
  wb = wandb_writer.WandbWriter(workdir, _settings(), config)
  with metrics.MetricsWriter(workdir, tensorboard=False, wandb=wb) as writer:
    writer.write(3, {"reward/mean": 0.75})
  files = wandb_records.run_files(workdir)
  assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb")
                                 for f in files)
  assert wandb_records.history(files[1])[0]["reward/mean"] == 0.75


class _Sink:
  def __init__(self):
    self.rows, self.closed = [], False

  def log(self, step, values):
    self.rows.append((step, dict(values)))

  def close(self):
    self.closed = True


def test_metrics_writer_hands_every_row_to_wandb_on_process_0_only(tmp_path):
  sink = _Sink()
  writer = metrics.MetricsWriter(tmp_path, tensorboard=False, wandb=sink)
  writer.write(1, {"a": 1, "b": float("inf")})
  writer.write(1, {"c": 2.5})
  writer.close()
  assert sink.rows == [(1, {"a": 1, "b": float("inf")}), (1, {"c": 2.5})]
  assert sink.closed
  other = _Sink()
  metrics.MetricsWriter(tmp_path / "p1", enabled=False, wandb=other).write(
      1, {"a": 1})
  assert other.rows == []


def test_logging_keys_and_errors(tmp_path, monkeypatch):
  config = base.get_config()
  config.logging.wandb_tags = ("a, b", "c")   # as --config...=a,b gives it
  config.logging.wandb_mode = "offline"
  assert run_config.load(config).logging.wandb_tags == ("a", "b", "c")
  config.logging.wandb_mode = "cloud"
  with pytest.raises(ConfigError, match="logging.wandb_mode"):
    run_config.load(config)
  assert wandb_writer.from_logging(run_config.load(base.get_config()).logging,
                                   tmp_path, {}) is None
  (tmp_path / wandb_writer.RUN_ID_FILE).write_text("not an id!\n")
  with pytest.raises(ConfigError, match="not a W&B run id"):
    wandb_writer.run_id(tmp_path)
  monkeypatch.setitem(sys.modules, "wandb", None)      # not installed
  with pytest.raises(ConfigError, match=r"brorl-jax\[wandb\]"):
    wandb_writer.WandbWriter(tmp_path / "w", _settings(), {})
