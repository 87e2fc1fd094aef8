"""Multi-host start: one call to jax.distributed.initialize, in the main process.

Grain worker processes and prepare's encoder pool never call this: only
`codeclm.main` does, before anything touches a device.
"""

from absl import logging
import jax


def initialize(cfg) -> None:
  """Joins the cluster when cfg.initialize, then checks the process count.

  A host that never arrives makes initialize time out after cfg.timeout_s with
  JAX's error instead of hanging; a cluster of the wrong size fails here.
  """
  if not cfg.initialize:
    return
  if jax.distributed.is_initialized():
    return
  logging.info(
      "Joining the cluster (coordinator %s, %s processes, this one %s); a "
      "host that does not arrive within config.distributed.timeout_s=%ss "
      "makes every process abort with DEADLINE_EXCEEDED.",
      cfg.coordinator_address or "auto", cfg.num_processes or "auto",
      "auto" if cfg.process_id < 0 else cfg.process_id, cfg.timeout_s)
  jax.distributed.initialize(
      coordinator_address=cfg.coordinator_address or None,
      num_processes=cfg.num_processes or None,
      process_id=None if cfg.process_id < 0 else cfg.process_id,
      initialization_timeout=cfg.timeout_s,
  )
  if cfg.num_processes and jax.process_count() != cfg.num_processes:
    raise RuntimeError(
        f"Expected {cfg.num_processes} processes (config.distributed."
        f"num_processes) but the cluster has {jax.process_count()}; check the "
        "launcher's host list.")
  logging.info("Process %d of %d, %d local / %d global devices.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
