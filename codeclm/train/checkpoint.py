"""Orbax checkpoints of the train state and the data position, and run files.

A workdir holds everything sampling needs: `checkpoints/<step>/` (the train
state and the data position), plus `config.json`, `tokenizer.json` and
`manifest.json` (codec settings and the stripped header). Restores go against
abstract targets built from the *current* mesh, and the data position is one
Grain state per loader stream (codeclm/train/data_position.py), so a
checkpoint written on one topology (devices, processes, mesh) resumes on
another with the same batch.

Resume never silently starts over. It takes the newest step that Orbax counts
as finished and that restores (codeclm/train/checkpoint_steps.py), warning
about each one skipped, and then moves the skipped ones to
`damaged_checkpoints/` so that Orbax can write those steps again. A workdir
with no step folder starts at step 0. One whose steps all fail stops with a
RestoreError naming each step and why (nothing is moved), unless
`train.restart_from_scratch` is set, which moves them to
`previous_runs/<UTC time>/` and starts at step 0. A store that fails while
listing or reading stops with StoreUnreachable and moves nothing. On several
processes resume decides together: a step is taken only if it restores on
every process, so all resume from the same step.
"""

import datetime
import time

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from codeclm.runtime import distributed
from codeclm.runtime import storage
from codeclm.train import checkpoint_steps
from codeclm.train import data_position

RUN_FILES = ("config.json", "tokenizer.json", "manifest.json")
DAMAGED = "damaged_checkpoints"  # Workdir folder for steps resume skipped.
PREVIOUS_RUNS = "previous_runs"  # Steps put aside by restart_from_scratch.
_OK, _DAMAGED, _UNREACHABLE = 0, 1, 2  # A step's verdict, worst wins.


class CheckpointSaveError(RuntimeError):
  """A checkpoint save failed; the run stops (its step is not committed)."""


class Checkpointer:
  """Saves and restores {state, data} with keep-last-N plus keep-every-K."""

  def __init__(self, workdir: str, train_cfg):
    policies = [checkpoint_managers.LatestN(n=train_cfg.keep_last)]
    if train_cfg.keep_every:
      policies.append(checkpoint_managers.EveryNSteps(train_cfg.keep_every))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=train_cfg.async_checkpoints,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        create=True,
        # Orbax 0.12.8 creates a step's folders in a thread whose failure it
        # only logs: the save then waits 20 minutes (AsyncOptions.
        # timeout_secs) for a signal that never comes. Created in save(),
        # a store that refuses fails the save at once (tests/test_faults.py).
        async_options=ocp.AsyncOptions(
            create_directories_asynchronously=False),
    )
    self.directory = checkpoint_steps.checkpoints_dir(workdir)
    self._train_cfg = train_cfg
    self._in_flight = None  # The step of the last save not yet waited for.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, iterator, force: bool = False) -> bool:
    """Starts saving `step` (async: the arrays are written in the
    background). Raises CheckpointSaveError on every process together when
    this save, or the previous one still in flight, failed on any process:
    a run whose saves fail stops now rather than train on unsaved."""
    def attempt():
      self._wait_for_save()  # Orbax would wait too, and not raise.
      return self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=data_position.data_save(iterator),
          ),
          force=force,
      )
    saved = self._failing_together(attempt, step)
    if saved:
      self._in_flight = step
    return saved

  def _failing_together(self, attempt, step):
    """attempt()'s value; if it raised on any process, CheckpointSaveError
    everywhere (a collective: every process calls it at the same step)."""
    error, value = None, None
    try:
      value = attempt()
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if not _true_everywhere(error is None):
      if isinstance(error, CheckpointSaveError):
        raise error
      why = (checkpoint_steps.describe(error) if error is not None
             else "it failed on another process")
      raise self._save_error(step, why) from error
    return value

  def _save_error(self, step, why: str) -> "CheckpointSaveError":
    """The error a failed save stops the run with, naming the step."""
    return CheckpointSaveError(
        f"Saving checkpoint step {step} to {self.directory} failed ({why}). "
        "Training stops: a step whose save failed is never committed, so a "
        "resume takes the newest committed step before it. Check the "
        "store (permissions, quota, reachability) and rerun the same "
        "command.")

  def restore_latest(self, abstract_state, iterator):
    """(state, step) of the newest step that restores, or (None, None) when
    training starts at step 0: the workdir has no step folder, or none
    restores and train.restart_from_scratch is set.

    Every process takes the same step. The candidates are process 0's list of
    step folders, finished or not (a workdir whose steps all look unfinished
    is not an empty one). Each process checks without any collective that
    Orbax counts a step as finished and that the files it will read (the
    state's metadata, the positions of the loader streams it reads) are there
    and parse, and the processes vote, so a stale view or a damaged file on
    one host moves all of them to an older step together. A check or restore
    that fails is tried again after a pause (train.restore_tries,
    train.restore_retry_s): a transient read error is not damage.

    The steps that fail:
      * The store fails (listing, reading or restoring raised an error that
        is not about a file; checkpoint_steps.is_store_error) on any process:
        StoreUnreachable at once, nothing moved.
      * Damaged ones (incomplete, unreadable, do not restore), once an older
        step restored: moved to `<workdir>/damaged_checkpoints/` (Orbax would
        otherwise count them and refuse to save those steps again).
      * None restores: RestoreError listing each step and why, nothing moved;
        with train.restart_from_scratch every step folder (and unfinished
        save) is moved to `<workdir>/previous_runs/<UTC time>/` instead and
        training starts at step 0. A step that restores is resumed whatever
        that setting, so a restarted job never starts over twice.
    Before a step is called damaged and anything moves, a small write to the
    workdir (storage.check_writable) must succeed on every process, since some
    clients report a failing store as a missing file; if not, StoreUnreachable.
    A DataPositionError (another data config) is raised as is. On several
    processes Orbax's restore is itself collective, so a step that passes the
    vote and then fails to restore (arrays damaged on one host) stops every
    process with that error.
    """
    steps, unfinished = self._listing()
    checkpoint_steps.warn_unfinished(unfinished)
    failed = []  # (path, kind, why), newest first.
    for i, step in enumerate(steps):
      path = self.directory / str(step)
      _, failure = self._retried(f"Checkpoint step {step}", lambda: (
          None, checkpoint_steps.unusable_reason(path, iterator)))
      verdict = _worst_everywhere(_verdict(failure))  # All act alike.
      if verdict == _UNREACHABLE and _verdict(failure) != _UNREACHABLE:
        failure = (checkpoint_steps.UNREACHABLE,
                   "the store failed on another process")
      elif verdict == _DAMAGED and failure is None:
        failure = (checkpoint_steps.UNREADABLE,
                   "it is unusable on another process")
      elif verdict == _OK and jax.process_count() > 1:
        state = self.restore(step, abstract_state, iterator)
      elif verdict == _OK:
        state, failure = self._retried(
            f"Checkpoint step {step}",
            lambda: self._restore_or_failure(step, abstract_state, iterator))
      if failure is not None:
        failed.append((path, *failure))
        if failure[0] == checkpoint_steps.UNREACHABLE:
          raise self._unreachable(failed, steps[i + 1:])
        logging.warning("Skipping checkpoint %s: %s.", path, failure[1])
        continue
      self._check_store(failed)
      self._set_aside([p for p, _, _ in failed],
                      self.directory.parent / DAMAGED)
      _check_same_step_everywhere(step)
      return state, step
    if not steps:
      return None, None
    self._check_store(failed)
    if not self._train_cfg.restart_from_scratch:
      raise checkpoint_steps.RestoreError(
          f"No checkpoint step in {self.directory} restores, so training "
          "stops rather than start over at step 0 (nothing was moved):\n"
          f"{_report(failed)}\nIf the config changed (model size, "
          "optimizer), use the config the checkpoints were written with or a "
          "new --workdir. To start over in this workdir anyway, pass "
          "--config.train.restart_from_scratch=True: the steps are then moved "
          f"to {self.directory.parent / PREVIOUS_RUNS}/<UTC time>/, not "
          "deleted.")
    stamp = datetime.datetime.now(datetime.timezone.utc)
    aside = self.directory.parent / PREVIOUS_RUNS / stamp.strftime(
        "%Y%m%dT%H%M%SZ")
    logging.warning(
        "No checkpoint step in %s restores:\n%s\ntrain.restart_from_scratch "
        "is set: moving them to %s and starting at step 0.", self.directory,
        _report(failed), aside)
    self._set_aside([self.directory / str(s) for s in steps] + unfinished,
                    aside)
    return None, None

  def _listing(self):
    """(process 0's step folders, this process's unfinished saves); a
    listing that fails on any process (after the retries) is
    StoreUnreachable."""
    def attempt():
      try:
        return checkpoint_steps.list_steps(self.directory), None
      except Exception as e:  # pylint: disable=broad-except
        return e, (checkpoint_steps.UNREACHABLE,
                   f"listing it failed ({checkpoint_steps.describe(e)})")
    listing, failure = self._retried(str(self.directory), attempt)
    if not _true_everywhere(failure is None):
      why = failure[1] if failure else "listing it failed on another process"
      raise checkpoint_steps.StoreUnreachable(
          f"The checkpoint store failed while resuming from {self.directory}"
          f": {why}.\n{_STOPS}") from (listing if failure else None)
    steps, unfinished = listing
    return _same_everywhere(steps), unfinished

  def _retried(self, label: str, attempt):
    """Runs attempt() -> (value, (kind, why) if it failed, else None) until
    it succeeds or the tries are spent; returns the last (value, failure)."""
    tries = max(1, self._train_cfg.restore_tries)
    for i in range(tries):
      value, failure = attempt()
      if failure is None or i + 1 == tries:
        return value, failure
      pause = self._train_cfg.restore_retry_s
      logging.warning("%s: %s; trying again in %ss.", label, failure[1],
                      pause)
      time.sleep(pause)

  def _restore_or_failure(self, step: int, abstract_state, iterator):
    try:
      return self.restore(step, abstract_state, iterator), None
    except data_position.DataPositionError:
      raise  # The run's data config, not damage: no older step fits either.
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise many types for damaged files.
      kind = (checkpoint_steps.UNREACHABLE
              if checkpoint_steps.is_store_error(e)
              else checkpoint_steps.UNRESTORABLE)
      return None, (kind, f"it does not restore "
                          f"({checkpoint_steps.describe(e)})")

  def _check_store(self, failed) -> None:
    """StoreUnreachable unless a small write to the workdir succeeds on
    every process; called before steps that failed are called damaged."""
    if not failed:
      return
    try:
      storage.check_writable(self.directory.parent)
      error = None
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if not _true_everywhere(error is None):
      why = (checkpoint_steps.describe(error) if error
             else "it failed on another process")
      raise self._unreachable(
          failed, (), f"; a test write to {self.directory.parent} "
          f"failed ({why}), so these may be the store failing rather than "
          "damage") from error

  def _unreachable(self, failed, untried, more: str = ""):
    return checkpoint_steps.StoreUnreachable(
        f"The checkpoint store failed while resuming from {self.directory}"
        f"{more}:\n{_report(failed, untried)}\n{_STOPS}")

  def _set_aside(self, paths, root) -> None:
    """Moves step folders into `root` (process 0 does it)."""
    if not paths:
      return
    if jax.process_index() == 0:
      root.mkdir(parents=True, exist_ok=True)
      for path in paths:
        dest, n = root / path.name, 0
        while dest.exists():
          n += 1
          dest = root / f"{path.name}.{n}"
        storage.move(path, dest)
        logging.warning("Moved %s to %s; delete it once inspected.", path,
                        dest)
    if jax.process_count() > 1:
      distributed.arrive_together("set_aside_checkpoints")
    self.manager.reload()

  def restore(self, step: int, abstract_state, iterator):
    """Restores the state onto `abstract_state`'s shardings; moves
    `iterator` to the saved data position."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=data_position.DataRestore(iterator),
        ),
    )
    return restored["state"]

  def wait(self):
    """Waits for the save in flight; CheckpointSaveError on every process
    together if it failed on any (a collective)."""
    self._failing_together(self._wait_for_save, self._in_flight)

  def close(self):
    """Waits for the save in flight (no collective: close runs when a
    process stops, alone or not); CheckpointSaveError if it failed."""
    try:
      self._wait_for_save()
    finally:
      self.manager.close()

  def _wait_for_save(self):
    """Waits for the save in flight; CheckpointSaveError if it failed.

    Orbax raises a failed background save here, or only logs it and skips
    finalizing the step (CheckpointManager._finalize_checkpoint): a step
    saved but not finalized is that failure too.
    """
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
      finished = step is None or self._finalized(step)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, checkpoint_steps.describe(e)) from e
    if not finished:
      raise self._save_error(step, "Orbax did not finalize it; its log above "
                             "says why")

  def _finalized(self, step: int) -> bool:
    path = self.directory / str(step)  # Absent: never renamed into place.
    return path.exists() and ocp.step.is_checkpoint_finalized(path)


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings (restore targets)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_tree, shardings)


def write_run_files(workdir: str, config, data_dir: str) -> None:
  """Copies config, tokenizer and manifest into the workdir (process 0)."""
  if jax.process_index() != 0:
    return
  workdir, data_dir = storage.path(workdir), storage.path(data_dir)
  storage.write_text(workdir / "config.json",
                     config.to_json_best_effort(indent=2))
  for name in ("tokenizer.json", "manifest.json"):
    if data_dir != workdir:
      storage.write_bytes(workdir / name, (data_dir / name).read_bytes())


def _same_everywhere(steps: list[int]) -> list[int]:
  """Process 0's list of steps, on every process (views can differ)."""
  if jax.process_count() == 1:
    return steps
  distributed.arrive_together("same_everywhere")
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  if not n:
    return []
  mine = np.zeros(n, np.int64)
  mine[:min(n, len(steps))] = steps[:n]
  return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]


_STOPS = ("Nothing was moved, and training stops rather than start over at "
          "step 0: rerun once the store answers (train.restore_tries and "
          "train.restore_retry_s set how long reads are retried).")


def _report(failed, untried=()) -> str:
  """One line per step that failed, newest first, then those not tried."""
  lines = [f"  {path}: {kind}: {why}" for path, kind, why in failed]
  if untried:
    lines.append(f"  steps {', '.join(map(str, untried))}: not tried")
  return "\n".join(lines)


def _verdict(failure) -> int:
  if failure is None:
    return _OK
  return (_UNREACHABLE if failure[0] == checkpoint_steps.UNREACHABLE
          else _DAMAGED)


def _worst_everywhere(verdict: int) -> int:
  """The worst verdict of any process (a collective: all must call)."""
  return int(distributed.gather_ints([verdict]).max())


def _true_everywhere(flag: bool) -> bool:
  """Whether `flag` holds on every process (a collective: all must call)."""
  return bool(distributed.gather_ints([flag]).all())


def _check_same_step_everywhere(step: int) -> None:
  """Processes that restored different steps would train apart silently."""
  if jax.process_count() > 1:
    multihost_utils.assert_equal(
        step, f"Processes restored different checkpoint steps (this one: "
        f"{step}); check that all hosts see the same checkpoint files.")
