"""Starts `codeclm.main` as N real processes joined by jax.distributed.

Each process has its own simulated CPU devices (JAX_NUM_CPU_DEVICES), as a
host with several chips would; a coordinator listens on a free localhost port.
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(n: int, workdir, flags, devices_per_process: int = 4,
          config: str = "tests/tiny_config.py") -> list[subprocess.Popen]:
  """Launches n processes of `codeclm.main` (train, unless `flags` give
  --mode=); stderr is piped."""
  address = f"localhost:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             PYTHONUNBUFFERED="1",
             XLA_FLAGS=("--xla_force_host_platform_device_count="
                        f"{devices_per_process}"))
  procs = []
  for i in range(n):
    cmd = [sys.executable, "-m", "codeclm.main",
           f"--config={os.path.join(ROOT, config)}", f"--workdir={workdir}",
           "--config.distributed.initialize=True",
           f"--config.distributed.coordinator_address={address}",
           f"--config.distributed.num_processes={n}",
           f"--config.distributed.process_id={i}",
           "--config.distributed.timeout_s=120", *flags]
    procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  return procs


class Logs:
  """Reads each process's stderr as it comes (so no pipe fills up)."""

  def __init__(self, procs):
    self.lines = [[] for _ in procs]
    self._threads = [threading.Thread(target=self._read, args=(p, i),
                                      daemon=True)
                     for i, p in enumerate(procs)]
    for t in self._threads:
      t.start()

  def _read(self, proc, i):
    for line in proc.stderr:
      self.lines[i].append(line)

  def wait_for(self, i: int, pattern: str, timeout: float) -> re.Match:
    """The first match of `pattern` in process i's log; raises on timeout."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
      lines = self.lines[i]
      for line in lines[seen:]:
        match = re.search(pattern, line)
        if match:
          return match
      seen = len(lines)
      time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not in process {i}'s log:\n"
                         + "".join(self.lines[i][-40:]))

  def text(self, i: int) -> str:
    for t in self._threads:
      t.join(timeout=5)
    return "".join(self.lines[i])


def wait(procs, timeout: float) -> list[int]:
  """Exit codes; processes still running after `timeout` s are killed."""
  deadline = time.monotonic() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      codes.append(None)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  return codes


def run(n: int, workdir, flags, timeout: int = 600, **kwargs) -> list[str]:
  """Runs n processes to the end; returns their logs; any failure raises."""
  procs = start(n, workdir, flags, **kwargs)
  logs = Logs(procs)
  codes = wait(procs, timeout)
  logs = [logs.text(i) for i in range(n)]
  for i, (code, log) in enumerate(zip(codes, logs)):
    if code != 0:
      raise AssertionError(f"process {i} of {n} exited {code}:\n"
                           + log[-4000:])
  return logs
