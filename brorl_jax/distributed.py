"""Multi-host start-up: `jax.distributed.initialize` from config or environment.

Every host runs the same program (SPMD). `mesh.distributed`:
  * "off": one process;
  * "on": initialize, with `mesh.coordinator_address` / `num_processes` /
    `process_id` when given, else JAX's cluster auto-detection (SLURM, TPU
    pods, Kubernetes, MPI);
  * "auto" (default): initialize when the config names a coordinator or the
    environment is a multi-process launch (JAX_COORDINATOR_ADDRESS, SLURM
    with more than one task, a TPU pod with more than one worker).
The heartbeat timeout bounds how long survivors wait for a dead peer before
they exit with an error instead of hanging.
"""

from __future__ import annotations

import logging
import os

import jax

from brorl_jax.config import MeshConfig

log = logging.getLogger(__name__)


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
  jax.distributed.initialize(
      coordinator_address=address, num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=cfg.initialization_timeout_s,
      heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return True
