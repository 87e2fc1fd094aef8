"""Multi-host start with real processes: codeclm.runtime.distributed.initialize.

Each test starts fresh Python processes on this machine (a coordinator on a
free localhost port), as a two-host launch would.
"""

import os
import subprocess
import sys
import time

from tests import multihost

_DRIVER = """
import sys
from absl import logging
import ml_collections
from codeclm.runtime import distributed
logging.set_verbosity(logging.INFO)
address, n, i, timeout = sys.argv[1:]
cfg = ml_collections.ConfigDict(dict(
    initialize=True, coordinator_address=address, num_processes=int(n),
    process_id=int(i), timeout_s=int(timeout)))
distributed.initialize(cfg)
distributed.initialize(cfg)  # A second call is a no-op, not an error.
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
ids = multihost_utils.process_allgather(jnp.int32(jax.process_index()))
print("JOINED", jax.process_index(), jax.process_count(), list(map(int, ids)),
      flush=True)
"""


def _start(address: str, n: int, i: int, timeout_s: int) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONUNBUFFERED="1")
  return subprocess.Popen(
      [sys.executable, "-c", _DRIVER, address, str(n), str(i), str(timeout_s)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_processes_join_and_communicate():
  address = f"localhost:{multihost.free_port()}"
  procs = [_start(address, 2, i, 60) for i in range(2)]
  outs = [p.communicate(timeout=120)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out
    assert f"JOINED {i} 2 [0, 1]" in out, out


def test_missing_host_fails_loudly_within_the_timeout():
  address = f"localhost:{multihost.free_port()}"
  start = time.monotonic()
  proc = _start(address, 2, 0, 5)  # Process 1 never arrives.
  out = proc.communicate(timeout=120)[0]
  elapsed = time.monotonic() - start
  assert proc.returncode != 0, out
  assert "JOINED" not in out
  assert "DEADLINE_EXCEEDED" in out, out[-2000:]
  assert "timeout_s=5" in out  # Our log line says which knob to turn.
  assert elapsed < 90, elapsed


_LATE = """
import sys, time
import ml_collections
from codeclm.runtime import distributed
address, i, late_s = sys.argv[1:]
distributed.initialize(ml_collections.ConfigDict(dict(
    initialize=True, coordinator_address=address, num_processes=2,
    process_id=int(i), timeout_s=60)))
if int(i) == 1:
  time.sleep(float(late_s))  # Host work of uneven length (a slow store read).
print("AGREED", distributed.gather_ints([int(i)]).ravel().tolist(), flush=True)
"""


def test_a_process_late_to_an_agreement_point_is_waited_for():
  """XLA's CPU collectives give a process late to its first collective 30 s;
  agreement points wait at a coordination-service barrier first, so a
  process 40 s late still agrees (eval's first gather failed this way)."""
  address = f"localhost:{multihost.free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             PYTHONUNBUFFERED="1")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen(
      [sys.executable, "-c", _LATE, address, str(i), "40"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
      cwd=root) for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    assert "AGREED [0, 1]" in out, out[-3000:]
