"""Orbax checkpoints of the train state and the data position, and run files.

A workdir holds everything sampling needs: `checkpoints/<step>/` (the train
state and the data position), plus `config.json`, `tokenizer.json` and
`manifest.json` (codec settings and the stripped header). Restores go against
abstract targets built from the *current* mesh, and the data position is one
Grain state per loader stream (codeclm/train/data_position.py), so a
checkpoint written on one topology (devices, processes, mesh) resumes on
another with the same batch.

Resume takes the newest step that is complete and restores
(codeclm/train/checkpoint_steps.py judges the files), warning about each one
skipped, and moves the skipped ones to `damaged_checkpoints/` so that Orbax
can write those steps again. On several processes resume decides together: a
step is taken only if it restores on every process, so all resume from the
same step.
"""

import time

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from codeclm.runtime import storage
from codeclm.train import checkpoint_steps
from codeclm.train import data_position

RUN_FILES = ("config.json", "tokenizer.json", "manifest.json")
DAMAGED = "damaged_checkpoints"  # Workdir folder for steps resume skipped.


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
    )
    self.directory = checkpoint_steps.checkpoints_dir(workdir)
    self._train_cfg = train_cfg
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, iterator, force: bool = False) -> bool:
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=data_position.data_save(iterator),
        ),
        force=force,
    )

  def restore_latest(self, abstract_state, iterator):
    """(state, step) of the newest step that restores; (None, None) if none.

    Every process takes the same step. The candidates are process 0's list;
    each process checks without any collective that a step is complete and that
    the files it will read (the state metadata, the positions of the loader
    streams it reads) are there and parse, and the processes vote on the
    result, so a stale view or a damaged file on one host moves all of them to
    an older step together. A check or restore that fails is tried again after
    a pause (train.restore_tries, train.restore_retry_s): a transient read
    error is not damage. Once an older step has restored, the skipped ones are
    moved to `<workdir>/damaged_checkpoints/` (Orbax would otherwise still
    count them and refuse to save those steps again); incomplete ones are moved
    in any case. If steps are complete but none restores, that is a config that
    does not fit the checkpoints rather than damage: RestoreError, nothing
    moved. On several processes Orbax's restore is itself collective, so a step
    that passes the vote and then fails to restore (arrays damaged on one host)
    stops every process with that error.
    """
    checkpoint_steps.warn_tmp_dirs(self.directory)
    incomplete, unrestorable = [], []
    for step in _same_everywhere(sorted(self.manager.all_steps(),
                                        reverse=True)):
      path = self.directory / str(step)
      _, reason = self._retried(step, lambda: (
          None, checkpoint_steps.unreadable_reason(path, iterator)))
      if not _true_everywhere(reason is None):
        logging.warning("Skipping checkpoint %s: %s.", path,
                        reason or "unreadable on another process")
        incomplete.append(path)
        continue
      if jax.process_count() > 1:
        state, reason = self.restore(step, abstract_state, iterator), None
      else:
        state, reason = self._retried(
            step, lambda: self._restore_or_reason(step, abstract_state,
                                                  iterator))
      if reason is not None:
        logging.warning("Skipping checkpoint %s: %s.", path, reason)
        unrestorable.append((path, reason))
        continue
      self._set_aside(incomplete + [p for p, _ in unrestorable])
      _check_same_step_everywhere(step)
      return state, step
    self._set_aside(incomplete)
    if unrestorable:
      raise checkpoint_steps.RestoreError(
          f"No checkpoint in {self.directory} restores onto this config:\n"
          + "\n".join(f"  {p}: {r}" for p, r in unrestorable) + "\nIf the "
          "config changed (model size, optimizer), use a new --workdir or the "
          "config the checkpoints were written with; if the files are damaged, "
          "move those steps out of the checkpoints folder.")
    return None, None

  def _retried(self, step: int, attempt):
    """Runs attempt() -> (value, why it failed or None) until it succeeds or
    the tries are spent; returns the last (value, reason)."""
    tries = max(1, self._train_cfg.restore_tries)
    for i in range(tries):
      value, reason = attempt()
      if reason is None or i + 1 == tries:
        return value, reason
      pause = self._train_cfg.restore_retry_s
      logging.warning("Checkpoint step %d: %s; trying again in %ss.", step,
                      reason, pause)
      time.sleep(pause)

  def _restore_or_reason(self, step: int, abstract_state, iterator):
    try:
      return self.restore(step, abstract_state, iterator), None
    except data_position.DataPositionError:
      raise  # The run's data config, not damage: no older step fits either.
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise many types for damaged files.
      return None, f"it does not restore ({checkpoint_steps.describe(e)})"

  def _set_aside(self, paths: list[str]) -> None:
    """Moves step directories to damaged_checkpoints/ (process 0 does it)."""
    if not paths:
      return
    if jax.process_index() == 0:
      root = self.directory.parent / DAMAGED
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
      multihost_utils.sync_global_devices("codeclm_set_aside_checkpoints")
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
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


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
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  if not n:
    return []
  mine = np.zeros(n, np.int64)
  mine[:min(n, len(steps))] = steps[:n]
  return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]


def _true_everywhere(flag: bool) -> bool:
  """Whether `flag` holds on every process (a collective: all must call)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def _check_same_step_everywhere(step: int) -> None:
  """Processes that restored different steps would train apart silently."""
  if jax.process_count() > 1:
    multihost_utils.assert_equal(
        step, f"Processes restored different checkpoint steps (this one: "
        f"{step}); check that all hosts see the same checkpoint files.")
