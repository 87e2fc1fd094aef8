"""When to save and stop on a preemption notice (SIGTERM), the same on every host.

On several processes the decision must be collective: a host that saves and
leaves alone strands its peers in the next step's collectives. There
`jax.distributed.initialize` has already installed JAX's preemption notifier
(a native SIGTERM handler) and its sync manager, which agree on one step for
all processes (the largest step any process has reached, plus one); this
module asks it every step and leaves its handler alone. A single process
without jax.distributed has no such service: there a Python handler records
the signal and the previous handler is put back on close.
"""

import signal

from absl import logging
import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """`reached(step)`: save at this step and stop; call it at every step."""

  def __init__(self):
    self._collective = jax.distributed.is_initialized()
    self._signalled = False
    self._previous = None
    if not self._collective:
      self._previous = signal.signal(signal.SIGTERM, self._record)

  def _record(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM: saving at the end of this step, then exiting.")
    self._signalled = True

  def reached(self, step: int) -> bool:
    if self._collective:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled

  def close(self) -> None:
    """Puts back the handler this replaced (none on several processes)."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
