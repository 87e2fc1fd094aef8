"""Training on several real processes (2 x 4 simulated CPU devices).

Each test starts `codeclm.main` as separate processes joined by
jax.distributed on localhost, as a two-host launch would; they are slow on a
small CPU machine (each process compiles the step), hence marked.
"""

import glob
import os
import re
import shutil
import signal

import pytest

from codeclm.data import prepare
from tests import multihost
from tests import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data"))
  prepare.run(tiny_config.get_config(), path, progress=False)
  return path


@pytest.fixture(scope="module")
def preempted(data_dir, tmp_path_factory):
  """A 2-process run (a checkpoint every step) that SIGTERM stopped.

  Only process 1 gets the signal. Returns (workdir, exit codes, logs).
  """
  workdir = tmp_path_factory.mktemp("preempted")
  procs = multihost.start(2, workdir, [
      f"--config.data.dir={data_dir}", "--config.train.steps=100000",
      "--config.train.ckpt_every=1", "--config.train.keep_last=100",
      "--config.train.log_every=1"])
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


def test_damage_seen_by_one_process_resumes_all_from_the_same_step(
    data_dir, preempted, tmp_path):
  """Process 1's iterator state of the newest step is gone: process 0 could
  restore that step, process 1 cannot; both must resume from the one before
  (one hanging in a collective the other skipped is the failure)."""
  workdir = tmp_path / "work"
  shutil.copytree(preempted[0], workdir)
  newest = max(int(s) for s in os.listdir(workdir / "checkpoints"))
  for path in glob.glob(str(workdir / "checkpoints" / str(newest) / "data" /
                            "process_1-of-2*")):
    os.remove(path)
  texts = multihost.run(2, workdir, [
      f"--config.data.dir={data_dir}", f"--config.train.steps={newest + 1}",
      "--config.train.ckpt_every=1", "--config.train.keep_last=100",
      "--config.train.restore_retry_s=0.1"], timeout=400)
  for text in texts:
    assert f"Resuming from step {newest - 1}." in text, text[-3000:]
  assert os.listdir(workdir / "damaged_checkpoints") == [str(newest)]
  assert max(int(s) for s in os.listdir(workdir / "checkpoints")) == newest + 1
