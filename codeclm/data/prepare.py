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
                             data.tokenizer); with data.conditioning="class"
                             also a token per label name and "no class"
                             after EOS (manifest "vocabulary" lists the ids)
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
and deleted, one shard at a time; the JSON files go through
codeclm.runtime.storage. The BPE sample is read from temporary local copies
of the training shards that hold it. Training reads the shards from a local
path or a gcsfuse mount of the bucket (`require_local`).

Code: this module plans, runs, merges and reads back; shard_writer.py writes
one shard, encode_workers.py runs the encoder processes and bpe.py the
tokenizer step.

Damaged or unreadable inputs are skipped, counted and listed (with the
reason) in the shard metadata and the manifest; they are never fatal.

Signatures take the config's sections, never the whole config:
`run(data, codec, out_dir, *, seed, process_index=None, process_count=None,
progress=True, wait=True)` and `merge(data, out_dir, *, seed)`, with `data`
and `codec` the config's sections of those names and `seed` its seed (it
seeds the tokenizer's training sample).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import tempfile
import time

from absl import logging
from etils import epath
import numpy as np

from codeclm import codecs
from codeclm.data import bpe
from codeclm.data import conditioning
from codeclm.data import encode_workers
from codeclm.data import shard_writer
from codeclm.data import sources
from codeclm.data.sources.base import DataError
from codeclm.runtime import storage

PLAN = "plan.json"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


def plan_shards(num_examples: int, eval_examples: int,
                per_shard: int) -> list[shard_writer.Shard]:
  """The shard list: eval shards over [0, eval_examples), then train shards."""
  shards = []
  for split, start, stop in (("eval", 0, eval_examples),
                             ("train", eval_examples, num_examples)):
    count = -(-(stop - start) // per_shard)
    for j in range(count):
      lo = start + j * per_shard
      shards.append(shard_writer.Shard(f"{split}-{j:05d}-of-{count:05d}",
                                       split, lo, min(lo + per_shard, stop)))
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


def run(data, codec, out_dir: storage.PathLike, *, seed: int,
        process_index: int | None = None, process_count: int | None = None,
        progress: bool = True, wait: bool = True) -> dict:
  """Encodes this process's shards; returns the manifest once all are done.

  `data` and `codec` are the config's sections, `seed` its seed. Process
  index and count default to JAX's. With `wait=False` a process that
  is not the last to finish returns a partial summary ({"complete": False,
  ...}) instead of waiting for its peers.
  """
  out = storage.path(out_dir)
  process_index, process_count = resolve_process(process_index, process_count)
  if data.examples_per_shard <= 0:
    raise DataError(f"config.data.examples_per_shard="
                    f"{data.examples_per_shard} must be positive.")
  source = sources.open_source(data, codec)
  if conditioning.enabled(data) and not source.label_names:
    raise conditioning.unlabelled_error(f"data.source={data.source!r}")
  codec_impl = codecs.from_config(codec)
  n = len(source)
  if not 0 <= data.eval_examples < n:
    raise DataError(
        f"config.data.eval_examples={data.eval_examples} leaves no training "
        f"data: the source {data.source!r} has {n} examples. Lower it or add "
        "examples (config.data.num_examples).")
  shards = plan_shards(n, data.eval_examples, data.examples_per_shard)
  out.mkdir(parents=True, exist_ok=True)
  _check_plan(out, _plan(data, codec_impl, source, shards))

  mine = [s for j, s in enumerate(shards) if j % process_count == process_index]
  todo = [s for s in mine if not shard_writer.is_finished(out, s)]
  if len(todo) < len(mine):
    logging.info("Process %d: %d of its %d shards already finished.",
                 process_index, len(mine) - len(todo), len(mine))
  workers = data.prepare_workers or os.cpu_count() or 1
  if todo and storage.is_remote(out):
    logging.info("Each shard is written to %s, uploaded to %s and deleted.",
                 tempfile.gettempdir(), out)
  encode_workers.encode_shards(
      out, todo, source, codec, workers, progress,
      desc=f"prepare {process_index}/{process_count}")

  if all(shard_writer.is_finished(out, s) for s in shards):
    manifest_path = out / MANIFEST
    if not todo and manifest_path.exists():  # A rerun of finished work.
      manifest = storage.read_json(manifest_path)
      if manifest["tokenizer_settings"] == _tokenizer_settings(data,
                                                               seed=seed):
        return manifest
    return merge(data, out, seed=seed)
  if not wait:
    metas = [storage.read_json(out / s.meta) for s in mine]
    return dict(complete=False, process_index=process_index,
                counts=_counts(metas))
  logging.info("Process %d done; waiting for the others to write %s.",
               process_index, MANIFEST)
  pause = 0.25  # Doubling to 5 s: prompt on one host, few calls on a bucket.
  while not (out / MANIFEST).exists():
    time.sleep(pause)
    pause = min(2 * pause, 5.0)
  return storage.read_json(out / MANIFEST)


def merge(data, out_dir: storage.PathLike, *, seed: int) -> dict:
  """Trains (or copies) the tokenizer and writes manifest.json; returns it.

  `data` is the config's data section (its tokenizer settings), `seed` the
  config's seed.
  Needs every shard finished (by any number of processes); safe to call
  again. The manifest holds no timestamps, so it is the same on every call.
  """
  out = storage.path(out_dir)
  plan = storage.read_json(out / PLAN)
  shards = [shard_writer.Shard(**s) for s in plan["shards"]]
  missing = [s.name for s in shards
             if not shard_writer.is_finished(out, s)]
  if missing:
    raise DataError(
        f"{len(missing)} shards in {out_dir} are not finished (first: "
        f"{missing[:3]}); run prepare again (it resumes), with every process.")
  metas = [storage.read_json(out / s.meta) for s in shards]
  lengths = np.array([x for m in metas for x in m["lengths"]], np.int64)
  bpe.write_tokenizer(data, out, out / TOKENIZER, shards, metas, seed=seed)
  vocabulary = _vocabulary(data, out / TOKENIZER, plan["label_names"])
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
      tokenizer_settings=_tokenizer_settings(data, seed=seed),
      vocabulary=vocabulary,
  )
  storage.write_json(out / MANIFEST, manifest)
  return manifest


def _tokenizer_settings(data, *, seed: int) -> dict:
  """bpe's settings, and the conditioning when it adds class tokens."""
  settings = bpe.tokenizer_settings(data, seed=seed)
  if conditioning.enabled(data):
    settings["conditioning"] = "class"
  return settings


def _vocabulary(data, path: epath.Path, label_names) -> dict:
  """Adds the class tokens to the tokenizer at `path` when data.conditioning
  asks for them; returns the id layout for the manifest."""
  from codeclm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_lib.from_json(path.read_text(encoding="utf-8"),
                                      os.fspath(path))
  if conditioning.enabled(data):
    if not label_names:
      raise conditioning.unlabelled_error(f"the data in {path.parent}")
    if not isinstance(tokenizer, tokenizer_lib.ByteBPE):
      raise DataError(
          f"data.conditioning='class' adds class tokens to a codeclm BPE, "
          f"but data.tokenizer={data.tokenizer!r} is an imported model's "
          "tokenizer, whose ids are fixed; set data.conditioning='none'.")
    tokenizer = tokenizer.with_classes(label_names)
    storage.write_text(path, tokenizer.to_json())
  vocabulary = dict(size=tokenizer.vocab_size,
                    bpe_entries=tokenizer.num_entries,
                    bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
  if tokenizer.class_names:
    vocabulary.update(
        classes={n: tokenizer.class_id(i)
                 for i, n in enumerate(tokenizer.class_names)},
        no_class_id=tokenizer.no_class_id)
  return vocabulary


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



def _plan(data, codec_impl, source,
          shards: list[shard_writer.Shard]) -> dict:
  """What is being prepared; `codec_impl` is the codec object."""
  return dict(
      source=data.source,
      num_examples=len(source),
      eval_examples=data.eval_examples,
      examples_per_shard=data.examples_per_shard,
      codec=codec_impl.settings(),
      header_b64=base64.b64encode(codec_impl.header()).decode("ascii"),
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
