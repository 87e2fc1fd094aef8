"""Training on several real processes (simulated CPU devices per process).

Each launch starts `codeclm.main` as separate processes joined by
jax.distributed on localhost, as a two-host launch would; they are slow on a
small CPU machine (each process compiles the step), hence marked. One chain
of runs serves every test, each run a change of topology:

  2 processes x 1 device, mesh (1, 1, 2): the tensor axis spans the
    processes, so both feed all 8 rows; SIGTERM to one stops both (steps 1-N)
  -> this process, 8 devices, data parallel: resumes step 2, runs 3-4
  -> 2 processes x 4 devices, data parallel, process 1's data position of
     step 4 damaged: both resume step 3, run 4-5

Each resumed run's first loss (computed before its update, so the length of
the schedule does not enter) must equal the loss of the run it continues.
"""

import logging
import os
import re
import shutil
import signal

import numpy as np
import pytest

from codeclm import train
from tests import multihost
from tests import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def preempted(data_dir, tmp_path_factory):
  """A 2-process run (a checkpoint every step) that SIGTERM stopped.

  One device per process and mesh (1, 1, 2): the tensor axis spans both
  processes. Only process 1 gets the signal. Returns (workdir, exit codes,
  logs).
  """
  workdir = tmp_path_factory.mktemp("preempted")
  procs = multihost.start(2, workdir, [
      f"--config.data.dir={data_dir}", "--config.train.steps=100000",
      "--config.train.ckpt_every=1", "--config.train.keep_last=100",
      "--config.train.log_every=1", "--config.mesh.shape=(1,1,2)"],
      devices_per_process=1)
  logs = multihost.Logs(procs)
  try:
    logs.wait_for(0, r"\] \[([3-9]|\d\d+)\] .*loss=", timeout=400)
    procs[1].send_signal(signal.SIGTERM)
    codes = multihost.wait(procs, timeout=120)
  finally:
    multihost.wait(procs, timeout=0)
  return workdir, codes, [logs.text(i) for i in range(2)]


def test_sigterm_to_one_process_saves_the_same_step_everywhere(preempted):
  """Every process saves one agreed step and exits 0 (within 120 s).

  JAX's preemption sync tells every process the same step to save at, so
  none is left waiting in a collective the others never join.
  """
  workdir, codes, texts = preempted
  assert codes == [0, 0], [t[-3000:] for t in texts]
  steps = [re.findall(r"Preempted at step (\d+)", t) for t in texts]
  assert steps[0] and steps[0] == steps[1], steps
  saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
  assert saved == list(range(1, int(steps[0][0]) + 1))


def losses(text: str) -> dict[int, float]:
  """step -> training loss, from the metric lines of a log."""
  return {int(m[1]): float(m[2]) for m in re.finditer(
      r"\[(\d+)\] bits_per_byte=.*?, loss=([-\d.e+]+)", text)}


def keep_steps_up_to(workdir, last: int) -> None:
  for name in os.listdir(workdir / "checkpoints"):
    if int(name) > last:
      shutil.rmtree(workdir / "checkpoints" / name)


class _Capture(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def resumed_on_one(data_dir, preempted, tmp_path_factory):
  """The 2-process run's step 2 resumed here (one process, 8 devices, data
  parallel) to step 4: (workdir, its log)."""
  workdir = tmp_path_factory.mktemp("one") / "work"
  shutil.copytree(preempted[0], workdir)
  keep_steps_up_to(workdir, 2)
  config = tiny_config.get_config()
  config.data.dir = data_dir
  config.train.update(steps=4, ckpt_every=1, keep_last=100, log_every=1)
  root, handler = logging.getLogger(), _Capture()
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    train.train(config, str(workdir))
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
  return workdir, "\n".join(handler.lines)


def test_two_process_tensor_run_resumes_on_one_process(preempted,
                                                       resumed_on_one):
  """Same state, same data: step 3's loss here equals the 2-process run's,
  whose processes both fed all rows (tensor across them) and whose data
  position was written by 2 processes."""
  log = resumed_on_one[1]
  assert "Resuming from step 2." in log
  two, one = losses(preempted[2][0]), losses(log)
  assert sorted(one) == [3, 4]
  np.testing.assert_allclose(one[3], two[3], rtol=2e-5)
  assert abs(two[3] - two[4]) > 1e-3  # Another step's batch would show.


def test_one_process_run_resumes_on_two_and_damage_on_one_moves_both(
    data_dir, resumed_on_one, tmp_path):
  """The 1-process run resumes on 2 processes x 4 devices. Process 1's data
  position of the newest step (4) is gone: process 0 could restore that
  step, process 1 cannot; both must resume from step 3 (one hanging in a
  collective the other skipped is the failure), and step 4's loss equals
  the 1-process run's."""
  workdir = tmp_path / "work"
  shutil.copytree(resumed_on_one[0], workdir)
  # Batch 8, one loader stream per row: process 1 alone reads stream 7.
  os.remove(workdir / "checkpoints" / "4" / "data" / "stream_7-of-8.json")
  texts = multihost.run(2, workdir, [
      f"--config.data.dir={data_dir}", "--config.train.steps=5",
      "--config.train.ckpt_every=1", "--config.train.keep_last=100",
      "--config.train.log_every=1", "--config.train.restore_retry_s=0.1"],
      timeout=400)
  for text in texts:
    assert "Resuming from step 3." in text, text[-3000:]
  assert "4 rows per process" in texts[1], texts[1][-3000:]
  assert os.listdir(workdir / "damaged_checkpoints") == ["4"]
  assert max(int(s) for s in os.listdir(workdir / "checkpoints")) == 5
  two = losses(texts[0])
  assert sorted(two) == [4, 5]
  np.testing.assert_allclose(two[4], losses(resumed_on_one[1])[4], rtol=2e-5)
