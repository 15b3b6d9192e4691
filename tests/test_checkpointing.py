"""TrainCheckpointer on a bad disk: a failed save surfaces as one line, a
damaged latest checkpoint falls back to the newest intact one."""

import errno
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from brorl_jax import checkpointing
from brorl_jax.rl.train_state import TrainState


def _state(value: float) -> TrainState:
  params = {"w": jnp.full((64, 64), value, jnp.float32),
            "b": jnp.arange(64, dtype=jnp.float32) * value}
  state = TrainState.create(params, optax.adam(1e-3), with_reference=False)
  return state.replace(step=jnp.int32(value))


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
          jax.devices()[0])), _state(0.0))


def _three_steps(directory) -> None:
  ckpt = checkpointing.TrainCheckpointer(directory, keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(float(step)), None, {"step": step})
  ckpt.close()


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)


def _truncate_params(step_dir):
  path = _largest_file(step_dir / checkpointing.PARAMS)
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _drop_meta(step_dir):
  (step_dir / checkpointing.META / "metadata").unlink()


@pytest.mark.parametrize("damage", [_truncate_params, _drop_meta])
def test_resume_falls_back_from_a_damaged_latest_checkpoint(tmp_path, caplog,
                                                            damage):
  directory = tmp_path / "checkpoints"
  _three_steps(directory)
  damage(directory / "3")
  ckpt = checkpointing.TrainCheckpointer(directory, keep=3)
  with caplog.at_level(logging.WARNING, "brorl_jax.checkpointing"):
    step, state, meta = ckpt.restore_latest(_abstract(), None)
  assert (step, int(state.step), meta) == (2, 2, {"step": 2})
  np.testing.assert_array_equal(jax.device_get(state.params["w"]),
                                np.full((64, 64), 2.0, np.float32))
  warnings = [r.getMessage() for r in caplog.records]
  assert any("checkpoint step 3" in m and "cannot be read" in m
             and "falling back to step 2" in m for m in warnings), warnings
  assert all("\n" not in m for m in warnings)
  # Set aside, so that the run can save step 3 again.
  assert ckpt.all_steps() == [1, 2]
  assert (tmp_path / checkpointing.DAMAGED_DIR / "3").is_dir()
  ckpt.save(3, _state(5.0), None, {"step": 3})
  ckpt.close()


def test_no_intact_checkpoint_is_one_line(tmp_path):
  directory = tmp_path / "checkpoints"
  _three_steps(directory)
  for step in (1, 2, 3):
    _truncate_params(directory / str(step))
  ckpt = checkpointing.TrainCheckpointer(directory, keep=3)
  with pytest.raises(checkpointing.CheckpointError) as e:
    ckpt.restore_latest(_abstract(), None)
  message = str(e.value)
  assert "\n" not in message and str(directory) in message
  assert "steps [1, 2, 3]" in message
  ckpt.close()


def test_no_checkpoint_restores_nothing(tmp_path):
  ckpt = checkpointing.TrainCheckpointer(tmp_path / "c", keep=3)
  assert ckpt.restore_latest(_abstract(), None) is None
  ckpt.close()


def _fail_json_writes(monkeypatch, step):
  """A full disk under orbax's background commit of step `step`'s JSON
  items (`meta`, `data`)."""
  handler = ocp.handlers.JsonCheckpointHandler
  original = handler._save_fn  # pylint: disable=protected-access

  async def save_fn(self, x, directory):
    if pathlib.Path(directory).parent.name.split(".")[0] == str(step):
      raise OSError(errno.ENOSPC, "No space left on device",
                    str(directory / "metadata"))
    return await original(self, x, directory)

  monkeypatch.setattr(handler, "_save_fn", save_fn)


def test_failed_async_save_is_one_line_naming_path_and_os_error(
    tmp_path, monkeypatch):
  _fail_json_writes(monkeypatch, 2)
  directory = tmp_path / "checkpoints"
  ckpt = checkpointing.TrainCheckpointer(directory, keep=3, async_save=True)
  ckpt.save(1, _state(1.0), None, {"step": 1})
  with pytest.raises(checkpointing.CheckpointError) as e:
    # Fails in the background: raised by `save` when the commit failed
    # before it returned, else by `check` at a following step start.
    ckpt.save(2, _state(2.0), None, {"step": 2})
    for _ in range(600):
      ckpt.check()
      jax.block_until_ready(jnp.zeros(()))
    ckpt.wait()
  message = str(e.value)
  assert "\n" not in message
  assert f"{directory}/2" in message
  assert "[Errno 28] No space left on device" in message
  assert "resumes from step 1" in message
  ckpt.close()                                  # no second error
  assert checkpointing.TrainCheckpointer(directory, keep=3).all_steps() == [1]
