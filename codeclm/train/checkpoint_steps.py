"""Which checkpoint steps of a workdir are whole, judged from their files.

Orbax on local disk treats any digit-named directory as a finished step, so a
step left damaged (commit marker or metadata gone, arrays truncated, emptied)
would be "the latest" and break every resume. Resume, sampling and export
therefore walk the steps newest first and take the newest one that is
complete (and restores), warning about each one skipped. The checks here read
files only: no collectives, no restore.
"""

from absl import logging
from etils import epath
import orbax.checkpoint as ocp

from codeclm.runtime import storage
from codeclm.train import data_position

# Orbax writes these last, just before the rename that finalises a step.
_COMMIT_FILES = ("commit_success.txt", "_CHECKPOINT_METADATA")
_TMP_MARK = ".orbax-checkpoint-tmp"  # In the names of unfinished saves.
ITEMS = ("state", "data")


class RestoreError(RuntimeError):
  """No checkpoint step restores (or the one asked for does not)."""


def checkpoints_dir(workdir) -> epath.Path:
  return storage.path(workdir) / "checkpoints"


def committed_steps(workdir: str) -> list[int]:
  """A workdir's complete checkpoint steps, ascending (no restore tried)."""
  return sorted(complete_steps(checkpoints_dir(workdir), ITEMS, warn=False))


def committed_step_dir(workdir: str, step: int | None = None
                       ) -> tuple[str, int]:
  """(directory, step) of a workdir's newest complete checkpoint, or `step`.

  Incomplete steps and unfinished saves are skipped with a warning.
  """
  ckpt_dir = checkpoints_dir(workdir)
  if step is None:
    steps = complete_steps(ckpt_dir, ("state",), warn=True)
    if not steps:
      raise FileNotFoundError(
          f"No committed checkpoint in {ckpt_dir}; train first "
          "(--mode=train) or pass a step directory.")
    step = steps[0]
  else:
    path = ckpt_dir / str(step)
    reason = (incomplete_reason(path, ("state",)) if path.is_dir()
              else "it does not exist")
    if reason:
      raise FileNotFoundError(
          f"No usable checkpoint step {step} at {path} ({reason}); pick "
          f"one of the committed steps {committed_steps(workdir)}.")
  logging.info("Restoring from %s step %d.", ckpt_dir, step)
  return ckpt_dir / str(step), step


def incomplete_reason(step_dir: str, items=ITEMS) -> str | None:
  """Why a final-named step directory is not a whole checkpoint, or None."""
  for name in _COMMIT_FILES:
    if not (storage.path(step_dir) / name).is_file():
      return f"{name} is missing (the save did not finish)"
  for item in items:
    if not (storage.path(step_dir) / item).is_dir():
      return f"its {item}/ item is missing"
  return None


def unreadable_reason(step_dir: str, batches) -> str | None:
  """Why this process cannot use a step (no collectives), or None.

  Reads what this process's restore starts from: the commit files, the
  state's metadata and the positions of the loader streams it reads.
  Raises DataPositionError if the data item is of another config or format.
  """
  reason = incomplete_reason(step_dir, ITEMS)
  if reason:
    return reason
  data_position.check_position_format(storage.path(step_dir) / "data",
                                      batches)
  own = [f"data/{data_position.stream_file(j, batches.num_streams)}"
         for j in batches.streams]
  for name in ("state/_METADATA", *own):
    try:
      storage.read_json(storage.path(step_dir) / name)
    except (OSError, ValueError) as e:
      return f"{name} does not read ({describe(e)})"
  return None


def complete_steps(ckpt_dir: str, items, warn: bool) -> list[int]:
  """Steps Orbax lists that are complete, newest first."""
  if not ckpt_dir.is_dir():
    return []
  if warn:
    warn_tmp_dirs(ckpt_dir)
  steps = []
  for step in sorted(ocp.utils.checkpoint_steps(ckpt_dir), reverse=True):
    path = ckpt_dir / str(step)
    reason = incomplete_reason(path, items)
    if reason is None:
      steps.append(step)
    elif warn:
      logging.warning("Skipping checkpoint %s: %s.", path, reason)
  return steps


def warn_tmp_dirs(ckpt_dir: epath.Path) -> None:
  if not ckpt_dir.is_dir():
    return
  for child in sorted(ckpt_dir.iterdir()):
    if _TMP_MARK in child.name:
      logging.warning(
          "Ignoring %s: an unfinished Orbax save (interrupted while writing), "
          "not a checkpoint; it can be deleted.", child)


def describe(error: Exception) -> str:
  """An exception's type and first line, short enough for one log line."""
  lines = str(error).strip().splitlines()
  first = lines[0] if lines else ""
  return f"{type(error).__name__}: {first[:300]}"
