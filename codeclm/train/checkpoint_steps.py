"""Which checkpoint steps of a workdir are whole, and why the others are not.

Orbax decides whether a step is finished (`ocp.step.is_checkpoint_finalized`:
on a local disk a step folder renamed from its temporary name, on an object
store one holding Orbax's commit file), whatever its files are called in the
installed version; this module adds only what codeclm itself writes (the
`state/` and `data/` items) and what a restore starts from (Orbax's metadata
of the state, read through Orbax's handler, and the data position files).

A failure is one of three kinds, because each calls for something else:
  incomplete / unreadable (damage): Orbax does not count the step as finished,
    an item is missing, or a file is missing or does not parse. Resume skips
    the step for an older one.
  storage unreachable: listing or reading raised anything else (an OSError
    other than a missing file, a network or HTTP error, a TensorStore status
    such as UNAVAILABLE). Nothing about the step is known; resume stops and
    moves nothing.
Resume, sampling and export take the newest step that is whole and restores.
The checks here read files only: no collectives, no restore.
"""

import re

from absl import logging
from etils import epath
import orbax.checkpoint as ocp

from codeclm.runtime import storage
from codeclm.train import data_position

ITEMS = ("state", "data")
INCOMPLETE = "incomplete"
UNREADABLE = "unreadable"
UNRESTORABLE = "does not restore"
UNREACHABLE = "storage unreachable"
DAMAGE = (INCOMPLETE, UNREADABLE, UNRESTORABLE)
# TensorStore (Orbax's arrays) reports a store that fails as a ValueError whose
# message starts with one of these status codes.
_STORE_STATUS = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|PERMISSION_DENIED"
                           r"|UNAUTHENTICATED|RESOURCE_EXHAUSTED)\b")
# Clients whose own exception types mean a request failed, not a file.
_STORE_CLIENTS = ("aiohttp", "gcsfs", "google", "requests", "urllib3")


class RestoreError(RuntimeError):
  """No checkpoint step restores (or the one asked for does not)."""


class StoreUnreachable(RestoreError):
  """The checkpoint store failed while resuming; nothing was moved."""


def checkpoints_dir(workdir) -> epath.Path:
  return storage.path(workdir) / "checkpoints"


def is_store_error(error: BaseException) -> bool:
  """Whether `error` is the store failing (down, timing out, refusing) rather
  than a file being absent or malformed (which is damage)."""
  if isinstance(error, (FileNotFoundError, IsADirectoryError,
                        NotADirectoryError)):
    return False
  if isinstance(error, OSError):  # Connection, timeout, permission, EIO.
    return True
  if _STORE_STATUS.search(str(error)):
    return True
  return type(error).__module__.split(".")[0] in _STORE_CLIENTS


def list_steps(ckpt_dir) -> tuple[list[int], list[epath.Path]]:
  """(step-named folders, newest first; unfinished saves) of `ckpt_dir`.

  Every folder named like a step counts, finished or not, so that a workdir
  whose steps all look unfinished (Orbax renamed its commit file, a store
  that answers wrongly) is never taken for an empty one. Unfinished saves are
  Orbax's temporary folders (ocp.step.TMP_DIR_SUFFIX in the name): a save
  interrupted before its final rename, never a step. A missing folder has
  none; any other listing error is raised (the store is unreachable).
  """
  try:
    children = list(storage.path(ckpt_dir).iterdir())
  except FileNotFoundError:
    return [], []
  steps, unfinished = [], []
  for child in children:
    if ocp.step.TMP_DIR_SUFFIX in child.name:
      unfinished.append(child)
    elif child.name.isdigit():
      steps.append(int(child.name))
  return sorted(steps, reverse=True), sorted(unfinished)


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
  """Why a step folder is not a whole checkpoint, or None.

  Orbax judges whether the save finished; the items are codeclm's. Storage
  errors are raised, not returned.
  """
  path = storage.path(step_dir)
  if not ocp.step.is_checkpoint_finalized(path):
    return ("Orbax does not count it as a finished save "
            "(ocp.step.is_checkpoint_finalized)")
  for item in items:
    if not (path / item).is_dir():
      return f"its {item}/ item is missing"
  return None


def unusable_reason(step_dir: str, batches) -> tuple[str, str] | None:
  """(kind, why) this process cannot use a step (no collectives), or None.

  Reads what this process's restore starts from: Orbax's judgement that the
  save finished, the state's metadata (through Orbax's handler, which also
  opens each array's metadata) and the positions of the loader streams it
  reads. The kind is INCOMPLETE, UNREADABLE or UNREACHABLE (see the module
  docstring). Raises DataPositionError if the data item is of another config
  or format.
  """
  path = storage.path(step_dir)
  try:
    reason = incomplete_reason(path, ITEMS)
    if reason:
      return INCOMPLETE, reason
    data_position.check_position_format(path / "data", batches)
  except data_position.DataPositionError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    return _kind(e, UNREADABLE), f"checking it failed ({describe(e)})"
  own = [f"data/{data_position.stream_file(j, batches.num_streams)}"
         for j in batches.streams]
  reads = [("the state's metadata", lambda: state_metadata(path / "state"))]
  reads += [(name, lambda name=name: storage.read_json(path / name))
            for name in own]
  for what, read in reads:
    try:
      read()
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise many types for damaged files.
      return _kind(e, UNREADABLE), f"{what} does not read ({describe(e)})"
  return None


def state_metadata(state_dir):
  """The saved state's tree metadata, read by Orbax (no collectives)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(storage.path(state_dir))
  finally:
    handler.close()


def _kind(error: BaseException, damage: str) -> str:
  return UNREACHABLE if is_store_error(error) else damage


def complete_steps(ckpt_dir: str, items, warn: bool) -> list[int]:
  """Steps that are complete, newest first (storage errors are raised)."""
  steps, unfinished = list_steps(ckpt_dir)
  if warn:
    warn_unfinished(unfinished)
  complete = []
  for step in steps:
    path = storage.path(ckpt_dir) / str(step)
    reason = incomplete_reason(path, items)
    if reason is None:
      complete.append(step)
    elif warn:
      logging.warning("Skipping checkpoint %s: %s.", path, reason)
  return complete


def warn_unfinished(paths) -> None:
  for path in paths:
    logging.warning(
        "Ignoring %s: an unfinished Orbax save (interrupted while writing), "
        "not a checkpoint; it can be deleted.", path)


def describe(error: Exception) -> str:
  """An exception's type and first line, short enough for one log line."""
  lines = str(error).strip().splitlines()
  first = lines[0] if lines else ""
  return f"{type(error).__name__}: {first[:300]}"
