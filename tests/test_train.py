"""The trainer end to end on CPU: meshes, resume after a crash, metrics."""

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys

from etils import epath
import jax
import numpy as np
import pytest

from codeclm.model import sharding
from codeclm.runtime import storage
from codeclm.train import checkpoint
from codeclm.train import loop
from tests import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_scalars(workdir: str, tag: str, last_run_only: bool = False
                 ) -> dict[int, float]:
  """Scalars from the run's real TensorBoard event files (one per process)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  paths = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents*")),
                 key=os.path.getmtime)
  for path in paths[-1:] if last_run_only else paths:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(tf.make_ndarray(value.tensor))
  return out


def tiny(data_dir, **train_overrides):
  c = tiny_config.get_config()
  c.data.dir = data_dir
  c.train.update(train_overrides)
  return c


def test_two_steps_end_to_end(data_dir, tmp_path, caplog):
  c = tiny(data_dir, steps=2, eval_every=2, eval_batches=1)
  caplog.set_level(logging.INFO)
  last = loop.train(c, str(tmp_path))
  # The start-up report comes before the first compile.
  log = caplog.text
  for fact in ("Mesh {'data': 8, 'fsdp': 1, 'context': 1, 'tensor': 1} over 8 "
               "devices",
               "M params", "FLOPs/token", "Batch 8 x 128 = 1024 tokens/step",
               "GiB per device"):
    assert fact in log, fact
  assert log.index("GiB per device") < log.index("ompiled")
  assert np.isfinite(last["loss"]) and last["loss"] > 0
  losses = read_scalars(str(tmp_path), "loss")
  assert sorted(losses) == [1, 2]
  assert "eval_loss" in {t for t in ("eval_loss",) if read_scalars(
      str(tmp_path), t)}
  for name in ("config.json", "tokenizer.json", "manifest.json"):
    assert os.path.exists(tmp_path / name)
  assert os.path.isdir(tmp_path / "checkpoints" / "2")


def test_loss_falls(data_dir, tmp_path):
  c = tiny(data_dir, steps=30, warmup_steps=3, lr=1e-2, ckpt_every=100)
  loop.train(c, str(tmp_path))
  losses = read_scalars(str(tmp_path), "loss")
  assert np.mean([losses[s] for s in range(26, 31)]) < 0.8 * np.mean(
      [losses[s] for s in range(1, 6)])


def fp32_run(data_dir, workdir, shape, devices=None, **train_overrides):
  c = tiny(data_dir, **{"steps": 3, "ckpt_every": 100, **train_overrides})
  c.model.dtype = "float32"
  c.mesh.shape = shape
  loop.train(c, str(workdir), devices=devices)
  return read_scalars(str(workdir), "loss")


@pytest.fixture(scope="module")
def one_device_losses(data_dir, tmp_path_factory):
  losses = fp32_run(data_dir, tmp_path_factory.mktemp("one"), (1, 1, 1, 1),
                    jax.devices()[:1])
  assert sorted(losses) == [1, 2, 3]
  return losses


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 2, 1, 2), (1, 4, 1, 2)])
def test_meshes_match_one_device(data_dir, tmp_path, one_device_losses,
                                 shape):
  got = fp32_run(data_dir, tmp_path, shape)
  assert sorted(got) == [1, 2, 3]
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)],
                             [one_device_losses[s] for s in (1, 2, 3)],
                             rtol=2e-5)


def test_grad_accum_matches(data_dir, tmp_path, one_device_losses):
  # 4 micro-batches of 2 rows, each split over 2 devices.
  got = fp32_run(data_dir, tmp_path, (2, 1, 1, 1), jax.devices()[:2],
                 grad_accum=4)
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)],
                             [one_device_losses[s] for s in (1, 2, 3)],
                             rtol=2e-5)


def test_eval_in_micro_batches_sums_what_the_whole_batch_does(data_dir):
  """The eval step scans the train step's micro-batches (so it fits where
  training does): its loss sums equal one pass over the whole batch."""
  c = tiny(data_dir)
  tokens = np.random.default_rng(0).integers(
      0, 300, (c.batch_size, c.seq_len + 1))
  sums = {}
  for n in (1, 4):
    c = tiny(data_dir, grad_accum=n)
    c.model.dtype, c.mesh.shape = "float32", (2, 1, 1, 1)
    setup = loop.build(c, 300, np.ones(300, np.float32), jax.devices()[:2])
    with setup.context():
      params = setup.init_fn(jax.random.key(0)).params
      positions = np.broadcast_to(np.arange(c.seq_len), (c.batch_size,
                                                         c.seq_len))
      batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                   segment_ids=np.ones_like(positions), positions=positions,
                   loss_mask=(tokens[:, 1:] % 3 > 0).astype(np.float32))
      batch = {k: jax.device_put(np.asarray(v, np.float32 if k == "loss_mask"
                                            else np.int32),
                                 setup.data_sharding)
               for k, v in batch.items()}
      sums[n] = jax.device_get(setup.eval_fn(params, batch))
  assert sums[1]["tokens"] == sums[4]["tokens"] > 0
  for key in ("nll", "bytes"):
    np.testing.assert_allclose(sums[4][key], sums[1][key], rtol=1e-5)


def test_grad_accum_micro_batches_stay_sharded(data_dir):
  """No rows move between devices: every micro-batch spans all of them.

  The compiled step on a (data 2, fsdp 4) mesh all-gathers weights (fsdp)
  but no collective carries token-batch data ([., seq_len] shapes).
  """
  c = tiny(data_dir, grad_accum=2)
  c.batch_size, c.mesh.shape = 16, (2, 4, 1, 1)
  setup = loop.build(c, 300, np.ones(300, np.float32))
  batch = {k: jax.ShapeDtypeStruct((16, c.seq_len), np.float32 if k ==
                                   "loss_mask" else np.int32,
                                   sharding=setup.data_sharding)
           for k in ("inputs", "targets", "segment_ids", "positions",
                     "loss_mask")}
  state = checkpoint.abstract_with_shardings(setup.abstract_state,
                                             setup.state_shardings)
  with setup.context():
    hlo = setup.step_fn.lower(state, batch).compile().as_text()
  collectives = re.findall(
      r"= (\S+) (all-gather|all-to-all|collective-permute)\(", hlo)
  assert any(op == "all-gather" for _, op in collectives)  # The weights.
  moved = [t for t, _ in collectives
           if t.startswith("s32") or re.search(rf"\b{c.seq_len}\b", t)]
  assert not moved, moved


def _devices(shape):
  n = int(np.prod(shape))
  return jax.devices()[:n] if n < jax.device_count() else None


# Sharded to resharded, one device to sharded. Sharded to one device is what
# every sampling test does (their workdir trains on 8 devices).
@pytest.mark.parametrize("saved, restored", [
    ((2, 2, 1, 2), (1, 4, 1, 2)), ((1, 1, 1, 1), (2, 2, 1, 2))])
def test_checkpoint_restores_on_another_topology(data_dir, tmp_path,
                                                 one_device_losses, saved,
                                                 restored):
  """Written on one mesh, resumed on another: the same next-step loss.

  The next step's loss also depends on the batch, so it shows the data
  iterator's position was restored with the state.
  """
  first = fp32_run(data_dir, tmp_path, saved, _devices(saved), steps=2,
                   ckpt_every=2)
  assert sorted(first) == [1, 2]
  fp32_run(data_dir, tmp_path, restored, _devices(restored))
  resumed = read_scalars(str(tmp_path), "loss", last_run_only=True)
  assert sorted(resumed) == [3]  # It resumed at step 2, not from scratch.
  np.testing.assert_allclose(resumed[3], one_device_losses[3], rtol=2e-5)


def test_shapes_the_mesh_cannot_hold_are_rejected(data_dir):
  c = tiny(data_dir)  # batch 8; tiny heads: 4 query, 2 kv.
  check = lambda shape: loop.check_config(
      c.model, c.train, sharding.make_mesh(shape), batch_size=c.batch_size)
  check((2, 2, 1, 2))
  c.batch_size = 4  # 4 rows cannot split over 8 data ways.
  with pytest.raises(ValueError, match="batch_size=4 must divide.*--config"):
    check((8, 1, 1, 1))
  c.batch_size = 8
  c.train.grad_accum = 2  # 8 rows in 2 micro-batches over 8 data ways.
  with pytest.raises(ValueError, match="grad_accum"):
    check((8, 1, 1, 1))
  c.train.grad_accum = 1
  with pytest.raises(ValueError, match="tensor mesh axis"):
    check((2, 1, 1, 4))


def run_main(workdir, data_dir, *flags, env=None):
  cmd = [sys.executable, "-m", "codeclm.main",
         f"--config={ROOT}/tests/tiny_config.py", f"--workdir={workdir}",
         f"--config.data.dir={data_dir}", *flags]
  env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
  return subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


_RESUME_FLAGS = ("--config.train.steps=20", "--config.train.ckpt_every=10",
                 "--config.model.dtype=float32")


@pytest.fixture(scope="module")
def straight_losses(data_dir, tmp_path_factory):
  """Per-step losses of a straight 20-step run: the resumed runs' reference."""
  workdir = tmp_path_factory.mktemp("straight")
  straight = run_main(workdir, data_dir, *_RESUME_FLAGS)
  assert straight.returncode == 0, straight.stderr[-3000:]
  losses = read_scalars(str(workdir), "loss")
  assert sorted(losses) == list(range(1, 21))
  return losses


def test_resume_after_sigkill_matches_straight_run(data_dir, tmp_path,
                                                   straight_losses):
  crashed = run_main(tmp_path / "crash", data_dir, *_RESUME_FLAGS,
                     "--config.train.fault_kill_at_step=13")
  assert crashed.returncode == -9, crashed.stderr[-3000:]
  steps = os.listdir(tmp_path / "crash" / "checkpoints")
  assert "10" in steps and "20" not in steps
  resumed = run_main(tmp_path / "crash", data_dir, *_RESUME_FLAGS)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from step 10" in resumed.stderr
  a = straight_losses
  b = read_scalars(str(tmp_path / "crash"), "loss")
  # Steps 11-13 were logged twice (before the crash and after the resume):
  # the event files hold both, and both equal the straight run.
  np.testing.assert_array_equal([b[s] for s in range(1, 21)],
                                [a[s] for s in range(1, 21)])


def test_gs_workdir_end_to_end(data_dir, straight_losses, gcs_env, tmp_path):
  """The same on gs://test-bucket/run (a GCS emulator), then sample and eval.

  Also: a step left damaged in the bucket is skipped with the warning and
  set aside, and --merge_only's merge reads the eval slices back from it.
  """
  from codeclm.eval import evaluate  # pylint: disable=g-import-not-at-top
  from codeclm.eval import inception  # pylint: disable=g-import-not-at-top
  from codeclm.sampling import files  # pylint: disable=g-import-not-at-top
  from tests import test_evaluate  # pylint: disable=g-import-not-at-top
  from tests import test_sample  # pylint: disable=g-import-not-at-top
  workdir = "gs://test-bucket/run"
  crashed = run_main(workdir, data_dir, *_RESUME_FLAGS,
                     "--config.train.fault_kill_at_step=13", env=gcs_env)
  assert crashed.returncode == -9, crashed.stderr[-3000:]
  run, ckpts = epath.Path(workdir), epath.Path(workdir) / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir()) == ["10"]
  # A step 12 whose commit files are there but whose state metadata is not.
  for rel, path in storage.files(ckpts / "10"):
    if rel != "state/_METADATA":
      path.copy(ckpts / "12" / rel)
  resumed = run_main(workdir, data_dir, *_RESUME_FLAGS, env=gcs_env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(r"Skipping checkpoint gs://test-bucket/run/checkpoints/12: "
                   r"the state's metadata does not read", resumed.stderr)
  assert "Resuming from step 10" in resumed.stderr
  # No warning per call from gcsfs's bucket-layout lookup (storage.py).
  assert "Could not determine bucket type" not in resumed.stderr
  assert (run / checkpoint.DAMAGED / "12" / "commit_success.txt").exists()
  # Events were mirrored into the bucket (the crash lost its unsynced ones).
  events = tmp_path / "events"
  events.mkdir()
  for path in run.glob("events.out.tfevents*"):
    (events / path.name).write_bytes(path.read_bytes())
  b = read_scalars(str(events), "loss")
  np.testing.assert_array_equal([b[s] for s in range(11, 21)],
                                [straight_losses[s] for s in range(11, 21)])

  small = dict(max_new_tokens=16, min_bucket=128)
  files.run(test_sample.sample_config(num_samples=2, **small), workdir)
  assert (run / "samples" / "step_20" / "sample_0001.jpg").exists()
  assert (run / "samples" / "step_20" / "samples.png").exists()
  weights = str(tmp_path / "inception.npz")
  inception.save_params(inception.random_params(0), weights)
  c = test_evaluate.eval_config(weights, "", num_examples=4, seeds=(0,),
                                ratios=(0.5,), unconditional=False)
  c.sample.update(small)
  results = evaluate.run(c, workdir)
  out = run / "eval" / "step_20"
  assert json.loads((out / "results.json").read_text()) == json.loads(
      json.dumps(results))
  assert list((run / "eval").glob("events.out.tfevents*"))
  (out / "results.json").unlink()
  assert evaluate.finish(os.fspath(out), workdir, "low_rank") == results
  assert (out / "results.json").exists()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path):
  c = tiny(data_dir, steps=6, warmup_steps=1, ckpt_every=1, keep_last=10,
           lr=1e30,
           grad_clip=1e30)
  with pytest.raises(loop.NonFiniteLossError, match="Non-finite") as error:
    loop.train(c, str(tmp_path))
  bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  assert 1 < bad_step < 6
  # Every step before the bad one was saved; the bad state never was.
  kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert kept == list(range(1, bad_step))


@pytest.mark.parametrize("override, message", [
    (dict(batch_size=6), "batch_size"),
    (dict(mesh_shape=(3, 1, 1, 1)), "mesh"),
])
def test_bad_configs_fail_with_the_fix(data_dir, tmp_path, override, message):
  c = tiny(data_dir)
  if "batch_size" in override:
    c.batch_size = override["batch_size"]
  else:
    c.mesh.shape = override["mesh_shape"]
  with pytest.raises(ValueError, match=message):
    loop.train(c, str(tmp_path))


def test_sigterm_saves_then_exits(data_dir, tmp_path):
  """Preemption: SIGTERM mid-run -> a checkpoint at the current step, exit 0."""
  cmd = [sys.executable, "-m", "codeclm.main",
         f"--config={ROOT}/tests/tiny_config.py", f"--workdir={tmp_path}",
         f"--config.data.dir={data_dir}", "--config.train.steps=100000",
         "--config.train.ckpt_every=100000"]
  proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=ROOT),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  log = []
  for line in proc.stderr:
    log.append(line)
    logged = re.search(r"\] \[(\d+)\] .*loss=", line)
    if logged and int(logged.group(1)) >= 3 and proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, "".join(log[-30:])
  preempted = re.search(r"Preempted at step (\d+)", "".join(log))
  assert preempted, "".join(log[-30:])
  step = int(preempted.group(1))
  assert 3 <= step < 100000
  assert os.listdir(tmp_path / "checkpoints") == [str(step)]
