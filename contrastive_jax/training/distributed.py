"""Multi-host start-up: ``jax.distributed.initialize`` when asked to.

``config.distributed.mode``:
  * ``"auto"`` (default): initialise when the environment names a cluster
    (SLURM, Open MPI, a TPU pod, or ``JAX_COORDINATOR_ADDRESS``), or when a
    coordinator address is configured; otherwise run single-process.
  * ``"on"``: always call ``jax.distributed.initialize`` (JAX auto-detects).
  * ``"off"``: never.

With ``coordinator_address`` / ``num_processes`` / ``process_id`` set (e.g.
two local processes on ``127.0.0.1``), they are passed explicitly.
Must run before anything touches a JAX backend.
"""

from __future__ import annotations

import os

import jax
from absl import logging

__all__ = ["maybe_initialize", "cluster_in_environment"]

_ENV_MARKERS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS",
                "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def cluster_in_environment() -> bool:
  if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
    return False  # a single-task SLURM job is just one process
  if "TPU_WORKER_HOSTNAMES" in os.environ:
    return len(os.environ["TPU_WORKER_HOSTNAMES"].split(",")) > 1
  return any(m in os.environ for m in _ENV_MARKERS)


_INITIALISED = False


def maybe_initialize(dist_config) -> bool:
  """Initialises the JAX distributed runtime if configured; True if it did."""
  global _INITIALISED
  if _INITIALISED:
    return True
  mode = dist_config.get("mode", "auto") if dist_config else "auto"
  address = (dist_config.get("coordinator_address", "") if dist_config else "")
  if mode == "off" or (mode == "auto" and not address
                       and not cluster_in_environment()):
    return False
  kwargs = {}
  if address:
    kwargs = dict(coordinator_address=address,
                  num_processes=int(dist_config.num_processes),
                  process_id=int(dist_config.process_id))
  local = str(dist_config.get("local_device_ids", "") or "")
  if local:
    kwargs["local_device_ids"] = [int(i) for i in local.split(",")]
  jax.distributed.initialize(**kwargs)
  _INITIALISED = True
  logging.info("jax.distributed initialised: process %d of %d, %d devices.",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True
