"""Training on gs:// survives an object store that fails, and fails loudly
when the store fails for good.

Every request of both gs:// clients (gcsfs: codeclm's paths and Orbax's
metadata; TensorStore: Orbax's arrays) goes through tests/fault_proxy.py in
front of the GCS emulator, which answers some with 503 or 429, resets some
connections, slows some, and shuts the store for a few seconds during a
checkpoint save (benchmarks/store_faults.py runs the 30 s outage). The
reference is the same two commands (train 4 steps, then resume to 8) on a
local disk with no proxy: every loss in the run's TensorBoard event files must
be bit-identical to it. A save that the store refuses for good must stop the
run at once with the error, and its step must never be resumed from.
"""

import logging
import math
import os
import re
import subprocess
import sys

from etils import epath
import jax
import numpy as np
import pytest

from codeclm.data import loader
from codeclm.tokenizer import ByteBPE
from codeclm.train import checkpoint
from codeclm.train import checkpoint_steps
from codeclm.train import loop
from tests import fault_proxy
from tests import tiny_config
from tests.test_train import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two phases: 4 steps, then resumed to 8 (a checkpoint every 2 steps).
PHASES = (4, 8)
# Each kind of fault on 2% of requests, at most twice a run: each one costs
# the client a retry pause of a second or two. (A run makes 250-350.)
RANDOM_FAULTS = dict(p503=0.02, p429=0.02, reset=0.02, slow=0.02, slow_s=0.3,
                     max_per_kind=2)


def flags(steps: int) -> tuple:
  return (f"--config.train.steps={steps}", "--config.train.ckpt_every=2",
          "--config.train.keep_last=10", "--config.model.dtype=float32",
          "--config.train.restore_retry_s=0.5")


def run_main(workdir, data_dir, steps, env, timeout=240):
  cmd = [sys.executable, "-m", "codeclm.main",
         f"--config={ROOT}/tests/tiny_config.py", f"--workdir={workdir}",
         f"--config.data.dir={data_dir}", *flags(steps)]
  env = dict(os.environ, PYTHONPATH=ROOT, **env)
  env.pop("EPATH_USE_TF", None)
  return subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """Losses of the two phases on a local disk, no proxy: {step: loss}.

  In this process (as test_launch's direct run): the same 8 devices and
  program as `python -m codeclm.main`, without two more interpreters."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  for steps in PHASES:
    c = tiny_config.get_config()
    c.data.dir = data_dir
    c.model.dtype = "float32"
    c.train.update(steps=steps, ckpt_every=2, keep_last=10)
    loop.train(c, workdir)
  losses = read_scalars(workdir, "loss")
  assert sorted(losses) == list(range(1, PHASES[-1] + 1))
  return losses


@pytest.fixture(scope="module")
def proxy(gcs):
  p = fault_proxy.FaultProxy(gcs["STORAGE_EMULATOR_HOST"],
                             fault_proxy.Faults(seed=0)).start()
  yield p
  p.stop()


def through(proxy):
  """The environment that sends both clients through the proxy."""
  return dict(STORAGE_EMULATOR_HOST=proxy.url,
              TENSORSTORE_GCS_HTTP_URL=proxy.url)


def losses_in(workdir, tmp_path) -> dict[int, list[float]]:
  """step -> every loss logged for it, from the run's event files in the
  bucket (a step logged by two runs appears twice)."""
  found = {}
  for i, path in enumerate(sorted(epath.Path(workdir).glob(
      "events.out.tfevents*"))):
    local = tmp_path / f"run{i}"
    local.mkdir()
    (local / path.name).write_bytes(path.read_bytes())
    for step, loss in read_scalars(str(local), "loss").items():
      found.setdefault(step, []).append(loss)
  return found


@pytest.fixture(scope="module")
def chain(proxy, data_dir, gcs):
  """One workdir, two runs, each through random faults:
    1. steps 1-4; a 3 s outage starts with the first request of step 2's
       save (every request reset while it lasts);
    2. resumed to 8; from the first write of step 6's arrays the store
       refuses (403) every array write of that step, for good.
  Returns (workdir, [results], [counts])."""
  del gcs  # The emulator behind the proxy.
  workdir = f"gs://test-bucket/faults-{os.getpid()}/run"
  refused = r"/run/checkpoints/6/state/.*/d/"
  schedule = [
      (PHASES[0], dict(outage_on=r"/run/checkpoints/2/", outage_s=3.0)),
      (PHASES[1], dict(outage_on=refused, outage_scope=refused,
                       outage_s=math.inf, outage_status=403))]
  results, counts = [], []
  for i, (steps, outage) in enumerate(schedule):
    proxy.set_faults(fault_proxy.Faults(seed=i, **RANDOM_FAULTS, **outage))
    results.append(run_main(workdir, data_dir, steps, through(proxy)))
    counts.append(proxy.counts())
  proxy.set_faults(fault_proxy.Faults())
  return workdir, results, counts


def test_faults_are_survived_with_every_loss_bit_identical(
    chain, reference, gcs_env, tmp_path):
  """Run 1 completes, run 2 resumes from its last step through faults, and
  every loss either logged equals the reference's."""
  del gcs_env  # This process reads the bucket.
  workdir, results, counts = chain
  assert results[0].returncode == 0, results[0].stderr[-5000:]
  assert "Resuming from step 4." in results[1].stderr, (
      results[1].stderr[-5000:])
  # Every kind of fault was injected, and the outage covered step 2's save.
  total = {k: sum(c.get(k, 0) for c in counts) for k in (
      "503", "429", "reset", "slow", "outage")}
  assert all(total.values()), counts
  assert counts[0]["outage"] and counts[0]["outage_seconds"] >= 3.0, counts
  logged = losses_in(workdir, tmp_path)
  assert sorted(logged) == sorted(reference), logged
  for step, values in logged.items():
    np.testing.assert_array_equal(values, [reference[step]] * len(values),
                                  err_msg=f"step {step}")


def test_a_save_that_fails_for_good_fails_the_run_loudly(chain):
  _, results, counts = chain
  failed = results[1]
  assert counts[1].get("outage"), counts
  assert failed.returncode == 1, failed.stderr[-5000:]
  assert re.search(r"CheckpointSaveError: Saving checkpoint step 6 to "
                   r"gs://\S+/checkpoints failed \(.*PERMISSION_DENIED",
                   failed.stderr), failed.stderr[-5000:]


def test_the_step_a_failed_save_was_writing_is_never_taken_for_good(
    chain, data_dir, gcs_env, caplog):
  """Step 6 was half written: resume skips it for step 4 and sets it aside."""
  del gcs_env  # This process reads the bucket, without faults.
  workdir, _, _ = chain
  assert checkpoint_steps.committed_steps(workdir) == [2, 4]
  c = tiny_config.get_config()
  c.data.dir = data_dir
  c.model.dtype = "float32"
  c.mesh.shape = (1, 1, 1, 1)
  setup, batches = restore_target(c, data_dir)
  ckpt = checkpoint.Checkpointer(workdir, c.train)
  try:
    with setup.context(), caplog.at_level(logging.WARNING):
      state, step = ckpt.restore_latest(checkpoint.abstract_with_shardings(
          setup.abstract_state, setup.state_shardings), batches)
  finally:
    ckpt.close()
    batches.close()
  assert step == 4 and int(state.step) == 4
  assert re.search(r"Skipping checkpoint gs://\S+/checkpoints/6: ",
                   caplog.text), caplog.text[-3000:]
  assert (epath.Path(workdir) / checkpoint.DAMAGED / "6").exists()


def restore_target(c, data_dir):
  """(setup on one device, TrainBatches) for config `c`."""
  tokenizer = ByteBPE.load(os.path.join(data_dir, "tokenizer.json"))
  setup = loop.build(c, tokenizer.vocab_size,
                     loop.token_byte_lengths(tokenizer), jax.devices()[:1])
  batches = loader.TrainBatches(c.data, data_dir, tokenizer,
                                seq_len=c.seq_len, batch_size=c.batch_size,
                                seed=c.seed)
  return setup, batches


def test_a_store_that_refuses_a_new_step_fails_the_save_at_once(
    proxy, data_dir, gcs_env, monkeypatch):
  """The store refuses (403) from the first request of step 1's save, so
  Orbax cannot create its folder: CheckpointSaveError from save() itself.
  (Orbax 0.12.8 creating folders in a thread waited 20 minutes here.)"""
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", proxy.url)
  del gcs_env
  workdir = f"gs://test-bucket/refused-{os.getpid()}/run"
  refused = r"/run/checkpoints/1"
  proxy.set_faults(fault_proxy.Faults(
      outage_on=refused, outage_scope=refused, outage_s=math.inf,
      outage_status=403))
  c = tiny_config.get_config()
  c.data.dir = data_dir
  c.mesh.shape = (1, 1, 1, 1)
  setup, batches = restore_target(c, data_dir)
  ckpt = checkpoint.Checkpointer(workdir, c.train)
  try:
    with setup.context():
      state = setup.init_fn(jax.random.key(0))
    with pytest.raises(checkpoint.CheckpointSaveError,
                       match=r"Saving checkpoint step 1 to gs://.*Forbidden"):
      ckpt.save(1, state, batches, force=True)
  finally:
    proxy.end_outage()
    ckpt.close()
    batches.close()
  assert proxy.counts()["outage"]
  assert checkpoint_steps.committed_steps(workdir) == []
