"""What tests/fake_cluster/gcloud and srun share: start one local process
per simulated host and wait for them, as the real tools wait for theirs.

Each simulated host is a process on this machine with its own CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=FAKE_CLUSTER_DEVICES, 4 by
default, JAX_PLATFORMS=cpu). Test knobs, read from the caller's environment:

  FAKE_CLUSTER_DEVICES   CPU devices per host (default 4).
  FAKE_CLUSTER_PATH_<i>  directories put first on PATH on host i only: a host
                         whose `python3` is another one (a missing venv).
  FAKE_CLUSTER_LOG       a file that gets one JSON line per call (argv and
                         each host's command), so a test can tell what ran.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def host_env(base: dict, index: int) -> dict:
  """`base` plus what every simulated host has: CPU devices, its PATH."""
  env = dict(base)
  devices = int(os.environ.get("FAKE_CLUSTER_DEVICES", "4"))
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(
      flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  extra = os.environ.get(f"FAKE_CLUSTER_PATH_{index}")
  if extra:
    env["PATH"] = extra + os.pathsep + env.get("PATH", "")
  return env


def log_call(tool: str, argv, commands) -> None:
  path = os.environ.get("FAKE_CLUSTER_LOG")
  if path:
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps(dict(tool=tool, argv=list(argv),
                              hosts=[list(c) for c in commands])) + "\n")


def run(tool: str, commands, envs, cwd=None, kill_on_bad_exit=False,
        name=lambda i: f"host {i}") -> int:
  """Runs commands[i] with envs[i], all at once; their output goes straight
  to ours. Returns 0 if every one exits 0, else the first failure's code
  (after a message naming each failed host). With kill_on_bad_exit the others
  are killed once one fails (srun --kill-on-bad-exit=1); else they are waited
  for, as gcloud does. A signal to this process is passed on to them."""
  procs = [subprocess.Popen(c, env=e, cwd=cwd) for c, e in zip(commands, envs)]

  def forward(signum, _):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)

  codes = [None] * len(procs)
  pending = set(range(len(procs)))
  killed = False
  while pending:
    pid, status = os.wait()
    for i in list(pending):
      if procs[i].pid == pid:
        procs[i].returncode = codes[i] = os.waitstatus_to_exitcode(status)
        pending.discard(i)
        if codes[i] != 0 and kill_on_bad_exit and not killed:
          killed = True
          for j in pending:
            procs[j].kill()
  failed = [i for i, c in enumerate(codes) if c != 0]
  for i in failed:
    print(f"{tool}: {name(i)} exited with return code {codes[i]}.",
          file=sys.stderr, flush=True)
  return (codes[failed[0]] if codes[failed[0]] > 0 else 1) if failed else 0
