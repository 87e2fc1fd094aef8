"""Prepare's shard files: a shard's range, and writing it so a crash is safe.

A shard is written to a temporary name and renamed when complete, then its
metadata file is written, so a killed run never leaves a shard that looks
finished (see prepare.py for the whole layout).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from array_record.python import array_record_module
from etils import epath

from codeclm.runtime import storage

WRITER_OPTIONS = "group_size:1,uncompressed"  # Codec bytes do not compress.


@dataclasses.dataclass(frozen=True)
class Shard:
  """A contiguous range [start, stop) of source indices in one split."""
  name: str
  split: str
  start: int
  stop: int

  @property
  def path(self) -> str:
    return self.name + ".array_record"

  @property
  def meta(self) -> str:
    return self.name + ".json"


@dataclasses.dataclass(frozen=True)
class Result:
  """One example after encoding: its payload, or the reason it was skipped."""
  index: int
  key: str
  label: int | None
  payload: bytes | None
  reason: str | None = None


class ShardWriter:
  """Writes one shard under a temporary name; `commit` makes it final.

  Locally the temporary file sits beside the shard and is renamed; for a
  remote `out` it is a local temporary file, uploaded then deleted.
  """

  def __init__(self, out: epath.Path, shard: Shard):
    self.shard = shard
    self.path = out / shard.path
    self.meta_path = out / shard.meta
    self.stage = (tempfile.mkdtemp(prefix="codeclm_prepare_")
                  if storage.is_remote(out) else None)
    self.tmp = (os.path.join(self.stage, shard.path) if self.stage else
                os.fspath(self.path) + ".tmp")
    if self.meta_path.exists():  # Left by a killed run.
      self.meta_path.unlink()
    if os.path.exists(self.tmp):
      os.remove(self.tmp)
    self.writer = array_record_module.ArrayRecordWriter(self.tmp,
                                                        WRITER_OPTIONS)
    self.meta = dict(indices=[], keys=[], labels=[], lengths=[], skipped=[])

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.writer is not None:  # Not committed: leave nothing final behind.
      self.writer.close()
    if os.path.exists(self.tmp):
      os.remove(self.tmp)
    if self.stage:
      shutil.rmtree(self.stage, ignore_errors=True)

  def add(self, result: Result) -> None:
    if result.payload is None:
      self.meta["skipped"].append(dict(index=result.index, key=result.key,
                                       reason=result.reason))
      return
    self.writer.write(result.payload)
    self.meta["indices"].append(result.index)
    self.meta["keys"].append(result.key)
    self.meta["labels"].append(result.label)
    self.meta["lengths"].append(len(result.payload))

  def commit(self) -> None:
    self.writer.close()
    self.writer = None
    if self.stage:
      storage.upload_file(self.tmp, self.path)
    else:
      os.replace(self.tmp, self.path)
    storage.write_json(self.meta_path, self.meta)  # Marks the shard finished.


def is_finished(out: epath.Path, shard: Shard) -> bool:
  """Whether the shard is complete: its metadata is written last."""
  return (out / shard.meta).exists() and (out / shard.path).exists()
