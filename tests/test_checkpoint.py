"""Resume and sampling skip half-written or damaged checkpoints.

Real Orbax checkpoints of a real tiny training run (one device, float32, a
checkpoint every step) are damaged the ways a crash or a full disk leaves them;
the trainer must resume from the newest step that restores, say which
directories it skipped and why, and then match a straight run exactly. When
no step restores, or the store fails, it must stop with an error rather than
start over at step 0, and move nothing (unless told to start over).
"""

import contextlib
import errno
import glob
import json
import logging
import os
import shutil

import jax
import pytest

from codeclm.codecs import jpeg
from codeclm.data import loader
from codeclm.runtime import storage
from codeclm.sampling import workdir as workdir_lib
from codeclm.tokenizer import ByteBPE
from codeclm.train import checkpoint
from codeclm.train import checkpoint_steps
from codeclm.train import data_position
from codeclm.train import loop
from tests import tiny_config

STEPS = 5
# A restore that fails on damaged files leaves Orbax's pending reads
# un-awaited; Python reports them when collected. Expected here.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def tiny(data_dir, **train_overrides):
  c = tiny_config.get_config()
  c.data.dir = data_dir
  c.model.dtype = "float32"
  c.mesh.shape = (1, 1, 1, 1)
  c.train.update(steps=STEPS, ckpt_every=1, keep_last=10, restore_retry_s=0.1)
  c.train.update(train_overrides)
  return c


def run(config, workdir) -> dict:
  return loop.train(config, str(workdir), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
  """A straight run: a committed checkpoint at every step, the final loss."""
  workdir = tmp_path_factory.mktemp("straight")
  last = run(tiny(data_dir), workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == [
      str(s) for s in range(1, STEPS + 1)]
  return workdir, float(last["loss"])


@pytest.fixture
def workdir(straight, tmp_path):
  path = tmp_path / "work"
  shutil.copytree(straight[0], path)
  return path


# -- The ways a step directory is left damaged. --------------------------------


def drop_commit_marker(step_dir):
  os.remove(os.path.join(step_dir, "commit_success.txt"))


def drop_step_metadata(step_dir):
  os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))


def truncate_arrays(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                    recursive=True)
  assert files
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)


def empty(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


def drop_iterator_state(step_dir):
  paths = glob.glob(os.path.join(step_dir, "data", "stream_*.json"))
  assert paths
  os.remove(paths[-1])


def drop_state_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


# Damage as Orbax judges it. On a local disk Orbax's finished save is the
# renamed folder, so its commit marker and step metadata (drop_commit_marker,
# drop_step_metadata) are not needed to restore: see
# test_an_orbax_file_renamed_is_judged_by_orbax.
DAMAGES = [truncate_arrays, empty, drop_iterator_state, drop_state_metadata]


def step_dir(workdir, step) -> str:
  return os.path.join(str(workdir), "checkpoints", str(step))


def warnings_of(caplog) -> str:
  return "\n".join(r.getMessage() for r in caplog.records
                   if r.levelno >= logging.WARNING)


def infos_of(caplog) -> str:
  return "\n".join(r.getMessage() for r in caplog.records)


# -- Training resumes from the newest step that restores. ----------------------


def test_resume_skips_damaged_steps_and_matches_straight_run(
    data_dir, straight, workdir, caplog):
  truncate_arrays(step_dir(workdir, 5))
  drop_state_metadata(step_dir(workdir, 4))
  with caplog.at_level(logging.INFO):
    last = run(tiny(data_dir), workdir)
  assert "Resuming from step 3." in infos_of(caplog)
  warned = warnings_of(caplog)
  assert step_dir(workdir, 5) in warned and step_dir(workdir, 4) in warned
  assert "the state's metadata does not read" in warned  # Why 4 was skipped.
  assert float(last["loss"]) == straight[1]
  # Steps 4 and 5 were saved again; the damaged ones were moved aside.
  assert checkpoint_steps.committed_steps(str(workdir)) == [1, 2, 3, 4, 5]
  assert sorted(os.listdir(workdir / checkpoint.DAMAGED)) == ["4", "5"]


def test_resume_ignores_and_logs_a_leftover_tmp_dir(data_dir, straight,
                                                    workdir, caplog):
  # A crash during the save of step 5 leaves Orbax's tmp dir, no step 5.
  tmp = step_dir(workdir, 5) + ".orbax-checkpoint-tmp-1700000000000000"
  os.rename(step_dir(workdir, 5), tmp)
  drop_commit_marker(tmp)
  empty(step_dir(workdir, 4))
  with caplog.at_level(logging.INFO):
    last = run(tiny(data_dir), workdir)
  assert "Resuming from step 3." in infos_of(caplog)
  warned = warnings_of(caplog)
  assert tmp in warned and step_dir(workdir, 4) in warned
  assert float(last["loss"]) == straight[1]
  assert checkpoint_steps.committed_steps(str(workdir)) == [1, 2, 3, 4, 5]


# -- Each kind of damage, at the Checkpointer (no training). -------------------


def restore_target(config, data_dir):
  tokenizer = ByteBPE.load(os.path.join(data_dir, "tokenizer.json"))
  setup = loop.build(config, tokenizer.vocab_size,
                      loop.token_byte_lengths(tokenizer), jax.devices()[:1])
  abstract = checkpoint.abstract_with_shardings(setup.abstract_state,
                                                setup.state_shardings)
  iterator = loader.TrainBatches(config.data, data_dir, tokenizer,
                                 seq_len=config.seq_len,
                                 batch_size=config.batch_size, seed=config.seed)
  return setup, abstract, iterator


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_checkpointer_restores_the_newest_good_step(data_dir, workdir, damage,
                                                    caplog):
  damage(step_dir(workdir, 5))
  config = tiny(data_dir)
  setup, abstract, iterator = restore_target(config, data_dir)
  ckpt = checkpoint.Checkpointer(str(workdir), config.train)
  try:
    with setup.context(), caplog.at_level(logging.WARNING):
      state, step = ckpt.restore_latest(abstract, iterator)
  finally:
    ckpt.close()
  assert step == 4 and int(state.step) == 4
  assert step_dir(workdir, 5) in warnings_of(caplog)
  assert ckpt.latest_step() == 4


class FlakyCheckpointer(checkpoint.Checkpointer):
  """A read error on the first restore of each step, as a network file
  system or an object store can give; the files themselves are intact."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.failed = set()

  def restore(self, step, abstract_state, iterator):
    if step not in self.failed:
      self.failed.add(step)
      raise OSError(f"transient read error at step {step}")
    return super().restore(step, abstract_state, iterator)


def test_a_transient_read_error_is_retried_not_called_damage(
    data_dir, workdir, caplog):
  config = tiny(data_dir)
  setup, abstract, iterator = restore_target(config, data_dir)
  ckpt = FlakyCheckpointer(str(workdir), config.train)
  try:
    with setup.context(), caplog.at_level(logging.WARNING):
      state, step = ckpt.restore_latest(abstract, iterator)
  finally:
    ckpt.close()
  assert step == 5 and int(state.step) == 5
  assert "transient read error at step 5); trying again" in warnings_of(caplog)
  assert not os.path.exists(workdir / checkpoint.DAMAGED)
  assert checkpoint_steps.committed_steps(str(workdir)) == [1, 2, 3, 4, 5]


def test_no_restorable_step_raises_and_moves_nothing(data_dir, workdir):
  """A config that no step fits (wider model) is an error, not a restart."""
  config = tiny(data_dir)
  config.model.emb_dim *= 2
  setup, abstract, iterator = restore_target(config, data_dir)
  ckpt = checkpoint.Checkpointer(str(workdir), config.train)
  try:
    with setup.context(), pytest.raises(
        checkpoint_steps.RestoreError,
        match=r"checkpoints/5.*\n.*checkpoints/4"):
      ckpt.restore_latest(abstract, iterator)
  finally:
    ckpt.close()
  assert checkpoint_steps.committed_steps(str(workdir)) == [1, 2, 3, 4, 5]
  assert not os.path.exists(workdir / checkpoint.DAMAGED)


@pytest.mark.parametrize("change", ["streams", "old_format"])
def test_a_data_position_of_another_config_is_named_not_skipped(
    data_dir, workdir, change):
  """Other loader streams, or Grain's old per-process files: every step has
  them, so the error says which setting to restore; nothing is moved."""
  config = tiny(data_dir)
  match = "config.data.streams"
  if change == "streams":
    config.data.streams = 4  # The checkpoints have 8 (one per row).
  else:
    match = "per-process Grain states"
    for path in glob.glob(str(workdir / "checkpoints" / "*" / "data" / "*")):
      os.rename(path, os.path.join(os.path.dirname(path),
                                   "process_0-of-1.json"))
  setup, abstract, iterator = restore_target(config, data_dir)
  ckpt = checkpoint.Checkpointer(str(workdir), config.train)
  try:
    with setup.context(), pytest.raises(data_position.DataPositionError,
                                           match=match):
      ckpt.restore_latest(abstract, iterator)
  finally:
    ckpt.close()
  assert not os.path.exists(workdir / checkpoint.DAMAGED)


def test_no_checkpoint_starts_fresh(data_dir, tmp_path):
  config = tiny(data_dir)
  setup, abstract, iterator = restore_target(config, data_dir)
  ckpt = checkpoint.Checkpointer(str(tmp_path), config.train)
  try:
    with setup.context():
      assert ckpt.restore_latest(abstract, iterator) == (None, None)
  finally:
    ckpt.close()


# -- No step restores, or the store fails: stop, never start over. -------------


def files_of(folder) -> dict:
  """{path relative to `folder`: size} of every file under it."""
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      found[os.path.relpath(path, folder)] = os.path.getsize(path)
  return found


def restore_latest(config, data_dir, workdir, patch=None):
  """Checkpointer.restore_latest on `workdir`; patch(ckpt) runs first."""
  setup, abstract, iterator = restore_target(config, data_dir)
  ckpt = checkpoint.Checkpointer(str(workdir), config.train)
  try:
    with contextlib.ExitStack() as patches:
      if patch:
        patches.enter_context(patch(ckpt))
      with setup.context():
        return ckpt.restore_latest(abstract, iterator)
  finally:
    ckpt.close()


@pytest.mark.parametrize("damage,kind", [(truncate_arrays, "unreadable"),
                                         (empty, "incomplete")],
                         ids=["truncated", "emptied"])
def test_no_step_restores_stops_training_and_moves_nothing(data_dir, workdir,
                                                           damage, kind):
  """Every step damaged: train() raises (so `python -m codeclm.main` exits
  1) naming each step and why; no step is moved or written again. (Steps
  judged incomplete used to be moved away and training started at 0.)"""
  for step in range(1, STEPS + 1):
    damage(step_dir(workdir, step))
  before = files_of(workdir / "checkpoints")
  with pytest.raises(checkpoint_steps.RestoreError) as raised:
    run(tiny(data_dir), workdir)
  assert not isinstance(raised.value, checkpoint_steps.StoreUnreachable)
  message = str(raised.value)
  for step in range(1, STEPS + 1):
    assert f"{step_dir(workdir, step)}: {kind}: " in message, message
  assert "--config.train.restart_from_scratch=True" in message
  assert files_of(workdir / "checkpoints") == before
  assert not os.path.exists(workdir / checkpoint.DAMAGED)
  assert not os.path.exists(workdir / checkpoint.PREVIOUS_RUNS)


def store_down(*args, **kwargs):
  raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


@contextlib.contextmanager
def failing_listing(ckpt):
  """Listing the checkpoints folder fails (Orbax listed it at start)."""
  cls, folder = type(ckpt.directory), os.fspath(ckpt.directory)
  iterdir = cls.iterdir
  def listing(self):
    if os.fspath(self) == folder:
      store_down()
    return iterdir(self)
  with pytest.MonkeyPatch.context() as m:
    m.setattr(cls, "iterdir", listing)
    yield


@contextlib.contextmanager
def failing_reads(ckpt):
  """codeclm's reads of the data position fail."""
  del ckpt
  with pytest.MonkeyPatch.context() as m:
    m.setattr(storage, "read_json", store_down)
    yield


@contextlib.contextmanager
def failing_restore(ckpt):
  """Orbax's restore fails as TensorStore reports a store that is down."""
  def restore(*args):
    raise ValueError('UNAVAILABLE: Error reading "state/d/1" from '
                     "gs://bucket/run: connection refused")
  with pytest.MonkeyPatch.context() as m:
    m.setattr(ckpt, "restore", restore)
    yield


@contextlib.contextmanager
def failing_test_write(ckpt):
  """Reads gave damage-like answers and then a test write fails: the
  damage may be the store failing (gcsfs reports some errors as no file)."""
  del ckpt
  with pytest.MonkeyPatch.context() as m:
    m.setattr(storage, "check_writable", store_down)
    yield


@pytest.mark.parametrize(
    "patch", [failing_listing, failing_reads, failing_restore,
              failing_test_write], ids=lambda f: f.__name__)
def test_a_store_that_fails_at_resume_stops_it_and_moves_nothing(
    data_dir, workdir, patch):
  """Step 5 is really damaged and would be set aside once an older step
  restores; with the store failing, resume stops and nothing moves."""
  truncate_arrays(step_dir(workdir, 5))
  before = files_of(workdir / "checkpoints")
  with pytest.raises(checkpoint_steps.StoreUnreachable) as raised:
    restore_latest(tiny(data_dir), data_dir, workdir, patch)
  message = str(raised.value)
  assert "Nothing was moved" in message
  assert files_of(workdir / "checkpoints") == before
  assert not os.path.exists(workdir / checkpoint.DAMAGED)
  if patch is failing_listing:
    assert "ConnectionResetError" in message
    return
  assert f"{step_dir(workdir, 5)}: unreadable: " in message, message
  if patch is failing_test_write:
    assert "a test write to" in message
  else:
    assert f"{step_dir(workdir, 4)}: storage unreachable: " in message
    assert "steps 3, 2, 1: not tried" in message


@pytest.mark.parametrize("name,restores", [
    ("_CHECKPOINT_METADATA", True), ("commit_success.txt", True),
    (os.path.join("state", "_METADATA"), False)])
def test_an_orbax_file_renamed_is_judged_by_orbax(data_dir, workdir, name,
                                                  restores):
  """Orbax's own files renamed in every step, as a new Orbax might: on a
  local disk a finished save is the renamed folder, so Orbax still counts
  each step and restores it without its commit marker or step metadata;
  without the state's _METADATA Orbax cannot restore, which is an error
  naming each step, never a start at step 0 or a crash in codeclm's checks."""
  for step in range(1, STEPS + 1):
    path = os.path.join(step_dir(workdir, step), name)
    os.rename(path, path + ".renamed")
  config = tiny(data_dir)
  if restores:
    state, step = restore_latest(config, data_dir, workdir)
    assert step == 5 and int(state.step) == 5
    assert checkpoint_steps.committed_steps(str(workdir)) == [1, 2, 3, 4, 5]
  else:
    with pytest.raises(checkpoint_steps.RestoreError, match="_METADATA"
                       ) as raised:
      restore_latest(config, data_dir, workdir)
    for step in range(1, STEPS + 1):
      assert f"{step_dir(workdir, step)}: unreadable: " in str(raised.value)
  assert not os.path.exists(workdir / checkpoint.DAMAGED)


def test_restart_from_scratch_starts_at_0_and_keeps_the_old_steps(
    data_dir, straight, workdir, caplog):
  for step in range(1, STEPS + 1):
    truncate_arrays(step_dir(workdir, step))
  before = files_of(workdir / "checkpoints")
  with caplog.at_level(logging.INFO):
    last = run(tiny(data_dir, restart_from_scratch=True), workdir)
  assert "Resuming" not in infos_of(caplog)
  assert float(last["loss"]) == straight[1]  # The straight run, from step 0.
  runs = os.listdir(workdir / checkpoint.PREVIOUS_RUNS)
  assert len(runs) == 1 and runs[0] in warnings_of(caplog)
  assert files_of(workdir / checkpoint.PREVIOUS_RUNS / runs[0]) == before
  assert checkpoint_steps.committed_steps(str(workdir)) == [1, 2, 3, 4, 5]
  assert not os.path.exists(workdir / checkpoint.DAMAGED)


def test_restart_from_scratch_still_resumes_a_step_that_restores(
    data_dir, workdir):
  """The setting only allows a start over: a job restarted with it after
  its first save resumes that save rather than starting over again."""
  truncate_arrays(step_dir(workdir, 5))
  _, step = restore_latest(tiny(data_dir, restart_from_scratch=True),
                           data_dir, workdir)
  assert step == 4
  assert os.listdir(workdir / checkpoint.DAMAGED) == ["5"]
  assert not os.path.exists(workdir / checkpoint.PREVIOUS_RUNS)


# -- Sampling reads the newest step that restores, and moves nothing. ----------


@pytest.mark.parametrize("damage", [truncate_arrays, empty],
                         ids=lambda f: f.__name__)
def test_sampling_skips_a_damaged_newest_step(workdir, damage, caplog):
  damage(step_dir(workdir, 5))
  with caplog.at_level(logging.WARNING):
    loaded = workdir_lib.load(str(workdir), mesh_shape=(1, 1, 1, 1))
  assert loaded.step == 4
  assert step_dir(workdir, 5) in warnings_of(caplog)
  assert os.path.isdir(step_dir(workdir, 5))  # A reader never moves files.
  with pytest.raises((FileNotFoundError, checkpoint_steps.RestoreError),
                     match="step 5"):
    workdir_lib.load(str(workdir), step=5, mesh_shape=(1, 1, 1, 1))


def test_sample_load_warns_when_codec_versions_differ(workdir, caplog):
  """The workdir's manifest records the encoder's versions; load compares."""
  path = workdir / "manifest.json"
  manifest = json.loads(path.read_text())
  manifest["codec"]["libjpeg"] = "6b"
  path.write_text(json.dumps(manifest))
  with caplog.at_level(logging.WARNING):
    workdir_lib.load(str(workdir), mesh_shape=(1, 1, 1, 1))
  warned = warnings_of(caplog)
  assert f"libjpeg '6b' -> '{jpeg.JpegCodec().settings()['libjpeg']}'" in warned
  assert str(path) in warned


def test_sampling_reads_a_workdir_from_before_the_context_axis(workdir):
  """A config.json with a (data, fsdp, tensor) mesh.shape is read with a
  context axis of 1; a shape typed now must have four entries."""
  path = workdir / "config.json"
  config = json.loads(path.read_text())
  data, fsdp, context, tensor = config["mesh"]["shape"]
  assert context == 1
  config["mesh"]["shape"] = [data, fsdp, tensor]
  path.write_text(json.dumps(config))
  loaded = workdir_lib.load(str(workdir))
  assert dict(loaded.mesh.shape)["context"] == 1
  assert tuple(loaded.config.mesh.shape) == (data, fsdp, 1, tensor)
