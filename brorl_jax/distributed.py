"""Multi-host: `jax.distributed.initialize` from config or environment.

Every host runs the same program (SPMD). `mesh.distributed`:
  * "off": one process;
  * "on": initialize, with `mesh.coordinator_address` / `num_processes` /
    `process_id` when given, else JAX's cluster auto-detection (SLURM, TPU
    pods, Kubernetes, MPI);
  * "auto" (default): initialize when the config names a coordinator or the
    environment is a multi-process launch (JAX_COORDINATOR_ADDRESS, SLURM
    with more than one task, a TPU pod with more than one worker).
The heartbeat timeout bounds how long survivors wait for a dead peer before
they exit with an error instead of hanging: JAX's coordination service
aborts every process once a peer stops sending heartbeats (or at once when
process 0, which hosts the service, dies), even one blocked in a collective.
A process that fails with an exception must therefore stop heartbeating
promptly: `exit_on_error` ends it at once instead of letting the interpreter
wait at JAX's shutdown barrier (`shutdown_timeout`, 5 minutes) while its
peers sit in a collective that will never complete.

Also here: the gathers the loop's logging needs when arrays span processes
(`fetch`, `fetch_rows`, `sum_over_processes`). Each is a collective: every
process calls it, in the same order, whatever it then writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import traceback
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from brorl_jax.config import check, check_choice

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh and multi-host start-up (section `mesh`).

  Attributes:
    shape: sizes of the (data, fsdp, tensor) axes; one -1 takes the rest.
    coordinator_address: "host:port" of process 0 for jax.distributed; None
      auto-detects (SLURM, TPU pods) or runs single-process.
    num_processes / process_id: explicit multi-process settings.
    initialization_timeout_s: how long processes wait for each other.
    heartbeat_timeout_s: after this long without a peer's heartbeat, the
      survivors exit with an error instead of hanging.
    distributed: "auto" (initialize when the environment says so), "on",
      "off".
  """

  shape: tuple[int, ...] = (-1, 1, 1)
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout_s: int = 300
  heartbeat_timeout_s: int = 100
  distributed: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(self.shape))
    check(len(self.shape) == 3, "mesh.shape",
          f"needs 3 sizes (data, fsdp, tensor), got {self.shape}")
    check(all(s == -1 or s >= 1 for s in self.shape), "mesh.shape",
          f"sizes must be >= 1 or -1, got {self.shape}")
    check_choice(self.distributed, "mesh.distributed", ("auto", "on", "off"))
    check(self.heartbeat_timeout_s >= 1, "mesh.heartbeat_timeout_s",
          "must be >= 1")


def _multi_process_environment() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("CLOUD_TPU_TASK_ID")
  return bool(hosts and "," in hosts)


def initialize(cfg: MeshConfig) -> bool:
  """Initializes jax.distributed if configured; returns whether it did."""
  if jax.distributed.is_initialized():
    return True
  wanted = {"on": True, "off": False}.get(
      cfg.distributed, cfg.coordinator_address is not None
      or _multi_process_environment())
  if not wanted:
    return False
  address = cfg.coordinator_address or os.environ.get(
      "JAX_COORDINATOR_ADDRESS")
  num_processes = cfg.num_processes
  process_id = cfg.process_id
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  explicit = None not in (address, num_processes, process_id)
  jax.distributed.initialize(
      coordinator_address=address, num_processes=num_processes,
      process_id=process_id,
      # Explicit settings win: otherwise JAX's SLURM detection would still
      # pin each process to the one local device SLURM_LOCALID (right for
      # one process per GPU, wrong for one process per node or a local
      # launch inside an allocation).
      cluster_detection_method="deactivate" if explicit else None,
      initialization_timeout=cfg.initialization_timeout_s,
      heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return True


@contextlib.contextmanager
def exit_on_error(one_line: tuple[type[BaseException], ...] = ()
                  ) -> Iterator[None]:
  """In a multi-process run, an uncaught exception ends the process at once.

  The traceback is printed (only `error: <message>` for the types in
  `one_line`, whose messages name the cause), then `os._exit(1)`: no
  interpreter shutdown, so no wait at JAX's shutdown barrier. The peers,
  blocked in a collective with this process, are then stopped by the
  coordination service within the heartbeat timeout (at once when this is
  process 0), and every process of the job exits non-zero. Single-process
  runs raise as usual.
  """
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    if isinstance(e, SystemExit) and e.code in (0, None):
      raise
    if not (jax.distributed.is_initialized() and jax.process_count() > 1):
      raise
    status = 1
    if isinstance(e, SystemExit) and isinstance(e.code, int):
      status = e.code  # its message is out already (`cli.fail`)
    elif isinstance(e, SystemExit):
      print(e.code, file=sys.stderr)
    elif isinstance(e, one_line):
      print(f"error: {e}", file=sys.stderr)
    else:
      traceback.print_exc()
    print(f"error: process {jax.process_index()} of {jax.process_count()} "
          "failed (above); exiting now so that the other processes stop "
          "within mesh.heartbeat_timeout_s", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access


# ---- gathers across processes (host side of the loop's logging) ----------


_BLOCK_BYTES = 256 * 2**20


@functools.lru_cache(maxsize=None)
def _block_fn(replicated, rows: int):
  return jax.jit(lambda a, i: jax.lax.dynamic_slice_in_dim(a, i * rows, rows),
                 out_shardings=replicated)


def fetch(x: jax.Array, replicated) -> np.ndarray:
  """A global array's whole value on this host (a collective when the array
  spans processes: every process must call it).

  Arrays spread over processes are replicated in blocks of leading rows, so
  device memory grows by one block (<= 256 MiB), not by the whole array (a
  BroRL step's tokens alone are 4 GiB).
  """
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  n = x.shape[0]
  row_bytes = max(x.nbytes // max(n, 1), 1)
  rows = max(d for d in range(1, n + 1)
             if n % d == 0 and (d == 1 or d * row_bytes <= _BLOCK_BYTES))
  take = _block_fn(replicated, rows)
  return np.concatenate([np.asarray(take(x, i).addressable_data(0))
                         for i in range(n // rows)])


@functools.lru_cache(maxsize=None)
def _rows_fn(replicated):
  return jax.jit(lambda t, n, r: (t.reshape(-1, t.shape[-1])[r],
                                  n.reshape(-1)[r]),
                 out_shardings=(replicated, replicated))


def fetch_rows(tokens: jax.Array, lengths: jax.Array, rows: np.ndarray,
                replicated) -> tuple[np.ndarray, np.ndarray]:
  """Rollout rows `rows` (flat p * G + g) of [P, G, T] tokens and [P, G]
  lengths, on this host (a collective)."""
  tok, lens = _rows_fn(replicated)(tokens, lengths, jnp.asarray(rows))
  return (np.asarray(tok.addressable_data(0)),
          np.asarray(lens.addressable_data(0)))


def sum_over_processes(values: dict[str, float], keys) -> dict[str, float]:
  """Per-process counters summed over processes (absent keys count 0; a
  collective: every process must call it with the same keys)."""
  if jax.process_count() == 1:
    return values
  local = np.array([float(values.get(k, 0.0)) for k in keys], np.float32)
  total = np.asarray(multihost_utils.process_allgather(local)).sum(0)
  return {**values, **{k: (int(round(t)) if isinstance(values.get(k, 0), int)
                           else t) for k, t in zip(keys, total.tolist())}}


def barrier(name: str) -> None:
  """Every process waits here for the others (a no-op on one process):
  one writes a file, the others read it after."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
