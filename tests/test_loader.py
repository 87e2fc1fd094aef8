"""Loader: batches decode to the stored bytes; streams, packing, state."""

import collections
import json
import os

from absl import flags
from array_record.python import array_record_module
import numpy as np
import pytest

from codeclm.data import loader
from codeclm.data import prepare
from codeclm.data.sources.base import DataError
from codeclm.tokenizer import ByteBPE
from tests.test_sources import make_config

NUM, EVAL = 30, 5


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Synthetic 32x32 pictures as shards, plus their BPE."""
  out = str(tmp_path_factory.mktemp("data"))
  config = make_config(num_examples=NUM, eval_examples=EVAL,
                       examples_per_shard=8)
  manifest = prepare.run(config.data, config.codec, out, seed=config.seed,
                         process_index=0, process_count=1, progress=False)
  tokenizer = ByteBPE.load(os.path.join(out, "tokenizer.json"))
  records = {}
  for split in ("train", "eval"):
    records[split] = []
    for path in prepare.shard_paths(out, manifest, split):
      reader = array_record_module.ArrayRecordReader(path)
      records[split] += reader.read_all()
      reader.close()
  assert len(records["train"]) == NUM - EVAL
  return out, tokenizer, records


def config_for(**data):
  """Batch 4; one stream unless `streams` says otherwise, so consecutive rows
  are consecutive windows of one token stream."""
  data.setdefault("streams", 1)
  config = make_config(num_examples=NUM, eval_examples=EVAL,
                       examples_per_shard=8, **data)
  config.seq_len = 256
  config.batch_size = 4
  return config


def train_batches(config, data_dir, tokenizer, rows=None, **kwargs):
  """loader.TrainBatches with a test config's data section and scalars."""
  return loader.TrainBatches(config.data, data_dir, tokenizer,
                             seq_len=config.seq_len,
                             batch_size=config.batch_size, seed=config.seed,
                             rows=rows, **kwargs)


def eval_batches(config, data_dir, tokenizer, rows=None):
  """loader.eval_batches with a test config's data section and scalars."""
  return loader.eval_batches(config.data, data_dir, tokenizer,
                             seq_len=config.seq_len,
                             batch_size=config.batch_size, rows=rows)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def windows(batches):
  """Rows of consecutive batches, in order."""
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      yield {k: v[r] for k, v in b.items()}


def segments(row):
  """The token runs of a row, one per segment id, rebuilt from inputs+targets.

  A run's tokens are its inputs, plus the final target when the loss mask
  says that target is still in the run (the window's last token).
  """
  runs = []
  for s in np.unique(row["segment_ids"]):
    if s == 0:
      continue
    idx = np.flatnonzero(row["segment_ids"] == s)
    assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))  # Contiguous.
    tokens = list(row["inputs"][idx])
    if row["loss_mask"][idx[-1]]:
      tokens.append(row["targets"][idx[-1]])
    runs.append(tokens)
  return runs


def examples(stream, tokenizer):
  """Cut a concatenated token stream at BOS...EOS into decoded byte strings."""
  stream = np.asarray(stream)
  bos = np.flatnonzero(stream == tokenizer.bos_id)
  eos = np.flatnonzero(stream == tokenizer.eos_id)
  out = []
  for b in bos:
    after = eos[eos > b]
    if not len(after):
      break
    out.append(tokenizer.decode(stream[b + 1:after[0]].tolist()))
  return out


def check_shapes(batch, batch_size, seq_len):
  assert sorted(batch) == sorted(loader.BATCH_KEYS)
  for k, v in batch.items():
    assert v.shape == (batch_size, seq_len), k
    assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k


# -- concat --------------------------------------------------------------------


def test_concat_batches_decode_to_the_records_each_epoch(prepared):
  data_dir, tokenizer, records = prepared
  config = config_for()
  it = train_batches(config, data_dir, tokenizer)
  batches = take(it, 40)
  stream = []
  for b in batches:
    check_shapes(b, 4, 256)
    assert (b["segment_ids"] == 1).all() and (b["loss_mask"] == 1).all()
    assert (b["positions"] == np.arange(256)).all()
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  for row in windows(batches):
    stream += list(row["inputs"]) + [row["targets"][-1]]  # Window = L + 1.
  decoded = examples(stream, tokenizer)
  n = len(records["train"])
  assert len(decoded) >= 2 * n + 1, "take more batches"
  first, second = decoded[:n], decoded[n:2 * n]
  assert sorted(first) == sorted(records["train"])  # Each once per epoch.
  assert sorted(second) == sorted(records["train"])
  assert first != second  # Reshuffled each epoch.
  assert first != records["train"]  # Shuffled at all.


def test_concat_is_seeded(prepared):
  data_dir, tokenizer, _ = prepared
  def first_batches(seed):
    config = config_for()
    config.seed = seed
    return take(train_batches(config, data_dir, tokenizer), 3)
  a, b, c = first_batches(0), first_batches(0), first_batches(1)
  assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
  assert not all(np.array_equal(x["inputs"], y["inputs"])
                 for x, y in zip(a, c))


# -- pack ----------------------------------------------------------------------


def test_pack_keeps_whole_examples_with_right_segments(prepared):
  data_dir, tokenizer, records = prepared
  lengths = [len(tokenizer.encode(r)) + 2 for r in records["train"]]
  config = config_for(packing="pack")
  config.seq_len = max(lengths) + 40  # Every example fits a window.
  it = train_batches(config, data_dir, tokenizer)
  batches = take(it, 12)
  counts = collections.Counter()
  for b in batches:
    check_shapes(b, 4, config.seq_len)
  for row in windows(batches):
    seg, pos, mask = row["segment_ids"], row["positions"], row["loss_mask"]
    used = np.flatnonzero(seg)
    assert len(used) and np.array_equal(used, np.arange(len(used)))
    assert (mask[len(used):] == 0).all()  # Padding at the end, masked.
    ids = seg[used]
    assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}  # 1, 2, 3, ...
    for s in np.unique(ids):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(pos[idx], np.arange(len(idx)))  # Restart at 0.
    # Loss only where the next token is in the same segment, and right there.
    same = np.append((seg[1:] == seg[:-1]) & (seg[:-1] != 0), mask[-1] > 0)
    np.testing.assert_array_equal(mask > 0, same)
    inside = np.flatnonzero(mask[:-1])
    np.testing.assert_array_equal(row["targets"][inside],
                                  row["inputs"][inside + 1])
    for run in segments(row):
      assert run[0] == tokenizer.bos_id and run[-1] == tokenizer.eos_id
      counts[tokenizer.decode(run[1:-1])] += 1  # Never split: decodes whole.
  assert set(counts) == set(records["train"])  # Nothing else, all present.
  assert max(counts.values()) <= 1 + min(counts.values())


@pytest.mark.parametrize("drop_long", [False, True])
def test_pack_splits_or_drops_long_examples(prepared, drop_long):
  data_dir, tokenizer, records = prepared
  lengths = sorted(len(tokenizer.encode(r)) + 2 for r in records["train"])
  config = config_for(packing="pack", drop_long=drop_long)
  config.seq_len = lengths[len(lengths) // 2]  # About half do not fit.
  window = config.seq_len + 1
  long = {r for r in records["train"] if len(tokenizer.encode(r)) + 2 > window}
  assert long and len(long) < len(records["train"])
  it = train_batches(config, data_dir, tokenizer)
  pieces = [run for row in windows(take(it, 30)) for run in segments(row)]
  whole = [tokenizer.decode(p[1:-1]) for p in pieces
           if p[0] == tokenizer.bos_id and p[-1] == tokenizer.eos_id]
  assert set(whole) == set(records["train"]) - long  # Short ones whole.
  if drop_long:
    assert len(whole) == len(pieces)  # No pieces of long ones.
    return
  # Long ones arrive as window-sized pieces overlapping by one token (so no
  # target is lost); pieces of one example may land in different rows.
  expected = set()
  for r in long:
    tokens = [tokenizer.bos_id, *tokenizer.encode(r), tokenizer.eos_id]
    expected |= {tuple(tokens[i:i + window])
                 for i in range(0, len(tokens) - 1, window - 1)}
  got = {tuple(p) for p in pieces
         if not (p[0] == tokenizer.bos_id and p[-1] == tokenizer.eos_id)}
  assert got == expected


# -- processes, state ----------------------------------------------------------


def stream_examples(batches, rows, tokenizer):
  """The examples of the token stream that `rows` of consecutive batches
  continue (the rows of one loader stream)."""
  stream = []
  for b in batches:
    for r in rows:
      stream += list(b["inputs"][r]) + [b["targets"][r, -1]]
  return examples(stream, tokenizer)


def test_row_at_step_is_a_window_of_its_stream_over_the_global_order(
    prepared):
  """The global position: 4 rows, 2 streams. Rows 0-1 are stream 0, which
  reads global record positions 0, 2, 4, ...; rows 2-3 are stream 1
  (positions 1, 3, 5, ...); the first n positions are every record once (an
  epoch). A process holding any rows gets exactly those rows of the same
  global batches."""
  data_dir, tokenizer, records = prepared
  config = config_for(streams=2)
  n = len(records["train"])
  order = loader.record_order(data_dir, seed=config.seed)
  assert sorted(order[i] for i in range(n)) == sorted(records["train"])
  full = take(train_batches(config, data_dir, tokenizer), 30)
  for j in range(2):
    decoded = stream_examples(full, (2 * j, 2 * j + 1), tokenizer)
    assert len(decoded) > n // 2, "take more batches"  # Past an epoch.
    assert decoded == [order[i] for i in range(j, 2 * len(decoded), 2)]
  for rows in ([1, 2], [3], [0, 3]):
    part = train_batches(config, data_dir, tokenizer, rows)
    assert part.streams == sorted({r // 2 for r in rows})
    for whole, mine in zip(full, take(part, 6)):
      check_shapes(mine, len(rows), config.seq_len)
      for k in loader.BATCH_KEYS:
        np.testing.assert_array_equal(whole[k][rows], mine[k])


def test_position_moves_between_process_counts(prepared):
  """Two "processes" (rows 0-1 and 2-3) save their streams; one process
  resumes from both files, and its state resumes a process holding rows 1-2:
  each continues the straight run's global batches."""
  data_dir, tokenizer, _ = prepared
  config = config_for(streams=2)
  straight = take(train_batches(config, data_dir, tokenizer), 10)
  halves = [train_batches(config, data_dir, tokenizer, rows, writes=[p])
            for p, rows in enumerate(([0, 1], [2, 3]))]
  saved = {}
  for half in halves:
    take(half, 5)
    saved.update(half.get_state()["streams"])
  one = train_batches(config, data_dir, tokenizer)
  one.set_state(json.loads(json.dumps(dict(batch_size=4, streams=saved))))
  resumed = take(one, 3)
  other = train_batches(config, data_dir, tokenizer, [1, 2])
  other.set_state(json.loads(json.dumps(one.get_state())))
  resumed += take(other, 2)
  for i, (want, got) in enumerate(zip(straight[5:], resumed)):
    rows = slice(None) if i < 3 else [1, 2]
    for k in loader.BATCH_KEYS:
      np.testing.assert_array_equal(want[k][rows], got[k])


@pytest.mark.parametrize("packing,workers", [("concat", 0), ("pack", 0),
                                             ("concat", 1)])
def test_restored_iterator_yields_the_same_batches(prepared, packing, workers):
  data_dir, tokenizer, _ = prepared
  if workers and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags (main does).
  config = config_for(packing=packing, loader_workers=workers)
  it = train_batches(config, data_dir, tokenizer)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # Checkpointable as JSON.
  expected = take(it, 7)
  fresh = train_batches(config, data_dir, tokenizer)
  fresh.set_state(state)
  for a, b in zip(expected, take(fresh, 7)):
    for k in loader.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
  for i in (it, fresh):
    i.close()


# -- eval ----------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["concat", "pack"])
def test_eval_is_finite_ordered_padded_and_split(prepared, packing):
  data_dir, tokenizer, records = prepared
  config = config_for(packing=packing)
  if packing == "pack":
    config.seq_len = 1024  # Whole examples, one per segment.
  single = list(eval_batches(config, data_dir, tokenizer))
  assert single, "no eval batches"
  again = list(eval_batches(config, data_dir, tokenizer))
  for b, c in zip(single, again, strict=True):
    check_shapes(b, 4, config.seq_len)
    for k in loader.BATCH_KEYS:
      np.testing.assert_array_equal(b[k], c[k])  # Deterministic.
  runs = [run for row in windows(single) for run in segments(row)]
  if packing == "concat":
    decoded = examples([t for run in runs for t in run], tokenizer)
    assert decoded == records["eval"]  # In order, once, nothing else.
  else:
    decoded = [tokenizer.decode(run[1:-1]) for run in runs]
    assert sorted(decoded) == sorted(records["eval"])
  rows = [row for row in windows(single)]
  if packing == "concat":  # Windows and padding exactly as the sizes imply.
    total = sum(len(tokenizer.encode(r)) + 2 for r in records["eval"])
    full, rest = divmod(total, config.seq_len + 1)
    real = full + (rest > 0)
    assert len(single) == -(-real // 4)
    for row in rows[:full]:
      assert row["loss_mask"].sum() == config.seq_len
    if rest:
      assert rows[full]["loss_mask"].sum() == rest - 1  # Padded window.
      assert rows[full]["segment_ids"].sum() == min(rest, config.seq_len)
    padding = rows[real:]
  else:
    empty = [i for i, row in enumerate(rows) if not row["segment_ids"].any()]
    assert all(i >= len(rows) - 4 for i in empty)  # Only in the last batch.
    assert len(empty) < 4
    padding = [rows[i] for i in empty]
  for row in padding:  # Whole padding rows carry no loss.
    assert not row["loss_mask"].any() and not row["segment_ids"].any()
  # Two processes: same number of batches; together the single-process ones.
  halves = [list(eval_batches(config, data_dir, tokenizer, [2 * p, 2 * p + 1]))
            for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(single)
  for whole, a, b in zip(single, *halves):
    for k in loader.BATCH_KEYS:
      np.testing.assert_array_equal(whole[k], np.concatenate([a[k], b[k]]))


def test_clear_errors(prepared, tmp_path):
  data_dir, tokenizer, _ = prepared
  with pytest.raises(DataError, match="run --mode=prepare first"):
    train_batches(config_for(), str(tmp_path), tokenizer)
  with pytest.raises(DataError, match="streams=3 must divide"):
    train_batches(config_for(streams=3), data_dir, tokenizer)
  with pytest.raises(DataError, match=r"Rows .* \[0, 4\)"):
    train_batches(config_for(), data_dir, tokenizer, rows=[2, 4])
  with pytest.raises(DataError, match="packing"):
    train_batches(config_for(packing="zip"), data_dir, tokenizer)
  with pytest.raises(DataError, match="batch_size=4, this run has 8"):
    config = config_for()
    saved = train_batches(config, data_dir, tokenizer).get_state()
    config.batch_size = 8
    train_batches(config, data_dir, tokenizer).set_state(saved)


def test_a_position_saved_on_a_record_boundary_resumes_exactly(prepared):
  """A concat stream saved where no record is cut (here: before the first
  batch) has no remainder, stored by Grain as (-1, -1) slices. JSON makes
  them lists, which Grain's != (-1, -1) check took for a remainder: the
  restored stream then skipped ahead and its rows differed."""
  data_dir, tokenizer, _ = prepared
  config = config_for(packing="concat")
  state = json.loads(json.dumps(train_batches(config, data_dir,
                                              tokenizer).get_state()))
  assert any(s.get("remainder_slices") for s in state["streams"].values())
  expected = take(train_batches(config, data_dir, tokenizer), 3)
  fresh = train_batches(config, data_dir, tokenizer)
  fresh.set_state(state)
  for a, b in zip(expected, take(fresh, 3)):
    for k in loader.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
