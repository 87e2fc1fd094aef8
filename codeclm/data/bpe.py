"""Prepare's tokenizer step: copy the given BPE or train one on the shards.

Runs once all shards are finished (from `prepare.merge`). The training
sample is seeded, so every process that merges writes the same tokenizer.

Signatures: `tokenizer_settings(data, *, seed)` and
`write_tokenizer(data, out, dest, shards, metas, *, seed)`, with `data` the
config's data section and `seed` the config's seed.
"""

from __future__ import annotations

import os
from typing import Iterator

from array_record.python import array_record_module
from etils import epath
import numpy as np

from codeclm.data import shard_writer
from codeclm.data.sources.base import DataError
from codeclm.runtime import storage


def tokenizer_settings(data, *, seed: int) -> dict:
  """What the tokenizer depends on: a rerun retrains it only if this changed."""
  return dict(given=data.tokenizer, vocab_size=data.vocab_size,
              examples=data.tokenizer_examples, seed=seed)


def write_tokenizer(data, out: epath.Path, dest: epath.Path,
                    shards: list[shard_writer.Shard], metas: list[dict], *,
                    seed: int) -> None:
  """Copies data.tokenizer to `dest`, or trains a BPE on a seeded sample."""
  from codeclm.tokenizer import ByteBPE  # pylint: disable=g-import-not-at-top
  if data.tokenizer:
    if not os.path.isfile(data.tokenizer):
      raise DataError(
          f"config.data.tokenizer={data.tokenizer!r} does not exist; "
          "point it at a tokenizer.json or set it to '' to train one.")
    ByteBPE.load(data.tokenizer)  # Fails early on a bad file.
    if storage.path(data.tokenizer) != dest:
      storage.write_bytes(dest, storage.path(data.tokenizer).read_bytes())
    return
  train = [(s, m) for s, m in zip(shards, metas) if s.split == "train"]
  total = sum(len(m["lengths"]) for _, m in train)
  if not total:
    raise DataError(f"No training examples were written to {out} (all "
                    "skipped?); see the skipped list in the shard .json files.")
  rng = np.random.default_rng(seed)
  take = min(data.tokenizer_examples, total)
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

  tokenizer = ByteBPE.train(sample(), vocab_size=data.vocab_size)
  storage.write_text(dest, tokenizer.to_json())
