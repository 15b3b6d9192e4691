"""One of two processes restoring a shared checkpoint directory, run by
tests/test_checkpoint_multiprocess.py (issue 36.3).

    python -m tests.checkpoint_two_processes PORT PROCESS_ID WORKDIR

Both save steps 1-3 of a state sharded over the 4-device global mesh, then
restore it twice, with faults only process 1 sees:
  * "transient": its first read of step 3 fails with EIO;
  * "damage": every read of step 3 fails as a truncated file would.
Each process writes what it restored to WORKDIR/result_<id>.json.
"""

import errno
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from brorl_jax import checkpointing
from brorl_jax.rl.train_state import TrainState


def _state(value, sharding):
  params = {"w": jnp.full((8, 4), value, jnp.float32)}
  state = TrainState.create(params, optax.sgd(0.1), with_reference=False)
  state = state.replace(step=jnp.int32(value))
  return jax.tree.map(lambda x: jax.device_put(
      x, sharding if x.ndim == 2 else jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec())), state)


def _faults(kind):
  """Process 1's reads of step 3 fail: the first one (transient) or all."""
  handler = ocp.CompositeCheckpointHandler
  restore, calls = handler.restore, [0]

  def faulty(self, directory, *args, **kwargs):
    if jax.process_index() == 1 and pathlib.Path(directory).name == "3":
      calls[0] += 1
      if kind == "damage":  # what tensorstore raises for a truncated chunk
        raise ValueError("DATA_LOSS: Error reading chunk: truncated")
      if calls[0] == 1:
        raise OSError(errno.EIO, "Input/output error")
    return restore(self, directory, *args, **kwargs)
  handler.restore = faulty
  return lambda: setattr(handler, "restore", restore)


def main(port, process_id, workdir):
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(process_id),
                             initialization_timeout=120)
  checkpointing.RETRY_DELAYS_S = (0.1,)
  mesh = jax.make_mesh((4,), ("data",))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data"))
  workdir = pathlib.Path(workdir)
  directory = workdir / "checkpoints"
  ckpt = checkpointing.TrainCheckpointer(directory, keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(float(step), sharding), None, {"step": step})
  ckpt.close()
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      _state(0.0, sharding))
  result = {}
  for kind in ("transient", "damage"):
    ckpt = checkpointing.TrainCheckpointer(directory, keep=3)
    undo = _faults(kind)
    step, state, _ = ckpt.restore_latest(abstract, None)
    undo()
    w = np.asarray(state.params["w"].addressable_data(0))
    result[kind] = {"step": step, "w": float(w.flat[0]),
                    "steps_left": ckpt.all_steps(),
                    "damaged": sorted(p.name for p in (
                        workdir / checkpointing.DAMAGED_DIR).glob("*"))}
    ckpt.close()
  (workdir / f"result_{process_id}.json").write_text(json.dumps(result))


if __name__ == "__main__":
  main(*sys.argv[1:4])
