"""Training on several real processes (simulated CPU devices per process).

Each launch starts `codeclm.main` as separate processes joined by
jax.distributed on localhost, as a multi-host launch would; they are slow on
a small CPU machine (each process compiles the step), hence marked. One chain
of runs serves every test, each run a change of topology (1 -> 2 -> 4 -> 2
-> 1 processes):

  this process, 8 devices, data parallel: steps 1-3
  -> 2 processes x 1 device, mesh (1, 1, 1, 2): the tensor axis spans the
     processes, so both feed all 8 rows; resume step 2, run 3-N until
     SIGTERM to one stops both
  -> 4 processes x 2 devices, data parallel: resume step 3, run 4-5
  -> 2 processes x 4 devices, process 1's data position of step 5 damaged:
     both resume step 4, run 5-6
  -> this process again: resumes step 5, runs 6

Each resumed run's first loss (computed before its update, so the length of
the schedule does not enter) must equal the loss of the run it continues:
the same state and the same batch. The batch is a function of the step over
one global record order that `data.streams` loader streams read
(codeclm/data/loader.py), so this checks that the data position the step
implies survived each change of process count.
"""

import logging
import os
import re
import shutil
import signal

import numpy as np
import pytest

from codeclm.train import loop
from tests import multihost
from tests import tiny_config

pytestmark = pytest.mark.slow

_EVERY_STEP = ["--config.train.ckpt_every=1", "--config.train.keep_last=100",
               "--config.train.log_every=1"]


def losses(text: str) -> dict[int, float]:
  """step -> training loss, from the metric lines of a log."""
  return {int(m[1]): float(m[2]) for m in re.finditer(
      r"\[(\d+)\] bits_per_byte=.*?, loss=([-\d.e+]+)", text)}


def copy_up_to(workdir, last: int, to):
  """A copy of `workdir` without the checkpoints after step `last`."""
  shutil.copytree(workdir, to)
  for name in os.listdir(to / "checkpoints"):
    if int(name) > last:
      shutil.rmtree(to / "checkpoints" / name)
  return to


class _Capture(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def train_here(data_dir, workdir, steps: int) -> str:
  """Trains the tiny config to `steps` in this process (8 devices, data
  parallel), a checkpoint every step; returns its log."""
  config = tiny_config.get_config()
  config.data.dir = data_dir
  config.train.update(steps=steps, ckpt_every=1, keep_last=100, log_every=1)
  root, handler = logging.getLogger(), _Capture()
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    loop.train(config, str(workdir))
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
  return "\n".join(handler.lines)


@pytest.fixture(scope="module")
def started_here(data_dir, tmp_path_factory):
  """Steps 1-3 in this process: (workdir, its log)."""
  workdir = tmp_path_factory.mktemp("one") / "work"
  return workdir, train_here(data_dir, workdir, steps=3)


@pytest.fixture(scope="module")
def preempted(data_dir, started_here, tmp_path_factory):
  """Step 2 of `started_here` resumed on 2 processes until SIGTERM.

  One device per process and mesh (1, 1, 1, 2): the tensor axis spans both
  processes. Only process 1 gets the signal, once step 4 is logged. Returns
  (workdir, exit codes, logs).
  """
  workdir = copy_up_to(started_here[0], 2,
                       tmp_path_factory.mktemp("preempted") / "work")
  procs = multihost.start(2, workdir, [
      f"--config.data.dir={data_dir}", "--config.train.steps=100000",
      "--config.mesh.shape=(1,1,1,2)", *_EVERY_STEP], devices_per_process=1)
  logs = multihost.Logs(procs)
  try:
    logs.wait_for(0, r"\] \[([4-9]|\d\d+)\] .*loss=", timeout=400)
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


def test_one_process_run_resumes_on_two_with_tensor_across_them(
    started_here, preempted):
  """Same state, same data: step 3's loss on 2 processes, which both feed
  all rows (tensor across them), equals the 1-process run's."""
  for text in preempted[2]:
    assert "Resuming from step 2." in text, text[-3000:]
  one, two = losses(started_here[1]), losses(preempted[2][0])
  assert sorted(one) == [1, 2, 3] and min(two) == 3
  np.testing.assert_allclose(two[3], one[3], rtol=2e-5)
  assert abs(two[3] - two[4]) > 1e-3  # Another step's batch would show.


@pytest.fixture(scope="module")
def resumed_on_four(data_dir, preempted, tmp_path_factory):
  """Step 3 of the 2-process run resumed on 4 processes x 2 devices to step
  5: (workdir, logs)."""
  workdir = copy_up_to(preempted[0], 3,
                       tmp_path_factory.mktemp("four") / "work")
  texts = multihost.run(4, workdir, [
      f"--config.data.dir={data_dir}", "--config.train.steps=5",
      *_EVERY_STEP], timeout=400, devices_per_process=2)
  return workdir, texts


def test_two_process_run_resumes_on_four(preempted, resumed_on_four):
  """Data positions written by 2 processes are read by 4, each reading 2 of
  the 8 loader streams: step 4's loss equals the 2-process run's."""
  texts = resumed_on_four[1]
  for text in texts:
    assert "Resuming from step 3." in text, text[-3000:]
  assert "2 rows per process" in texts[3], texts[3][-3000:]
  two, four = losses(preempted[2][0]), losses(texts[0])
  assert sorted(four) == [4, 5]
  np.testing.assert_allclose(four[4], two[4], rtol=2e-5)


@pytest.fixture(scope="module")
def resumed_on_two(data_dir, resumed_on_four, tmp_path_factory):
  """The 4-process run resumed on 2 processes x 4 devices to step 6, with
  process 1's data position of step 5 removed first: (workdir, logs)."""
  workdir = copy_up_to(resumed_on_four[0], 5,
                       tmp_path_factory.mktemp("two") / "work")
  # Batch 8, one loader stream per row: process 1 alone reads stream 7.
  os.remove(workdir / "checkpoints" / "5" / "data" / "stream_7-of-8.json")
  texts = multihost.run(2, workdir, [
      f"--config.data.dir={data_dir}", "--config.train.steps=6",
      "--config.train.restore_retry_s=0.1", *_EVERY_STEP], timeout=400)
  return workdir, texts


def test_four_process_run_resumes_on_two_and_damage_on_one_moves_both(
    resumed_on_four, resumed_on_two):
  """Process 1's data position of the newest step (5) is gone: process 0
  could restore that step, process 1 cannot; both must resume from step 4
  (one hanging in a collective the other skipped is the failure), and step
  5's loss equals the 4-process run's."""
  workdir, texts = resumed_on_two
  for text in texts:
    assert "Resuming from step 4." in text, text[-3000:]
  assert "4 rows per process" in texts[1], texts[1][-3000:]
  assert os.listdir(workdir / "damaged_checkpoints") == ["5"]
  assert max(int(s) for s in os.listdir(workdir / "checkpoints")) == 6
  four, two = losses(resumed_on_four[1][0]), losses(texts[0])
  assert sorted(two) == [5, 6]
  np.testing.assert_allclose(two[5], four[5], rtol=2e-5)
  assert abs(four[4] - four[5]) > 1e-3  # Another step's batch would show.


def test_two_process_run_resumes_here(data_dir, resumed_on_two, tmp_path):
  """Data positions written by 2 processes are read by one: step 6's loss
  here equals the 2-process run's."""
  workdir = copy_up_to(resumed_on_two[0], 5, tmp_path / "work")
  log = train_here(data_dir, workdir, steps=6)
  assert "Resuming from step 5." in log
  two, one = losses(resumed_on_two[1][0]), losses(log)
  assert sorted(one) == [6]
  np.testing.assert_allclose(one[6], two[6], rtol=2e-5)
  assert abs(two[5] - two[6]) > 1e-3  # Another step's batch would show.
