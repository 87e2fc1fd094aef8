"""Loader: prepared byte shards -> batches of token windows, with Grain.

  ArrayRecord shards (codec bytes)
    -> the global record order: a seeded shuffle of all records, reshuffled
       each epoch, repeating forever
    -> data.streams streams: stream j takes positions j, j + K, ...
       of that order (K streams)
    -> per stream: Tokenize: BOS + BPE ids + EOS
    -> "concat" (the paper): concatenate everything, cut windows of seq_len + 1
       "pack": whole examples first-fit into windows of seq_len + 1 with
               segment ids; SplitLong cuts (or drops) examples that cannot fit
    -> ToExample: inputs = w[:-1], targets = w[1:], plus segment ids,
       positions and the loss mask
    -> per stream: batch_size // K windows per step
    -> optional worker processes (data.loader_workers, per stream)

The data position does not depend on the process count. Row r of the global
batch at step s is window s * R + r % R of stream r // R (R = batch_size //
K), so the global batch is a fixed function of (seed, step) over the whole
dataset. A process runs only the streams that hold the rows its devices hold
(`TrainBatches(rows=...)`, rows from the batch sharding) and yields just those
rows; the position is the K streams' Grain states, saved one file per stream
(codeclm/train/data_position.py), so a run written by n processes resumes on m.

Every batch is a dict of numpy arrays with the same five keys in both modes,
so the trainer is uniform: inputs, targets, segment_ids, positions (int32,
[rows, seq_len]) and loss_mask (float32, [rows, seq_len]). In concat mode
segment_ids are 1, positions 0..seq_len-1 and loss_mask 1 everywhere (the
paper's setting); where a window is padding, segment_ids and loss_mask are 0.

Class conditioning (data.conditioning="class", conditioning.py): examples
are [BOS, class, ids..., EOS], each token tagged with its example's class
token; label dropout is drawn per record-order position. A window must not
lose the class of an image it starts inside: "concat" cuts windows of
seq_len tokens (not seq_len + 1) and puts the class token of the window's
first token in front (input only: its own target is masked, as the first
token of a window has no target without conditioning); "pack" starts every
piece of a long example after the first with the example's class token.

A restored TrainBatches (get_state / set_state) yields exactly the batches
the original would have. Shards hold bytes rather than token ids, so the
vocabulary can change without re-encoding, and tokenizing on the fly costs
little.

Signatures take the config's data section and its top-level scalars as
keywords, never the whole config: `TrainBatches(data, data_dir, tokenizer, *,
seq_len, batch_size, seed, rows=None, writes=None, label_dropout=0.0)`
(config.train.label_dropout), `eval_batches(data, data_dir, tokenizer, *,
seq_len, batch_size, rows=None)`, `num_streams(data, *, batch_size)`,
`stream_writers(data, rows_by_process, *, batch_size)` and
`record_order(data_dir, *, seed, labelled=False)`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from absl import logging
import grain
import numpy as np

from codeclm import codecs
from codeclm.data import conditioning
from codeclm.data import prepare
from codeclm.data.sources.base import DataError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
# "pack" fills this many windows per stream at once (more if a stream has
# more rows): with one bin per stream (one stream per row) 83% of tokens are
# real, with 8 bins 92% (benchmarks/RESULTS.md, "Data").
MIN_PACKING_BINS = 8
# More loader worker processes than this on one process draws a warning.
MAX_WORKER_PROCESSES = 64
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
  an example it can hold. With class conditioning (a "classes" feature)
  every piece after the first starts with the example's class token.
  """

  def __init__(self, window: int, drop: bool, max_fan_out: int = 1 << 16):
    self.window = window
    self.drop = drop
    self.max_fan_out = max_fan_out

  def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    tokens = element["tokens"]
    if len(tokens) <= self.window:
      return [{"tokens": tokens}]
    if self.drop:
      return []
    if "classes" not in element:
      step = self.window - 1
      return [{"tokens": tokens[i:i + self.window]}
              for i in range(0, len(tokens) - 1, step)]
    cls, body = element["classes"][:1], self.window - 1
    pieces = [{"tokens": tokens[:self.window]}]
    for i in range(self.window - 1, len(tokens) - 1, body - 1):
      pieces.append({"tokens": np.concatenate([cls, tokens[i:i + body]])})
    return pieces


class ToExample(grain.transforms.Map):
  """A packed window of seq_len + 1 tokens -> the five model inputs.

  Grain's packers emit `tokens`, `tokens_segment_ids` (1, 2, ... per piece, 0
  for padding) and `tokens_positions`. Targets are the next token; the loss
  mask is 0 where the target is padding or, when `packed`, where it belongs
  to another segment (there the target is set to pad too).

  With `class_prefix` (concat windows of seq_len tokens under class
  conditioning) the class token of the first token goes in front; its own
  target is masked.
  """

  def __init__(self, seq_len: int, pad_id: int, packed: bool,
               class_prefix: bool = False):
    self.seq_len = seq_len
    self.pad_id = pad_id
    self.packed = packed
    self.class_prefix = class_prefix

  def map(self, window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens = window["tokens"]
    segments = window["tokens_segment_ids"]
    if self.class_prefix:
      tokens = np.concatenate([window["classes"][:1], tokens])
      segments = np.concatenate([segments[:1], segments])
    if not self.packed:  # One stream: every real token is segment 1.
      segments = (segments != 0).astype(np.int32)
      positions = np.arange(self.seq_len, dtype=np.int32)
    else:
      positions = window["tokens_positions"][:-1].astype(np.int32)
    mask = (segments[1:] == segments[:-1]) & (segments[:-1] != 0)
    if self.class_prefix:
      mask[0] = False
    real = segments[:-1] != 0
    return dict(
        inputs=np.where(real, tokens[:-1], self.pad_id).astype(np.int32),
        targets=np.where(mask, tokens[1:], self.pad_id).astype(np.int32),
        segment_ids=segments[:-1].astype(np.int32),
        positions=np.where(real, positions, 0).astype(np.int32),
        loss_mask=mask.astype(np.float32),
    )


def _records(data_dir: str, split: str,
             labelled: bool = False) -> grain.MapDataset:
  """A split's records (bytes), or (bytes, label) pairs when `labelled`."""
  manifest = prepare.load_manifest(data_dir)
  paths = prepare.shard_paths(data_dir, manifest, split)
  if not paths:
    raise DataError(f"The {split} split in {data_dir} is empty; prepare more "
                    "examples (config.data.num_examples / eval_examples).")
  records = grain.sources.ArrayRecordDataSource(paths)
  if labelled:
    return conditioning.labelled_dataset(
        records, conditioning.split_labels(data_dir, manifest, split))
  return grain.MapDataset.source(records)


def _windows(data, ds: grain.IterDataset, tokenizer, *, seq_len: int,
             num_bins: int) -> grain.IterDataset:
  """Token streams -> one dict of the five model inputs per window."""
  window = seq_len + 1
  packing = data.packing
  classes = conditioning.enabled(data)
  if packing == "concat":
    # Conditioned: one token shorter, for the class token put in front.
    lengths = ({"tokens": seq_len, "classes": seq_len} if classes else
               {"tokens": window})
    ds = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct=lengths, split_full_length_features=True)
  elif packing == "pack":
    ds = grain.experimental.FlatMapIterDataset(
        ds, SplitLong(window, data.drop_long))
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": window}, num_packing_bins=num_bins,
        shuffle_bins=False)
  else:
    raise DataError(f"Unknown config.data.packing {packing!r}; use 'concat' "
                    "(the paper) or 'pack'.")
  return ds.map(ToExample(seq_len, tokenizer.pad_id,
                          packed=packing == "pack",
                          class_prefix=classes and packing == "concat"))


def num_streams(data, *, batch_size: int) -> int:
  """K, the number of independent window streams (data.streams)."""
  streams = data.streams or batch_size
  if streams < 1 or batch_size % streams:
    raise DataError(
        f"config.data.streams={data.streams} must divide "
        f"config.batch_size={batch_size} (0 = one stream per row).")
  return streams


def record_order(data_dir: str, *, seed: int,
                 labelled: bool = False) -> grain.MapDataset:
  """The global record order: all training records shuffled with `seed`,
  reshuffled every epoch, repeating forever. Position i is epoch
  i // len(records); stream j of K reads positions j, j + K, ...
  `labelled`: (bytes, label) pairs instead of bytes, in the same order."""
  return _records(data_dir, "train", labelled).shuffle(seed=seed).repeat(
      None)


def _tokenized_order(data, data_dir: str, tokenizer, *, seed: int,
                     label_dropout: float) -> grain.MapDataset:
  """The record order tokenized: Tokenize, or ClassTokenize with label
  dropout drawn by position in the order."""
  if not conditioning.enabled(data):
    return record_order(data_dir, seed=seed).map(Tokenize(tokenizer))
  conditioning.check(data_dir, prepare.load_manifest(data_dir), tokenizer)
  return record_order(data_dir, seed=seed, labelled=True).map_with_index(
      conditioning.ClassTokenize(tokenizer, seed=seed, dropout=label_dropout))


def _checked_rows(rows: Sequence[int] | None, batch_size: int) -> list[int]:
  if rows is None:
    return list(range(batch_size))
  rows = sorted({int(r) for r in rows})
  if not rows or rows[0] < 0 or rows[-1] >= batch_size:
    raise DataError(f"Rows {rows[:3]}...{rows[-3:]} must be a non-empty set "
                    f"of rows of the global batch [0, {batch_size}).")
  return rows


class TrainBatches:
  """This process's rows of every global training batch, endlessly.

  `rows` are the global batch rows this process feeds (all by default);
  batches hold them in ascending order. Only the streams holding those rows
  are read. get_state() is {"batch_size", "streams": {stream: Grain state}}
  for the streams read here; set_state() takes any state that holds them,
  whichever processes wrote it. `writes` are the streams whose position this
  process saves in checkpoints (default: those it reads; the trainer gives
  each stream to one process). `data` is the config's data section;
  `seq_len`, `batch_size` and `seed` are the config's values;
  `label_dropout` is config.train.label_dropout (class conditioning only).
  """

  def __init__(self, data, data_dir: str, tokenizer, *, seq_len: int,
               batch_size: int, seed: int,
               rows: Sequence[int] | None = None,
               writes: Sequence[int] | None = None,
               label_dropout: float = 0.0):
    self.batch_size = batch_size
    self.num_streams = num_streams(data, batch_size=batch_size)
    per_stream = batch_size // self.num_streams
    self.rows = _checked_rows(rows, batch_size)
    self.streams = sorted({r // per_stream for r in self.rows})
    self.writes = self.streams if writes is None else sorted(writes)
    if not set(self.writes) <= set(self.streams):
      raise DataError(f"Streams to save {self.writes} must be among those "
                      f"this process reads, {self.streams}.")
    if data.loader_workers * len(self.streams) > MAX_WORKER_PROCESSES:
      logging.warning(  # 512 processes took ~48 GiB (benchmarks/RESULTS.md).
          "config.data.loader_workers=%d per stream x %d streams on this "
          "process = %d worker processes (~94 MiB and ~70 threads each); set "
          "loader_workers=0, or config.data.streams to a few (e.g. 8) with "
          "workers.", data.loader_workers, len(self.streams),
          data.loader_workers * len(self.streams))
    # Row r is row r % per_stream of its stream's part of the concatenation.
    where = {j: i for i, j in enumerate(self.streams)}
    self._take = np.array([where[r // per_stream] * per_stream + r % per_stream
                           for r in self.rows])
    stored = prepare.load_manifest(data_dir)["codec"]  # Once per run.
    codecs.warn_on_version_differences(
        stored, codecs.from_settings(stored),
        f"{data_dir}/{prepare.MANIFEST}")
    # The reading threads are shared out among the streams of this process.
    threads = max(1, READ_OPTIONS.num_threads // len(self.streams))
    options = grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(
            threads, READ_OPTIONS.prefetch_buffer_size // len(self.streams)))
    order = _tokenized_order(data, data_dir, tokenizer, seed=seed,
                             label_dropout=label_dropout)
    self._iters = {}
    for j in self.streams:
      ds = order[j::self.num_streams]
      ds = _windows(data, ds.to_iter_dataset(options), tokenizer,
                    seq_len=seq_len,
                    num_bins=max(per_stream, MIN_PACKING_BINS))
      ds = ds.batch(per_stream, drop_remainder=True)
      if data.loader_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data.loader_workers))
      self._iters[j] = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(self._iters[j]) for j in self.streams]
    return {k: np.concatenate([p[k] for p in parts])[self._take]
            for k in BATCH_KEYS}

  def get_state(self) -> dict[str, Any]:
    return {"batch_size": self.batch_size,
            "streams": {str(j): it.get_state()
                        for j, it in self._iters.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    if state["batch_size"] != self.batch_size:
      raise DataError(
          f"The saved data position is for config.batch_size="
          f"{state['batch_size']}, this run has {self.batch_size}; resume "
          "with the batch size the run was started with.")
    missing = [j for j in self.streams if str(j) not in state["streams"]]
    if missing:
      raise DataError(f"The saved data position lacks streams {missing} of "
                      f"this process's {self.streams}.")
    for j, it in self._iters.items():
      it.set_state(_from_json(state["streams"][str(j)]))

  def close(self) -> None:
    for it in self._iters.values():
      if hasattr(it, "close"):
        it.close()


def stream_writers(data, rows_by_process: dict[int, Sequence[int]], *,
                   batch_size: int) -> dict[int, int]:
  """stream -> the lowest process reading it: the one that saves it."""
  per_stream = batch_size // num_streams(data, batch_size=batch_size)
  writers = {}
  for process in sorted(rows_by_process):
    for r in rows_by_process[process]:
      writers.setdefault(r // per_stream, process)
  return writers

def eval_batches(data, data_dir: str, tokenizer, *, seq_len: int,
                 batch_size: int, rows: Sequence[int] | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The held-out split once, in a fixed order: `rows` of each global batch.

  Every process builds the same window stream (the eval split is small) and
  global batch g is windows [g*G, (g+1)*G) with G = batch_size; a
  process yields the rows its devices hold (default: all). So all processes
  yield the same number of batches (a collective step never waits forever)
  and the result does not depend on the process count. The tail is padded
  with windows whose loss_mask is 0.
  """
  rows = _checked_rows(rows, batch_size)
  if conditioning.enabled(data):  # Every example keeps its class.
    conditioning.check(data_dir, prepare.load_manifest(data_dir), tokenizer)
    ds = _records(data_dir, "eval", labelled=True).map_with_index(
        conditioning.ClassTokenize(tokenizer))
  else:
    ds = _records(data_dir, "eval").map(Tokenize(tokenizer))
  ds = ds.to_iter_dataset(READ_OPTIONS)
  windows = iter(_windows(data, ds, tokenizer, seq_len=seq_len,
                          num_bins=batch_size))
  padding = _padding_window(seq_len, tokenizer.pad_id)
  while True:
    batch = []
    for _ in range(batch_size):
      try:
        batch.append(next(windows))
      except StopIteration:
        break
    if not batch:
      return
    mine = [batch[r] if r < len(batch) else padding for r in rows]
    yield {k: np.stack([w[k] for w in mine]) for k in BATCH_KEYS}
    if len(batch) < batch_size:
      return


def _from_json(stream_state: dict) -> dict:
  """A stream's Grain state as read back from JSON, its tuples tuples again.

  Concat-then-split stores "no remainder" as (-1, -1) slices and tests them
  with `!= (-1, -1)`: the list JSON makes of them read as a remainder, and
  the restored stream skipped ahead (a row of the first batch differed).
  """
  slices = stream_state.get("remainder_slices")
  if not isinstance(slices, dict):
    return stream_state
  return {**stream_state,
          "remainder_slices": {k: tuple(v) for k, v in slices.items()}}


def _padding_window(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  zeros = np.zeros(seq_len, np.int32)
  return dict(inputs=np.full(seq_len, pad_id, np.int32),
              targets=np.full(seq_len, pad_id, np.int32), segment_ids=zeros,
              positions=zeros, loss_mask=np.zeros(seq_len, np.float32))
