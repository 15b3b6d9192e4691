"""TrainCheckpointer on a bad disk: a failed save surfaces as one line, a
damaged latest checkpoint (also one whose bytes changed: checksums) falls
back to the newest intact one, a read error is retried and, unless it proves
damage, moves nothing."""

import errno
import logging
import pathlib
import shutil

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


@pytest.fixture(name="no_pause")
def _no_pause(monkeypatch):
  monkeypatch.setattr(checkpointing, "RETRY_DELAYS_S", (0.0,))


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
                                                            damage, no_pause):
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


def test_no_intact_checkpoint_is_one_line(tmp_path, no_pause):
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


# ---- integrity and read errors (issue 36.2, 36.3) --------------------------

def _random_state(value: float) -> TrainState:
  # Incompressible values: the data files hold the arrays' bytes.
  key = jax.random.key(int(value))
  params = {"w": jax.random.normal(key, (64, 64)),
            "b": jnp.arange(64, dtype=jnp.float32) * value}
  state = TrainState.create(params, optax.adam(1e-3), with_reference=False)
  return state.replace(step=jnp.int32(value))


def _random_steps(directory) -> pathlib.Path:
  ckpt = checkpointing.TrainCheckpointer(directory, keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _random_state(float(step)), None, {"step": step})
  ckpt.close()
  return max((p for p in (directory / "3" / checkpointing.PARAMS).rglob("*")
              if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def _flip(path: pathlib.Path, offset: int) -> None:
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x04
  path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_parameters_falls_back_with_one_warning(
    tmp_path, caplog, no_pause):
  directory = tmp_path / "checkpoints"
  data = _random_steps(directory)
  pristine = tmp_path / "pristine"
  shutil.copytree(directory / "3", pristine)
  size = data.stat().st_size
  # Across the parameter data (the last bytes are the compressed frame's
  # end, where a flip may leave the arrays unchanged: then they restore).
  for offset in (0, size // 5, size // 2, 4 * size // 5):
    shutil.rmtree(directory / "3", ignore_errors=True)
    shutil.rmtree(tmp_path / checkpointing.DAMAGED_DIR, ignore_errors=True)
    shutil.copytree(pristine, directory / "3")
    _flip(data, offset)
    caplog.clear()
    ckpt = checkpointing.TrainCheckpointer(directory, keep=3)
    with caplog.at_level(logging.WARNING):
      step, state, _ = ckpt.restore_latest(_abstract(), None)
    ckpt.close()
    assert (step, int(state.step)) == (2, 2), offset
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, (offset, warnings)
    assert "checkpoint step 3" in warnings[0]
    assert "falling back to step 2" in warnings[0]
    assert (tmp_path / checkpointing.DAMAGED_DIR / "3").is_dir()


def test_export_and_model_directories_refuse_changed_bytes(tmp_path):
  directory = tmp_path / "checkpoints"
  data = _random_steps(directory)
  target = _abstract().params
  np.testing.assert_array_equal(
      checkpointing.restore_train_params(directory, target, 3)["b"],
      np.arange(64, dtype=np.float32) * 3)
  _flip(data, data.stat().st_size // 2)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"step 3 .* cannot be used: params\['w'\] differs"):
    checkpointing.restore_train_params(directory, target, 3)
  model = tmp_path / "model" / "params"
  checkpointing.save_params(model, _random_state(4.0).params)
  assert checkpointing.restore_params(model, target)["w"].shape == (64, 64)
  biggest = max((p for p in model.rglob("*") if p.is_file()
                 and p.parent.name == "d"), key=lambda p: p.stat().st_size)
  _flip(biggest, biggest.stat().st_size // 2)
  with pytest.raises(checkpointing.CheckpointError, match="differs"):
    checkpointing.restore_params(model, target)


def _failing_reads(monkeypatch, steps, times, error):
  """The next `times` reads of `steps` raise `error` (where orbax reads)."""
  handler = ocp.CompositeCheckpointHandler
  restore, left = handler.restore, [times]

  def flaky(self, directory, *args, **kwargs):
    if int(pathlib.Path(directory).name) in steps and left[0] > 0:
      left[0] -= 1
      raise error
    return restore(self, directory, *args, **kwargs)
  monkeypatch.setattr(handler, "restore", flaky)


def test_a_transient_read_error_is_retried_and_moves_nothing(
    tmp_path, caplog, monkeypatch, no_pause):
  directory = tmp_path / "checkpoints"
  _three_steps(directory)
  eio = OSError(errno.EIO, "Input/output error")
  ckpt = checkpointing.TrainCheckpointer(directory, keep=3)
  _failing_reads(monkeypatch, {3}, 2, eio)
  with caplog.at_level(logging.WARNING):
    step, _, _ = ckpt.restore_latest(_abstract(), None)
  assert step == 3
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  # An error that persists but proves nothing: stop, nothing moved.
  _failing_reads(monkeypatch, {3}, 99, eio)
  with pytest.raises(checkpointing.CheckpointError) as e:
    ckpt.restore_latest(_abstract(), None)
  message = str(e.value)
  assert "\n" not in message and "step 3" in message
  assert "[Errno 5] Input/output error" in message
  assert "nothing was moved" in message
  assert ckpt.all_steps() == [1, 2, 3]
  assert not (tmp_path / checkpointing.DAMAGED_DIR).exists()
  ckpt.close()


def test_damage_that_clears_on_a_second_read_is_not_damage(
    tmp_path, monkeypatch, no_pause):
  directory = tmp_path / "checkpoints"
  _three_steps(directory)
  ckpt = checkpointing.TrainCheckpointer(directory, keep=3)
  _failing_reads(monkeypatch, {3}, 1,
                 FileNotFoundError(errno.ENOENT, "gone"))
  assert ckpt.restore_latest(_abstract(), None)[0] == 3
  assert not (tmp_path / checkpointing.DAMAGED_DIR).exists()
  ckpt.close()
