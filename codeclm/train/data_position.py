"""The data position in a checkpoint: one Grain state per loader stream.

A step's `data/` item holds `stream_<j>-of-<K>.json` per loader stream (see
codeclm/data/loader.py), not per process, so a checkpoint written on one
topology (devices, processes, mesh) resumes on another with the same batch.
"""

import concurrent.futures
import dataclasses
import json
from typing import Any

from etils import epath
import orbax.checkpoint as ocp

from codeclm.runtime import storage


WRITERS = 32  # Stream files one process uploads at once.


class DataPositionError(ValueError):
  """The saved data position cannot be this run's: a different batch or
  number of loader streams, or an older per-process format. Not damage."""


def stream_file(stream: int, num_streams: int) -> str:
  return f"stream_{stream}-of-{num_streams}.json"


class DataPositionHandler:
  """Orbax handler for the data position: one JSON file per loader stream.

  A process writes the streams it was told to (`TrainBatches.writes`: one
  process per stream) and restores the streams it reads, whichever process
  wrote them. Same interface as Grain's own handler, which names its files
  by process and so cannot move to another process count.
  """

  def save(self, directory: epath.Path, item=None, args=None):
    """Writes this process's stream files concurrently: on an object store
    one host's 32-128 streams as sequential uploads would cost a request
    round trip each per checkpoint (benchmarks/RESULTS.md). The first
    failed write is raised."""
    args = args or item

    def write(stream):
      (directory / stream_file(stream, args.num_streams)).write_text(
          json.dumps(dict(batch_size=args.batch_size,
                          state=args.streams[stream]), indent=1))
    workers = max(1, min(WRITERS, len(args.streams)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for _ in pool.map(write, args.streams):
        pass

  def restore(self, directory: epath.Path, item=None, args=None):
    batches = (args or item).item
    check_position_format(str(directory), batches)
    streams = {}
    for j in batches.streams:
      saved = json.loads((directory / stream_file(
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


def data_save(batches) -> DataSave:
  states = batches.get_state()["streams"]
  return DataSave(batches.batch_size, batches.num_streams,
                  {j: states[str(j)] for j in batches.writes})


def check_position_format(data_dir, batches) -> None:
  """A data item written for another number of streams or in the old
  per-process format is a DataPositionError (raised on every process alike,
  since all see the same files), not damage to skip."""
  data_dir = storage.path(data_dir)
  if list(data_dir.glob(stream_file("*", batches.num_streams))):
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
