"""Prepare: a source -> ArrayRecord shards of codec bytes, a manifest, a BPE.

What `run` leaves in `out_dir`, a local folder or any epath store (gs://):

  plan.json                  what is being prepared; a rerun must match it
  eval-00000-of-00001.array_record, train-00000-of-00009.array_record, ...
                             codec bytes (headers stripped), one record per
                             example, in source order; group_size:1 so that
                             random access reads one record
  <shard>.json               the shard's metadata (source indices, keys,
                             labels, byte lengths, skipped inputs). Written
                             last: its presence is what marks a shard finished
  tokenizer.json             the byte-level BPE, trained on a seeded sample of
                             the training shards (or copied from
                             config.data.tokenizer)
  manifest.json              the merged summary; written last of all, so its
                             presence means the data is ready

Splitting: example i of the source goes to the shard that covers i. The eval
split is the first `eval_examples` indices; the rest is training data, cut
into shards of `examples_per_shard`. Shard j (eval first, then train) belongs
to process j % process_count, so process i of n writes shards i, i+n, ...
Shards are named by their global index rather than by process, which makes
the output the same whatever the number of processes (a rerun may use a
different count). Within a process, examples are encoded by a pool of
`prepare_workers` processes (0 = all cores).

Merging: every process that finishes its shards checks whether all shards
are finished; if so it calls `merge`, which trains the tokenizer and writes
manifest.json. Merging is deterministic and written by atomic renames, so
two processes finishing at once write the same files. With `wait=True` (the
default) a process whose peers are still working waits for manifest.json;
with `wait=False` it returns at once and the last finisher (or a later call
of `merge`) completes the job. `out_dir` must be shared by all processes.

Resuming: a rerun skips finished shards (and, when all are finished and the
manifest exists, only retrains the BPE if its settings changed). A shard is
written to a temporary name and renamed when complete, then its metadata
file is renamed into place, so a killed run never leaves a shard that looks
finished.

Object stores: the ArrayRecord library writes and reads local files only
(google/array_record#120), so for a remote `out_dir` each shard is written
to a local temporary file, uploaded (the object appears only when complete)
and deleted, one shard at a time; the JSON files go through codeclm.runtime.storage.
The BPE sample is read from temporary local copies of the training shards
that hold it. Training reads the shards from a local path or a gcsfuse
mount of the bucket (`require_local`).

Damaged or unreadable inputs are skipped, counted and listed (with the
reason) in the shard metadata and the manifest; they are never fatal.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from typing import Iterator

from absl import logging
from array_record.python import array_record_module
from etils import epath
import numpy as np
import tqdm

from codeclm import codecs
from codeclm.data import sources
from codeclm.data.sources import DataError
from codeclm.runtime import storage

PLAN = "plan.json"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
WRITER_OPTIONS = "group_size:1,uncompressed"  # Codec bytes do not compress.
# This many failures before any success means a broken setup, not bad data.
_FAIL_FAST = 64
_CHUNK = 16  # Examples per task sent to an encoder process.


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


def plan_shards(num_examples: int, eval_examples: int,
                per_shard: int) -> list[Shard]:
  """The shard list: eval shards over [0, eval_examples), then train shards."""
  shards = []
  for split, start, stop in (("eval", 0, eval_examples),
                             ("train", eval_examples, num_examples)):
    count = -(-(stop - start) // per_shard)
    for j in range(count):
      lo = start + j * per_shard
      shards.append(Shard(f"{split}-{j:05d}-of-{count:05d}", split, lo,
                          min(lo + per_shard, stop)))
  return shards


def resolve_process(process_index, process_count) -> tuple[int, int]:
  """(index, count) of this process: the arguments, else JAX's (lazily)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else (
        process_index)
    process_count = jax.process_count() if process_count is None else (
        process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must lie in [0, {process_count}).")
  return process_index, process_count


def run(config, out_dir: storage.PathLike, *, process_index: int | None = None,
        process_count: int | None = None, progress: bool = True,
        wait: bool = True) -> dict:
  """Encodes this process's shards; returns the manifest once all are done.

  Process index and count default to JAX's. With `wait=False` a process that
  is not the last to finish returns a partial summary ({"complete": False,
  ...}) instead of waiting for its peers.
  """
  out = storage.path(out_dir)
  process_index, process_count = resolve_process(process_index, process_count)
  data = config.data
  if data.examples_per_shard <= 0:
    raise DataError(f"config.data.examples_per_shard="
                    f"{data.examples_per_shard} must be positive.")
  source = sources.open_source(config)
  codec = codecs.from_config(config.codec)
  n = len(source)
  if not 0 <= data.eval_examples < n:
    raise DataError(
        f"config.data.eval_examples={data.eval_examples} leaves no training "
        f"data: the source {data.source!r} has {n} examples. Lower it or add "
        "examples (config.data.num_examples).")
  shards = plan_shards(n, data.eval_examples, data.examples_per_shard)
  out.mkdir(parents=True, exist_ok=True)
  _check_plan(out, _plan(config, codec, source, shards))

  mine = [s for j, s in enumerate(shards) if j % process_count == process_index]
  todo = [s for s in mine if not _finished(out, s)]
  if len(todo) < len(mine):
    logging.info("Process %d: %d of its %d shards already finished.",
                 process_index, len(mine) - len(todo), len(mine))
  workers = data.prepare_workers or os.cpu_count() or 1
  if todo and storage.is_remote(out):
    logging.info("Each shard is written to %s, uploaded to %s and deleted.",
                 tempfile.gettempdir(), out)
  _encode_shards(out, todo, source, config.codec, workers, progress,
                 desc=f"prepare {process_index}/{process_count}")

  if all(_finished(out, s) for s in shards):
    manifest_path = out / MANIFEST
    if not todo and manifest_path.exists():  # A rerun of finished work.
      manifest = storage.read_json(manifest_path)
      if manifest["tokenizer_settings"] == _tokenizer_settings(config):
        return manifest
    return merge(config, out)
  if not wait:
    metas = [storage.read_json(out / s.meta) for s in mine]
    return dict(complete=False, process_index=process_index,
                counts=_counts(metas))
  logging.info("Process %d done; waiting for the others to write %s.",
               process_index, MANIFEST)
  while not (out / MANIFEST).exists():
    time.sleep(5)
  return storage.read_json(out / MANIFEST)


def merge(config, out_dir: storage.PathLike) -> dict:
  """Trains (or copies) the tokenizer and writes manifest.json; returns it.

  Needs every shard finished (by any number of processes); safe to call
  again. The manifest holds no timestamps, so it is the same on every call.
  """
  out = storage.path(out_dir)
  plan = storage.read_json(out / PLAN)
  shards = [Shard(**s) for s in plan["shards"]]
  missing = [s.name for s in shards if not _finished(out, s)]
  if missing:
    raise DataError(
        f"{len(missing)} shards in {out_dir} are not finished (first: "
        f"{missing[:3]}); run prepare again (it resumes), with every process.")
  metas = [storage.read_json(out / s.meta) for s in shards]
  lengths = np.array([x for m in metas for x in m["lengths"]], np.int64)
  _write_tokenizer(config, out, shards, metas)
  manifest = dict(
      format=1,
      source=plan["source"],
      codec=plan["codec"],
      header_b64=plan["header_b64"],
      counts=dict(_counts(metas), **{split: sum(
          len(m["lengths"]) for s, m in zip(shards, metas) if s.split == split)
                                     for split in ("train", "eval")}),
      bytes=_stats(lengths),
      eval=dict(examples=plan["eval_examples"],
                indices=[0, plan["eval_examples"]],
                shards=[s.path for s in shards if s.split == "eval"]),
      shards=[dict(path=s.path, split=s.split, start=s.start, stop=s.stop,
                   records=len(m["lengths"])) for s, m in zip(shards, metas)],
      label_names=plan["label_names"],
      skipped=[x for m in metas for x in m["skipped"]],
      tokenizer=TOKENIZER,
      tokenizer_settings=_tokenizer_settings(config),
  )
  storage.write_json(out / MANIFEST, manifest)
  return manifest


def load_manifest(data_dir: str) -> dict:
  """The manifest of prepared data, or a DataError saying how to make it."""
  require_local(data_dir)
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.exists(path):
    partial = os.path.exists(os.path.join(data_dir, PLAN))
    raise DataError(
        f"No prepared data in {data_dir} ({MANIFEST} missing"
        f"{'; preparation started but did not finish' if partial else ''}): "
        "run --mode=prepare first with the same config (it resumes).")
  return storage.read_json(path)


def shard_paths(data_dir: str, manifest: dict, split: str) -> list[str]:
  """Paths of a split's non-empty shards, in order."""
  return [os.path.join(data_dir, s["path"]) for s in manifest["shards"]
          if s["split"] == split and s["records"]]


# -- encoding ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Result:
  index: int
  key: str
  label: int | None
  payload: bytes | None
  reason: str | None = None


def _encode_one(source, codec, index: int) -> _Result:
  key, label = f"#{index}", None
  try:
    item = source[index]
    key, label = item.key, item.label
    payload = (codec.encode(item.data) if item.fps is None else
               codec.encode(item.data, fps=item.fps))
    return _Result(index, key, label, payload)
  # Readers and decoders raise a zoo of types (CodecError, OSError,
  # SyntaxError, ValueError, DecompressionBombError, EOFError, ...): a bad
  # input must never end a long job, so any error skips the input.
  except Exception as e:  # pylint: disable=broad-exception-caught
    return _Result(index, key, label, None, f"{type(e).__name__}: {e}")


_worker = {}  # Per encoder process: its own source and codec (initializer).


def _init_worker(source_pickle: bytes, codec_settings: dict) -> None:
  # Unpickled here rather than by multiprocessing, and errors kept for the
  # first task to raise: the parent then reports the actual cause.
  try:
    _worker["source"] = pickle.loads(source_pickle)
    _worker["codec"] = codecs.from_config(codec_settings)
  except Exception as e:  # pylint: disable=broad-exception-caught
    _worker["error"] = f"{type(e).__name__}: {e}"


def _encode_chunk(indices: list[int]) -> list[_Result]:
  if "error" in _worker:
    raise DataError(f"An encoder process failed to start: {_worker['error']}")
  return [_encode_one(_worker["source"], _worker["codec"], i) for i in indices]


def _results(indices: list[int], source, codec_config,
             workers: int) -> Iterator[_Result]:
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


def _encode_shards(out: epath.Path, shards, source, codec_config, workers,
                   progress, desc) -> None:
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
      with _ShardWriter(out, shard) as writer:
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


class _ShardWriter:
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

  def add(self, result: _Result) -> None:
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


def _finished(out: epath.Path, shard: Shard) -> bool:
  return (out / shard.meta).exists() and (out / shard.path).exists()


# -- plan, manifest, tokenizer -------------------------------------------------


def _plan(config, codec, source, shards: list[Shard]) -> dict:
  return dict(
      source=config.data.source,
      num_examples=len(source),
      eval_examples=config.data.eval_examples,
      examples_per_shard=config.data.examples_per_shard,
      codec=codec.settings(),
      header_b64=base64.b64encode(codec.header()).decode("ascii"),
      label_names=source.label_names,
      shards=[dataclasses.asdict(s) for s in shards],
  )


def _check_plan(out: epath.Path, plan: dict) -> None:
  """Writes plan.json, or checks that an earlier run prepared the same thing."""
  path = out / PLAN
  if path.exists():
    old = storage.read_json(path)
    if old != json.loads(json.dumps(plan)):
      diff = sorted(k for k in plan if old.get(k) != json.loads(json.dumps(
          plan[k])))
      raise DataError(
          f"{out} holds data prepared with different settings ({diff}). "
          "Use another output directory, delete this one, or restore the "
          "config it was prepared with.")
    return
  storage.write_json(path, plan)


def _tokenizer_settings(config) -> dict:
  d = config.data
  return dict(given=d.tokenizer, vocab_size=d.vocab_size,
              examples=d.tokenizer_examples, seed=config.seed)


def _write_tokenizer(config, out: epath.Path, shards: list[Shard],
                     metas: list[dict]) -> None:
  """Copies config.data.tokenizer in, or trains a BPE on a seeded sample."""
  from codeclm.tokenizer import ByteBPE  # pylint: disable=g-import-not-at-top
  dest = out / TOKENIZER
  if config.data.tokenizer:
    if not os.path.isfile(config.data.tokenizer):
      raise DataError(
          f"config.data.tokenizer={config.data.tokenizer!r} does not exist; "
          "point it at a tokenizer.json or set it to '' to train one.")
    ByteBPE.load(config.data.tokenizer)  # Fails early on a bad file.
    if storage.path(config.data.tokenizer) != dest:
      storage.write_bytes(dest, storage.path(config.data.tokenizer)
                          .read_bytes())
    return
  train = [(s, m) for s, m in zip(shards, metas) if s.split == "train"]
  total = sum(len(m["lengths"]) for _, m in train)
  if not total:
    raise DataError(f"No training examples were written to {out} (all "
                    "skipped?); see the skipped list in the shard .json files.")
  rng = np.random.default_rng(config.seed)
  take = min(config.data.tokenizer_examples, total)
  chosen = np.sort(rng.choice(total, size=take, replace=False))

  def sample() -> Iterator[bytes]:
    offset = 0
    for shard, meta in train:
      count = len(meta["lengths"])
      mine = chosen[(chosen >= offset) & (chosen < offset + count)] - offset
      offset += count
      if not len(mine):
        continue
      with storage.local_file(out / shard.path) as local:
        reader = array_record_module.ArrayRecordReader(local)
        try:
          yield from reader.read(mine.tolist())
        finally:
          reader.close()

  tokenizer = ByteBPE.train(sample(), vocab_size=config.data.vocab_size)
  storage.write_text(dest, tokenizer.to_json())


def _counts(metas: list[dict]) -> dict[str, int]:
  written = sum(len(m["lengths"]) for m in metas)
  skipped = sum(len(m["skipped"]) for m in metas)
  return dict(seen=written + skipped, written=written, skipped=skipped)


def _stats(lengths: np.ndarray) -> dict[str, float]:
  if not len(lengths):
    return dict(total=0)
  return dict(total=int(lengths.sum()), mean=float(lengths.mean()),
              min=int(lengths.min()), max=int(lengths.max()),
              p50=float(np.percentile(lengths, 50)),
              p95=float(np.percentile(lengths, 95)))


def require_local(data_dir: str) -> None:
  """ArrayRecord shards need a local path (a gcsfuse mount is one)."""
  if storage.is_remote(data_dir):
    raise DataError(
        f"data.dir={data_dir}: the installed ArrayRecord library reads and "
        "writes local files only (google/array_record#120), so the shards "
        "cannot live on an object store directly. Mount the bucket with "
        "gcsfuse (`gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`) and set "
        "--config.data.dir=/mnt/BUCKET/<path>, or copy the prepared folder "
        "to local disk; the workdir itself may stay on gs://.")
