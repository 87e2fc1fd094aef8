"""Loader: prepared byte shards -> batches of token windows, with Grain.

  ArrayRecord shards (codec bytes)
    -> this process's share (every process_count-th record)
    -> seeded shuffle, reshuffled each epoch, repeating forever
    -> Tokenize: BOS + BPE ids + EOS
    -> "concat" (the paper): concatenate everything, cut windows of seq_len + 1
       "pack": whole examples first-fit into windows of seq_len + 1 with
               segment ids; SplitLong cuts (or drops) examples that cannot fit
    -> ToExample: inputs = w[:-1], targets = w[1:], plus segment ids,
       positions and the loss mask
    -> batches of batch_size // process_count
    -> optional worker processes (config.data.loader_workers)

Every batch is a dict of numpy arrays with the same five keys in both modes,
so the trainer is uniform: inputs, targets, segment_ids, positions (int32,
[B, seq_len]) and loss_mask (float32, [B, seq_len]). In concat mode
segment_ids are 1, positions 0..seq_len-1 and loss_mask 1 everywhere (the
paper's setting); where a window is padding, segment_ids and loss_mask are 0.

The training iterator (`iter(train_dataset(...))`) has get_state() and
set_state(); a restored iterator yields exactly the batches the original
would have. Shards hold bytes rather than token ids, so the vocabulary can
change without re-encoding, and tokenizing on the fly costs little.
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import numpy as np

from codeclm import codecs
from codeclm.data import prepare
from codeclm.data.sources import DataError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
# Threads read and tokenize ahead. Grain's default buffer of 500 elements
# costs more CPU than it saves (each element scans the whole buffer: half the
# loader's CPU time in a profile); 64 examples (~25 windows of 12,288) suffice.
READ_OPTIONS = grain.ReadOptions(num_threads=16, prefetch_buffer_size=64)


class Tokenize(grain.transforms.Map):
  """Codec bytes -> {"tokens": [BOS, ids..., EOS]} as int32."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.bos = np.array([tokenizer.bos_id], np.int32)
    self.eos = np.array([tokenizer.eos_id], np.int32)

  def map(self, element: bytes) -> dict[str, np.ndarray]:
    ids = np.asarray(self.tokenizer.encode(element), np.int32)
    return {"tokens": np.concatenate([self.bos, ids, self.eos])}


class SplitLong(grain.experimental.FlatMapTransform):
  """Cuts an example longer than a window into window-sized pieces, or drops it.

  Pieces overlap by one token, so every next-token target of the example is
  predicted in some piece. Examples that fit pass whole: packing never splits
  an example it can hold.
  """

  def __init__(self, window: int, drop: bool, max_fan_out: int = 1 << 16):
    self.window = window
    self.drop = drop
    self.max_fan_out = max_fan_out

  def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    tokens = element["tokens"]
    if len(tokens) <= self.window:
      return [element]
    if self.drop:
      return []
    step = self.window - 1
    return [{"tokens": tokens[i:i + self.window]}
            for i in range(0, len(tokens) - 1, step)]


class ToExample(grain.transforms.Map):
  """A packed window of seq_len + 1 tokens -> the five model inputs.

  Grain's packers emit `tokens`, `tokens_segment_ids` (1, 2, ... per piece, 0
  for padding) and `tokens_positions`. Targets are the next token; the loss
  mask is 0 where the target is padding or, when `packed`, where it belongs
  to another segment (there the target is set to pad too).
  """

  def __init__(self, seq_len: int, pad_id: int, packed: bool):
    self.seq_len = seq_len
    self.pad_id = pad_id
    self.packed = packed

  def map(self, window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens = window["tokens"]
    segments = window["tokens_segment_ids"]
    if not self.packed:  # One stream: every real token is segment 1.
      segments = (segments != 0).astype(np.int32)
      positions = np.arange(self.seq_len, dtype=np.int32)
    else:
      positions = window["tokens_positions"][:-1].astype(np.int32)
    mask = (segments[1:] == segments[:-1]) & (segments[:-1] != 0)
    real = segments[:-1] != 0
    return dict(
        inputs=np.where(real, tokens[:-1], self.pad_id).astype(np.int32),
        targets=np.where(mask, tokens[1:], self.pad_id).astype(np.int32),
        segment_ids=segments[:-1].astype(np.int32),
        positions=np.where(real, positions, 0).astype(np.int32),
        loss_mask=mask.astype(np.float32),
    )


def local_batch_size(config, process_count: int) -> int:
  if config.batch_size % process_count:
    raise DataError(
        f"config.batch_size={config.batch_size} (global) must divide by the "
        f"number of processes ({process_count}).")
  return config.batch_size // process_count


def _records(data_dir: str, split: str) -> grain.MapDataset:
  manifest = prepare.load_manifest(data_dir)
  paths = prepare.shard_paths(data_dir, manifest, split)
  if not paths:
    raise DataError(f"The {split} split in {data_dir} is empty; prepare more "
                    "examples (config.data.num_examples / eval_examples).")
  return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))


def _windows(config, ds: grain.IterDataset, tokenizer,
             num_bins: int) -> grain.IterDataset:
  """Token streams -> one dict of the five model inputs per window."""
  window = config.seq_len + 1
  packing = config.data.packing
  if packing == "concat":
    ds = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"tokens": window}, split_full_length_features=True)
  elif packing == "pack":
    ds = grain.experimental.FlatMapIterDataset(
        ds, SplitLong(window, config.data.drop_long))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": window}, num_packing_bins=num_bins,
        shuffle_bins=False)
  else:
    raise DataError(f"Unknown config.data.packing {packing!r}; use 'concat' "
                    "(the paper) or 'pack'.")
  return ds.map(ToExample(config.seq_len, tokenizer.pad_id,
                          packed=packing == "pack"))


def train_dataset(config, data_dir: str, tokenizer, *,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """This process's endless stream of training batches; `iter()` it.

  Each process reads every process_count-th record, so together the
  processes see each example exactly once per epoch.
  """
  process_index, process_count = prepare.resolve_process(
      process_index, process_count)
  batch = local_batch_size(config, process_count)
  records = _records(data_dir, "train")
  stored = prepare.load_manifest(data_dir)["codec"]  # Once per training run.
  codecs.warn_on_version_differences(
      stored, codecs.from_settings(stored), f"{data_dir}/{prepare.MANIFEST}")
  if len(records) < process_count:
    raise DataError(f"{len(records)} training records cannot be shared by "
                    f"{process_count} processes; prepare more examples.")
  ds = records[process_index::process_count]
  ds = ds.shuffle(seed=config.seed).repeat(None)  # Reseeded every epoch.
  ds = ds.map(Tokenize(tokenizer)).to_iter_dataset(READ_OPTIONS)
  ds = _windows(config, ds, tokenizer, num_bins=batch)
  ds = ds.batch(batch, drop_remainder=True)
  if config.data.loader_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.loader_workers))
  return ds


def eval_batches(config, data_dir: str, tokenizer, *,
                 process_index: int | None = None,
                 process_count: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The held-out split once, in a fixed order, as batches of this process.

  Every process builds the same window stream (the eval split is small) and
  global batch g is windows [g*G, (g+1)*G) with G = config.batch_size;
  process i takes rows [i*B, (i+1)*B) of it. So all processes yield the same
  number of batches (a collective step never waits forever) and the result
  does not depend on the process count. The tail is padded with windows
  whose loss_mask is 0.
  """
  process_index, process_count = prepare.resolve_process(
      process_index, process_count)
  batch = local_batch_size(config, process_count)
  ds = _records(data_dir, "eval").map(Tokenize(tokenizer)).to_iter_dataset(
      READ_OPTIONS)
  windows = iter(_windows(config, ds, tokenizer, num_bins=config.batch_size))
  lo, hi = process_index * batch, (process_index + 1) * batch
  padding = _padding_window(config.seq_len, tokenizer.pad_id)
  while True:
    rows = []
    for _ in range(config.batch_size):
      try:
        rows.append(next(windows))
      except StopIteration:
        break
    if not rows:
      return
    mine = rows[lo:hi]
    mine += [padding] * (batch - len(mine))
    yield {k: np.stack([r[k] for r in mine]) for k in BATCH_KEYS}
    if len(rows) < config.batch_size:
      return


def _padding_window(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  zeros = np.zeros(seq_len, np.int32)
  return dict(inputs=np.full(seq_len, pad_id, np.int32),
              targets=np.full(seq_len, pad_id, np.int32), segment_ids=zeros,
              positions=zeros, loss_mask=np.zeros(seq_len, np.float32))
