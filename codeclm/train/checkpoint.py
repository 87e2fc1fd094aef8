"""Orbax checkpoints of the train state and the data position, and run files.

A workdir holds everything sampling needs: `checkpoints/<step>/` (the train
state and the data position), plus `config.json`, `tokenizer.json` and
`manifest.json` (codec settings and the stripped header). Restores go against
abstract targets built from the *current* mesh, and the data position is one
Grain state per loader stream (`data/stream_<j>-of-<K>.json`, see
codeclm/data/loader.py), not per process, so a checkpoint written on one
topology (devices, processes, mesh) resumes on another with the same batch.

Orbax on local disk treats any digit-named directory as a finished step, so a
step left damaged (commit marker or metadata gone, arrays truncated, emptied)
would be "the latest" and break every resume. Resume and sampling therefore
walk the steps newest first and take the newest one that is complete and
restores, warning about each one skipped; resume moves the skipped ones to
`damaged_checkpoints/` so that Orbax can write those steps again. On several
processes resume decides together: a step is taken only if it restores on
every process, so all resume from the same step.
"""

import dataclasses
import json
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from codeclm.runtime import storage

RUN_FILES = ("config.json", "tokenizer.json", "manifest.json")
DAMAGED = "damaged_checkpoints"  # Workdir folder for steps resume skipped.
# Orbax writes these last, just before the rename that finalises a step.
_COMMIT_FILES = ("commit_success.txt", "_CHECKPOINT_METADATA")
_TMP_MARK = ".orbax-checkpoint-tmp"  # In the names of unfinished saves.
_ITEMS = ("state", "data")


class RestoreError(RuntimeError):
  """No checkpoint step restores (or the one asked for does not)."""


class DataPositionError(ValueError):
  """The saved data position cannot be this run's: a different batch or
  number of loader streams, or an older per-process format. Not damage."""


def _stream_file(stream: int, num_streams: int) -> str:
  return f"stream_{stream}-of-{num_streams}.json"


class DataPositionHandler:
  """Orbax handler for the data position: one JSON file per loader stream.

  A process writes the streams it was told to (`TrainBatches.writes`: one
  process per stream) and restores the streams it reads, whichever process
  wrote them. Same interface as Grain's own handler, which names its files
  by process and so cannot move to another process count.
  """

  def save(self, directory: epath.Path, item=None, args=None):
    args = args or item
    for stream, state in args.streams.items():
      (directory / _stream_file(stream, args.num_streams)).write_text(
          json.dumps(dict(batch_size=args.batch_size, state=state), indent=1))

  def restore(self, directory: epath.Path, item=None, args=None):
    batches = (args or item).item
    _check_position_format(str(directory), batches)
    streams = {}
    for j in batches.streams:
      saved = json.loads((directory / _stream_file(
          j, batches.num_streams)).read_text())
      if saved["batch_size"] != batches.batch_size:
        raise DataPositionError(
            f"The data position in {directory} is for config.batch_size="
            f"{saved['batch_size']}, this run has {batches.batch_size}; "
            "resume with the batch size the run was started with.")
      streams[str(j)] = saved["state"]
    batches.set_state(dict(batch_size=batches.batch_size, streams=streams))
    return batches

  def structure(self, directory):
    del directory

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    pass

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(DataPositionHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  """The position at save time (async saves write it later)."""
  batch_size: int
  num_streams: int
  streams: dict  # stream -> Grain state


@ocp.args.register_with_handler(DataPositionHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any  # A loader.TrainBatches; moved to the saved position.


def _data_save(batches) -> DataSave:
  states = batches.get_state()["streams"]
  return DataSave(batches.batch_size, batches.num_streams,
                  {j: states[str(j)] for j in batches.writes})


def _check_position_format(data_dir, batches) -> None:
  """A data item written for another number of streams or in the old
  per-process format is a DataPositionError (raised on every process alike,
  since all see the same files), not damage to skip."""
  data_dir = storage.path(data_dir)
  if list(data_dir.glob(_stream_file("*", batches.num_streams))):
    return
  others = sorted(f.name for f in data_dir.glob("stream_*-of-*.json"))
  if others:
    raise DataPositionError(
        f"The data position in {data_dir} has files such as "
        f"{others[0]}, written with another "
        f"config.data.streams (this run has {batches.num_streams} streams); "
        "resume with the streams (and batch size) the run started with.")
  if list(data_dir.glob("process_*-of-*.json")):
    raise DataPositionError(
        f"{data_dir} holds per-process Grain states from a codeclm before "
        "per-stream data positions; resume it with that version, or start a "
        "new run from its weights with --config.train.init_from=<workdir>.")


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
    self.directory = _checkpoints_dir(workdir)
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
            data=_data_save(iterator),
        ),
        force=force,
    )

  def restore_latest(self, abstract_state, iterator):
    """(state, step) of the newest step that restores; (None, None) if none.

    Every process takes the same step. The candidates are process 0's list;
    each process checks without any collective that a step is complete and
    that the files it will read (the state metadata, the positions of
    the loader streams it reads) are there and parse, and the processes vote on the result, so
    a stale view or a damaged file on one host moves all of them to an older
    step together. A check or restore that fails is tried again after a
    pause (train.restore_tries, train.restore_retry_s): a transient read
    error is not damage. Once an older step has restored, the skipped ones
    are moved to `<workdir>/damaged_checkpoints/` (Orbax would otherwise
    still count them and refuse to save those steps again); incomplete ones
    are moved in any case. If steps are complete but none restores, that is
    a config that does not fit the checkpoints rather than damage:
    RestoreError, nothing moved. On several processes Orbax's restore is
    itself collective, so a step that passes the vote and then fails to
    restore (arrays damaged on one host) stops every process with that error.
    """
    _warn_tmp_dirs(self.directory)
    incomplete, unrestorable = [], []
    for step in _same_everywhere(sorted(self.manager.all_steps(),
                                        reverse=True)):
      path = self.directory / str(step)
      _, reason = self._retried(step, lambda: (
          None, _unreadable_reason(path, iterator)))
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
      raise RestoreError(
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
    except DataPositionError:
      raise  # The run's data config, not damage: no older step fits either.
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore raise many types for damaged files.
      return None, f"it does not restore ({_describe(e)})"

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
    """Restores the state onto `abstract_state`'s shardings; moves `iterator`."""
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=DataRestore(iterator),
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


def restore_params(path: str, abstract_params: Any) -> Any:
  """Parameters only (no optimizer state is allocated).

  `path` is a workdir (its newest step that restores), a step directory of a
  training checkpoint, or an exported params-only checkpoint directory.
  """
  path = storage.path(path)
  if (path / "checkpoints").is_dir():
    return restore_workdir_params(path, abstract_params)[0]
  if not path.is_dir():
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  ckptr = ocp.PyTreeCheckpointer()
  state_dir = path / "state"
  if state_dir.is_dir():  # A training checkpoint: {step, params, opt}.
    target = {"params": abstract_params}
    restored = ckptr.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    return restored["params"]
  return ckptr.restore(
      path,
      args=ocp.args.PyTreeRestore(
          item=abstract_params,
          restore_args=ocp.checkpoint_utils.construct_restore_args(
              abstract_params),
      ),
  )


def restore_workdir_params(workdir: str, abstract_params: Any,
                           step: int | None = None) -> tuple[Any, int]:
  """(params, step) of a workdir's newest step that restores, or of `step`.

  Skipped steps are only warned about, never moved: a trainer may be writing
  the workdir while this reads it.
  """
  if step is not None:
    path, step = committed_step_dir(workdir, step)
    try:
      return restore_params(path, abstract_params), step
    except Exception as e:  # pylint: disable=broad-except
      raise RestoreError(
          f"Checkpoint step {step} at {path} does not restore "
          f"({_describe(e)}); pick another of the committed steps "
          f"{committed_steps(workdir)}.") from e
  failures = []
  for step in _complete_steps(_checkpoints_dir(workdir), ("state",),
                              warn=True):
    path = _checkpoints_dir(workdir) / str(step)
    try:
      params = restore_params(path, abstract_params)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Skipping checkpoint %s: it does not restore (%s).",
                      path, _describe(e))
      failures.append(f"  {path}: {_describe(e)}")
      continue
    logging.info("Restored params from %s.", path)
    return params, step
  if failures:
    raise RestoreError(f"No checkpoint in {workdir} restores:\n"
                       + "\n".join(failures))
  raise FileNotFoundError(
      f"No committed checkpoint in {_checkpoints_dir(workdir)}; train first "
      "(--mode=train) or pass a step directory.")


def init_params_from(workdir: str, params: Any, config,
                     vocab_size: int) -> Any:
  """The params of `workdir`'s newest step, placed like `params` (train.init_from).

  The source's model (its config.json and tokenizer) must have this run's
  vocabulary and shapes; the error names both sides of each difference.
  """
  from codeclm import config_base  # pylint: disable=g-import-not-at-top
  from codeclm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  workdir = storage.path(workdir)
  try:
    source_config = storage.read_json(workdir / "config.json")
  except OSError as e:
    raise FileNotFoundError(
        f"train.init_from={workdir} has no config.json ({e}); point it at a "
        "training workdir or one written by codeclm.hf.import_hf.") from e
  source_vocab = tokenizer_lib.load(workdir / "tokenizer.json").vocab_size
  if source_vocab != vocab_size:
    raise ValueError(
        f"train.init_from={workdir} has vocab_size {source_vocab} (its "
        f"tokenizer.json) but this run's tokenizer has vocab_size "
        f"{vocab_size}; fine-tune with the source's tokenizer: "
        f"--config.data.tokenizer={workdir / 'tokenizer.json'} "
        "and a new data dir.")
  ours = config_base.model_config(config, vocab_size)
  model = dict(source_config["model"], vocab_size=source_vocab)
  theirs = config_base.model_config(
      type(config)(dict(model=model, seq_len=source_config["seq_len"])),
      source_vocab)
  fields = ("num_layers", "emb_dim", "num_heads", "num_kv_heads", "mlp_dim",
            "head_dim", "qk_norm", "scan_layers", "param_dtype")
  diff = {f: (getattr(theirs, f), getattr(ours, f)) for f in fields
          if getattr(theirs, f) != getattr(ours, f)}
  if diff:
    raise ValueError(
        f"train.init_from={workdir} has a different model: " + ", ".join(
            f"{f} {a} there vs {b} here" for f, (a, b) in diff.items())
        + "; set --config.model.* to the source's values.")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      params)
  restored, step = restore_workdir_params(workdir, abstract)
  logging.info("Initialised params from %s step %d.", workdir, step)
  return restored


def export_params(path: str, params: Any) -> None:
  """Writes a params-only checkpoint (for sampling and evaluation)."""
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(storage.path(path), args=ocp.args.PyTreeSave(params))


def committed_steps(workdir: str) -> list[int]:
  """A workdir's complete checkpoint steps, ascending (no restore tried)."""
  return sorted(_complete_steps(_checkpoints_dir(workdir), _ITEMS,
                                warn=False))


def committed_step_dir(workdir: str, step: int | None = None
                       ) -> tuple[str, int]:
  """(directory, step) of a workdir's newest complete checkpoint, or `step`.

  Incomplete steps and unfinished saves are skipped with a warning.
  """
  ckpt_dir = _checkpoints_dir(workdir)
  if step is None:
    steps = _complete_steps(ckpt_dir, ("state",), warn=True)
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


def incomplete_reason(step_dir: str, items=_ITEMS) -> str | None:
  """Why a final-named step directory is not a whole checkpoint, or None."""
  for name in _COMMIT_FILES:
    if not (storage.path(step_dir) / name).is_file():
      return f"{name} is missing (the save did not finish)"
  for item in items:
    if not (storage.path(step_dir) / item).is_dir():
      return f"its {item}/ item is missing"
  return None


def _unreadable_reason(step_dir: str, batches) -> str | None:
  """Why this process cannot use a step (no collectives), or None.

  Reads what this process's restore starts from: the commit files, the
  state's metadata and the positions of the loader streams it reads.
  Raises DataPositionError if the data item is of another config or format.
  """
  reason = incomplete_reason(step_dir, _ITEMS)
  if reason:
    return reason
  _check_position_format(storage.path(step_dir) / "data", batches)
  own = [f"data/{_stream_file(j, batches.num_streams)}"
         for j in batches.streams]
  for name in ("state/_METADATA", *own):
    try:
      storage.read_json(storage.path(step_dir) / name)
    except (OSError, ValueError) as e:
      return f"{name} does not read ({_describe(e)})"
  return None


def _checkpoints_dir(workdir) -> epath.Path:
  return storage.path(workdir) / "checkpoints"


def _complete_steps(ckpt_dir: str, items, warn: bool) -> list[int]:
  """Steps Orbax lists that are complete, newest first."""
  if not ckpt_dir.is_dir():
    return []
  if warn:
    _warn_tmp_dirs(ckpt_dir)
  steps = []
  for step in sorted(ocp.utils.checkpoint_steps(ckpt_dir), reverse=True):
    path = ckpt_dir / str(step)
    reason = incomplete_reason(path, items)
    if reason is None:
      steps.append(step)
    elif warn:
      logging.warning("Skipping checkpoint %s: %s.", path, reason)
  return steps


def _warn_tmp_dirs(ckpt_dir: epath.Path) -> None:
  if not ckpt_dir.is_dir():
    return
  for child in sorted(ckpt_dir.iterdir()):
    if _TMP_MARK in child.name:
      logging.warning(
          "Ignoring %s: an unfinished Orbax save (interrupted while writing), "
          "not a checkpoint; it can be deleted.", child)


def _describe(error: Exception) -> str:
  """An exception's type and first line, short enough for one log line."""
  lines = str(error).strip().splitlines()
  first = lines[0] if lines else ""
  return f"{type(error).__name__}: {first[:300]}"


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
