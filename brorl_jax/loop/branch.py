"""Continuing every arm of a comparison from one checkpoint of another run.

  python -m brorl_jax.compare ... --from W/checkpoints/S     (or --from W)

`W/checkpoints/S` (`W` or `W/checkpoints`: the latest step) becomes a model
directory (`params/`, `model_config.json`, `tokenizer/`) that every arm
starts from through `init.path`, as the warm start is otherwise. The
branch point records where on the parent's curve the arms begin: its step,
its cumulative generated tokens and its last held-out pass@1 at or before
that step (the origin of the arms in the Figure-1-style plot).

Only the policy parameters carry over: each arm builds its own optimizer
state, data order and (with a KL term) takes the branch point as its
reference policy, as RL runs started from one released checkpoint do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

from brorl_jax import checkpointing
from brorl_jax.loop.metrics import read_metrics

POINT_FILE = "branch_point.json"
TOKENS = "rollout/generated_tokens_total"
PASS1 = "eval/pass@1"


class BranchError(ValueError):
  """The --from path names no usable checkpoint (message says the fix)."""


@dataclasses.dataclass(frozen=True)
class BranchPoint:
  """Where the arms leave the parent run.

  Attributes:
    workdir: the parent run's workdir.
    step: the checkpoint's RL step.
    tokens: the parent's cumulative generated tokens at that step.
    pass1: its last held-out pass@1 at or before that step (None if none).
    pass1_step: the step of that evaluation.
  """

  workdir: str
  step: int
  tokens: int
  pass1: float | None
  pass1_step: int | None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def resolve(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """(parent workdir, step) of `W/checkpoints/S`, `W/checkpoints` or `W`.

  Raises:
    BranchError: no checkpoint there, or no such step.
  """
  path = pathlib.Path(path).absolute()
  step = None
  if path.name.isdigit() and path.parent.name == "checkpoints":
    step, path = int(path.name), path.parent.parent
  elif path.name == "checkpoints":
    path = path.parent
  ckpt_dir = path / "checkpoints"
  if not ckpt_dir.is_dir():
    raise BranchError(f"--from {path}: no checkpoints/ there; give a "
                      "training workdir W, W/checkpoints or W/checkpoints/S")
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir()
                 if p.name.isdigit())
  if not steps:
    raise BranchError(f"--from {path}: {ckpt_dir} holds no checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise BranchError(f"--from {path}/checkpoints/{step}: no such step; "
                      f"available: {steps}")
  return path, step


def branch_point(workdir: pathlib.Path, step: int) -> BranchPoint:
  """The parent's tokens and last pass@1 at `step`, from its metrics."""
  tokens, pass1, pass1_step = 0, None, None
  for r in read_metrics(workdir):
    if r["step"] > step:
      continue
    if r.get(TOKENS) is not None:
      tokens = r[TOKENS]
    if r.get(PASS1) is not None:
      pass1, pass1_step = r[PASS1], r["step"]
  return BranchPoint(str(workdir), step, int(tokens), pass1, pass1_step)


def export(source: str | pathlib.Path, dest: pathlib.Path) -> BranchPoint:
  """Writes the checkpoint named by `source` as a model directory `dest`
  (once: an existing `dest` from the same source is reused).

  Raises:
    BranchError: `source` is not a checkpoint, or `dest` was made from
      another one.
  """
  workdir, step = resolve(source)
  marker = dest / POINT_FILE
  if marker.exists():
    old = json.loads(marker.read_text())
    if (old["workdir"], old["step"]) != (str(workdir), step):
      raise BranchError(
          f"{dest} was made from {old['workdir']} step {old['step']}, not "
          f"{workdir} step {step}: use a new --workdir")
    return BranchPoint(**old)
  try:
    point = branch_point(workdir, step)
  except FileNotFoundError as e:
    raise BranchError(f"--from {workdir}: {e} (the parent run's metrics "
                      "place the branch point)") from e
  model_cfg, params, tokenizer_dir = checkpointing.load_policy_params(
      workdir, step)
  if tokenizer_dir is None:
    raise BranchError(f"--from {workdir}: it has no tokenizer/ to carry "
                      "over")
  dest.mkdir(parents=True, exist_ok=True)
  for name in ("params", "tokenizer"):
    if (dest / name).exists():          # an interrupted earlier export
      shutil.rmtree(dest / name)
  tmp = dest / "params.tmp"
  checkpointing.save_params(tmp, params)
  os.replace(tmp, dest / "params")
  checkpointing.save_model_config(model_cfg, dest)
  shutil.copytree(tokenizer_dir, dest / "tokenizer")
  marker.write_text(json.dumps(point.to_dict(), indent=1))
  return point
