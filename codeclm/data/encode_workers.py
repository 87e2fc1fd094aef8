"""Prepare's encoding step: source items -> codec bytes -> shard files.

Encoding is the slow part of prepare, so a pool of `prepare_workers`
processes encodes chunks of indices while this process writes the results,
in index order, into the shards. A bad input is recorded as skipped rather
than ending the job.

Signature: `encode_shards(out, shards, source, codec_config, workers,
progress, desc)`, with `codec_config` the config's codec section and
`workers` its data.prepare_workers resolved to a count (never the config).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import multiprocessing
import pickle
from typing import Iterator

from etils import epath
import tqdm

from codeclm import codecs
from codeclm.data import shard_writer
from codeclm.data.sources.base import DataError
from codeclm.runtime import storage

# This many failures before any success means a broken setup, not bad data.
_FAIL_FAST = 64
_CHUNK = 16  # Examples per task sent to an encoder process.


def _encode_one(source, codec, index: int) -> shard_writer.Result:
  key, label = f"#{index}", None
  try:
    item = source[index]
    key, label = item.key, item.label
    payload = (codec.encode(item.data) if item.fps is None else
               codec.encode(item.data, fps=item.fps))
    return shard_writer.Result(index, key, label, payload)
  # Readers and decoders raise a zoo of types (CodecError, OSError,
  # SyntaxError, ValueError, DecompressionBombError, EOFError, ...): a bad
  # input must never end a long job, so any error skips the input.
  except Exception as e:  # pylint: disable=broad-exception-caught
    return shard_writer.Result(index, key, label, None,
                               f"{type(e).__name__}: {e}")


_worker = {}  # Per encoder process: its own source and codec (initializer).


def _init_worker(source_pickle: bytes, codec_settings: dict) -> None:
  # Unpickled here rather than by multiprocessing, and errors kept for the
  # first task to raise: the parent then reports the actual cause.
  try:
    _worker["source"] = pickle.loads(source_pickle)
    _worker["codec"] = codecs.from_config(codec_settings)
  except Exception as e:  # pylint: disable=broad-exception-caught
    _worker["error"] = f"{type(e).__name__}: {e}"


def _encode_chunk(indices: list[int]) -> list[shard_writer.Result]:
  if "error" in _worker:
    raise DataError(f"An encoder process failed to start: {_worker['error']}")
  return [_encode_one(_worker["source"], _worker["codec"], i) for i in indices]


def _results(indices: list[int], source, codec_config,
             workers: int) -> Iterator[shard_writer.Result]:
  """Results in index order, from `workers` processes when more than one.

  Chunks of indices go to a process pool with a bounded number in flight, so
  memory stays flat however many examples there are. A worker that dies
  (e.g. killed for memory) raises BrokenProcessPool here rather than hanging.
  """
  workers = min(workers, len(indices))
  if workers <= 1:
    codec = codecs.from_config(codec_config)
    for i in indices:
      yield _encode_one(source, codec, i)
    return
  chunks = [indices[i:i + _CHUNK] for i in range(0, len(indices), _CHUNK)]
  # Spawn, not fork: the parent may hold JAX or TensorFlow threads.
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker,
      initargs=(pickle.dumps(source), dict(codec_config))) as pool:
    pending = collections.deque()
    try:
      for chunk in chunks:
        pending.append(pool.submit(_encode_chunk, chunk))
        if len(pending) >= 4 * workers:
          yield from pending.popleft().result()
      while pending:
        yield from pending.popleft().result()
    except concurrent.futures.process.BrokenProcessPool as e:
      raise DataError(
          "An encoder process died. Likely causes: out of memory (lower "
          "config.data.prepare_workers), or a script that calls prepare "
          "without an `if __name__ == '__main__':` guard (workers are "
          "spawned and re-import the main module). prepare_workers=1 encodes "
          "in this process.") from e


def encode_shards(out: epath.Path, shards, source, codec_config, workers,
                  progress, desc) -> None:
  """Encodes and writes `shards` in order, failing fast on a broken setup."""
  indices = [i for s in shards for i in range(s.start, s.stop)]
  if not indices:
    return
  results = _results(indices, source, codec_config, workers)
  written = skipped = done = 0
  remote = storage.is_remote(out)
  with contextlib.closing(results), tqdm.tqdm(
      total=len(indices), desc=desc, unit="img", smoothing=0.1,
      disable=not progress) as bar:
    for shard in shards:
      with shard_writer.ShardWriter(out, shard) as writer:
        for _ in range(shard.start, shard.stop):
          result = next(results)
          writer.add(result)
          bar.update()
          if result.payload is None:
            skipped += 1
            if not written and skipped >= _FAIL_FAST:
              raise DataError(
                  f"The first {skipped} inputs all failed to encode (last: "
                  f"{result.key}: {result.reason}); check config.data.source "
                  "and config.codec.")
          else:
            written += 1
        if remote:
          bar.set_postfix_str(f"uploading {shard.path}")
        writer.commit()
      done += 1
      bar.set_postfix(skipped=skipped, refresh=remote, **(
          {"uploaded": f"{done}/{len(shards)}"} if remote else {}))

