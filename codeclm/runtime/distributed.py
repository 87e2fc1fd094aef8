"""Multi-host start: one call to jax.distributed.initialize, in the main process.

Grain worker processes and prepare's encoder pool never call this: only
`codeclm.main` does, before anything touches a device.
"""

import importlib.util
import itertools
import os
from typing import Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


# A process late to its first collective on the CPU backend (gloo) gets 30 s;
# host work before an agreement point (store reads, one process's slice of
# eval) can differ by more under load, so those points first meet at a
# barrier of the coordination service, which waits this long.
AGREE_TIMEOUT_S = 1800
_BARRIER_IDS = itertools.count()  # The same sequence on every process.


def arrive_together(name: str, timeout_s: int = AGREE_TIMEOUT_S) -> None:
  """Blocks until every process reaches this point (no-op in one process).

  Call it before a collective that follows host work of uneven length, so
  the collective starts everywhere within moments. Like a collective, every
  process must make the same calls in the same order.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  multihost.get_barrier_sync_fn()(
      key=f"codeclm/{name}/{next(_BARRIER_IDS)}", timeout_ms=timeout_s * 1000)


def gather_ints(values: Sequence[int]) -> np.ndarray:
  """int32 [processes, len(values)]: every process's values (collective
  under jax.distributed, after `arrive_together`; no communication in a
  single process)."""
  values = np.asarray(values, np.int32)[None]
  if jax.process_count() == 1:
    return values
  arrive_together("gather_ints")
  return np.asarray(multihost_utils.process_allgather(values, tiled=True))


def skip_absent_tpu() -> None:
  """CPU only when libtpu is installed but no TPU (nor GPU) is on this host.

  With the [tpu] extra installed, JAX otherwise loads libtpu and tries a TPU
  client on every start: ~3 s and a screen of warnings before it falls back
  to the CPU. A platform chosen by the user (JAX_PLATFORMS) is kept. Call it
  before anything touches a device.
  """
  if jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None:
    return
  from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
  if (hardware_utils.num_available_tpu_chips_and_device_id()[0]
      or hardware_utils.has_visible_nvidia_gpu()
      or hardware_utils.num_available_amd_gpus(stop_at=1)):
    return
  jax.config.update("jax_platforms", "cpu")


def initialize(cfg) -> None:
  """Joins the cluster when cfg.initialize, then checks the process count.

  A host that never arrives makes initialize time out after cfg.timeout_s with
  JAX's error instead of hanging; a cluster of the wrong size fails here.

  Unset fields (coordinator_address "", num_processes 0, process_id -1) are
  auto-detected by JAX (TPU metadata, SLURM, Open MPI, ...). Where no cluster
  JAX knows gives them, the environment can: JAX itself reads
  JAX_COORDINATOR_ADDRESS, and codeclm reads CODECLM_NUM_PROCESSES and
  CODECLM_PROCESS_ID (a config field that is set wins). The tests' simulated
  TPU pod (tests/fake_cluster/gcloud) starts its workers this way.
  """
  if not cfg.initialize:
    return
  if jax.distributed.is_initialized():
    return
  num_processes = cfg.num_processes or int(
      os.environ.get("CODECLM_NUM_PROCESSES") or 0)
  process_id = cfg.process_id if cfg.process_id >= 0 else int(
      os.environ.get("CODECLM_PROCESS_ID") or -1)
  logging.info(
      "Joining the cluster (coordinator %s, %s processes, this one %s); a "
      "host that does not arrive within config.distributed.timeout_s=%ss "
      "makes every process abort with DEADLINE_EXCEEDED.",
      cfg.coordinator_address or "auto", num_processes or "auto",
      "auto" if process_id < 0 else process_id, cfg.timeout_s)
  jax.distributed.initialize(
      coordinator_address=cfg.coordinator_address or None,
      num_processes=num_processes or None,
      process_id=None if process_id < 0 else process_id,
      initialization_timeout=cfg.timeout_s,
  )
  if num_processes and jax.process_count() != num_processes:
    raise RuntimeError(
        f"Expected {num_processes} processes (config.distributed."
        f"num_processes or CODECLM_NUM_PROCESSES) but the cluster has "
        f"{jax.process_count()}; check the launcher's host list.")
  logging.info("Process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
