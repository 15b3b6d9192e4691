"""Weights & Biases logging of a run (`logging.wandb`; the `[wandb]` extra).

    --config.logging.wandb=True [--config.logging.wandb_project=P
    --config.logging.wandb_mode=offline ...]

`MetricsWriter` hands this writer every row it writes to `metrics.jsonl`
(training steps, evaluations, the warm start's row), so the W&B run holds
the same metric names and values (`reward/mean`, `eval/pass@1`, ...),
non-finite values included. The resolved config (`run_config.resolved`) is
the run's config, given once per start. Rows carry `step` and W&B plots
against it (`define_metric("*", step_metric="step")`), because W&B's own
step counter only grows: a resumed run redoes the steps after its last
checkpoint and logs them again, and W&B keeps both points instead of
dropping the newer ones.

The run id is kept in `W/wandb_run_id`, written before the run starts, so
a resumed run continues the same W&B run (`resume="allow"`), online or
offline (`wandb sync W/wandb/offline-run-*` uploads an offline one). Only
process 0 logs: the train loop builds this writer there alone. W&B's files
go under `W/wandb/`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import secrets
import string
from typing import Any, Mapping

from brorl_jax.config import ConfigError

RUN_ID_FILE = "wandb_run_id"
_INSTALL = "pip install 'brorl-jax[wandb]' (or pip install wandb)"


@dataclasses.dataclass(frozen=True)
class WandbSettings:
  """What `wandb.init` is given (from the `logging.wandb_*` keys).

  Attributes:
    project: the W&B project (None: W&B's default, "uncategorized").
    entity: the team or user (None: the API key's default entity).
    name: the run's display name (None: the workdir's name).
    group: runs grouped together, e.g. the arms of a comparison.
    tags: tags of the run.
    mode: "online", "offline" (written under `W/wandb/`, uploaded later
      with `wandb sync`) or "disabled" (W&B's no-op run).
  """

  project: str | None = None
  entity: str | None = None
  name: str | None = None
  group: str | None = None
  tags: tuple[str, ...] = ()
  mode: str = "online"


def _jsonable(value: Any) -> Any:
  """Config values as plain JSON types (dataclasses as dicts, else str)."""
  def default(x):
    if dataclasses.is_dataclass(x):
      return dataclasses.asdict(x)
    return str(x)
  return json.loads(json.dumps(value, default=default))


def new_run_id() -> str:
  """A fresh run id of W&B's form (8 lowercase letters and digits)."""
  alphabet = string.ascii_lowercase + string.digits
  return "".join(secrets.choice(alphabet) for _ in range(8))


def run_id(workdir: pathlib.Path) -> str:
  """The workdir's W&B run id, created (and kept) on the first call."""
  path = workdir / RUN_ID_FILE
  if path.exists():
    found = path.read_text().strip()
    if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", found):
      return found
    raise ConfigError(f"{path} holds {found[:80]!r}, not a W&B run id: "
                      "delete the file to start a new W&B run")
  new = new_run_id()
  tmp = path.with_suffix(".tmp")
  tmp.write_text(new + "\n")
  tmp.replace(path)
  return new


class WandbWriter:
  """One W&B run per workdir; `log` one metrics row, `close` at the end."""

  def __init__(self, workdir: str | pathlib.Path, settings: WandbSettings,
               config: Mapping[str, Any]):
    """Starts (or resumes) the workdir's run.

    Args:
      workdir: the run's directory (holds the id and W&B's files).
      settings: project, name, mode, ...
      config: the resolved run config, logged as the run's config.

    Raises:
      ConfigError: `wandb` is not installed, or the stored id is bad.
    """
    try:
      # Imported here: an optional dependency, and a slow import that runs
      # without W&B need not pay.
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConfigError(f"config key 'logging.wandb': True needs the wandb "
                        f"package ({e}): {_INSTALL}") from None
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.id = run_id(self.workdir)
    try:
      self.run = wandb.init(
          project=settings.project, entity=settings.entity,
          name=settings.name or self.workdir.name, group=settings.group,
          tags=list(settings.tags) or None, mode=settings.mode, id=self.id,
          resume="allow", dir=str(self.workdir), config=_jsonable(config))
    except Exception as e:  # pylint: disable=broad-except
      # No API key, no network, a bad entity: W&B raises several types.
      detail = " ".join(str(e).split())[:300]
      raise ConfigError(
          f"config key 'logging.wandb': W&B could not start the run "
          f"({type(e).__name__}: {detail}); log in (`wandb login` or "
          "WANDB_API_KEY), or set logging.wandb_mode=offline to write it "
          "under the workdir and `wandb sync` it later") from None
    self.run.define_metric("step")
    self.run.define_metric("*", step_metric="step")

  def log(self, step: int, values: Mapping[str, int | float]) -> None:
    """Logs one row (the values `MetricsWriter` wrote for `step`).

    Raises:
      RuntimeError: after `close`.
    """
    if self.run is None:
      raise RuntimeError("the W&B run is finished (WandbWriter.close)")
    self.run.log({"step": step, **values})

  def close(self) -> None:
    """Finishes the run (flushes offline files); later logs are dropped."""
    if self.run is not None:
      self.run.finish()
      self.run = None


def from_logging(logging_cfg: Any, workdir: pathlib.Path,
                 config: Mapping[str, Any]) -> WandbWriter | None:
  """The writer `logging.wandb` asks for, or None when it is off."""
  if not logging_cfg.wandb:
    return None
  return WandbWriter(workdir, WandbSettings(
      project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity,
      name=logging_cfg.wandb_name, group=logging_cfg.wandb_group,
      tags=tuple(logging_cfg.wandb_tags), mode=logging_cfg.wandb_mode),
                     config)
