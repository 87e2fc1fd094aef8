"""Class conditioning in the data: labels beside the records, a class token
after BOS, label dropout, and the class token at every window start.

With data.conditioning="class" an example is [BOS, class, ids..., EOS]; the
class token comes from the tokenizer (ids after EOS: one per label name, then
"no class", see tokenizer.py). Labels are not in the ArrayRecord shards (they
hold codec bytes only) but in each shard's metadata, so `split_labels` reads
them from there in record order and `LabelledRecords` serves (bytes, label).

Label dropout replaces the class by "no class" for a share `rate` of the
examples (classifier-free guidance needs the unconditional model too). It is
a function of (seed, the example's position in the global record order)
alone (`keeps_label`): no running RNG, so a resumed run, any number of
processes and any stream count drop the same examples.

Windows: every token carries its example's class token in a parallel
"classes" feature, so that a window cut inside an image still knows its
class; the loader puts that class token in front of such a window (see
loader.py: concat windows are cut one token shorter and start with the class
of their first token; "pack" pieces of a long example after the first start
with its class token).

Signatures take the config's data section, never the whole config.
"""

from __future__ import annotations

import os

import grain
import numpy as np

from codeclm.data.sources.base import DataError
from codeclm.runtime import storage

CONDITIONINGS = ("none", "class")
_DROPOUT_STREAM = 0xC1A55  # Separates dropout draws from other seeded draws.


def enabled(data) -> bool:
  """Whether `data` (the config's data section) asks for class tokens."""
  mode = data.get("conditioning", "none")
  if mode not in CONDITIONINGS:
    raise DataError(f"Unknown config.data.conditioning {mode!r}; use one of "
                    f"{CONDITIONINGS}.")
  return mode == "class"


def unlabelled_error(where: str) -> DataError:
  """The error for conditioning on data without labels: what to do."""
  return DataError(
      f"config.data.conditioning='class' needs labelled data, but {where} "
      "has no labels. Use a labelled source (data.source=synthetic_classes, "
      "folder:PATH with data.labels_from_folders=True, or a TFDS dataset "
      "with a label feature) and run --mode=prepare, or set "
      "--config.data.conditioning=none.")


def check(data_dir: str, manifest: dict, tokenizer) -> None:
  """Raises unless the prepared data has labels and the tokenizer their
  class tokens (a start-up check, before anything compiles)."""
  names = manifest.get("label_names")
  if not names:
    raise unlabelled_error(f"the data in {data_dir} (source "
                           f"{manifest.get('source')!r})")
  if tuple(getattr(tokenizer, "class_names", ())) != tuple(names):
    raise DataError(
        f"The tokenizer of {data_dir} has no class tokens for its "
        f"{len(names)} label names: it was prepared with data.conditioning="
        "'none'. Run --mode=prepare again with --config.data.conditioning="
        "class (finished shards are kept; only tokenizer.json and "
        "manifest.json are rewritten).")


def split_labels(data_dir: str, manifest: dict, split: str) -> np.ndarray:
  """The label of every record of `split`, in the loader's record order."""
  labels = []
  for shard in manifest["shards"]:
    if shard["split"] == split and shard["records"]:
      meta = os.path.join(data_dir, shard["path"].removesuffix(
          ".array_record") + ".json")
      labels.extend(storage.read_json(meta)["labels"])
  missing = sum(x is None for x in labels)
  if missing:
    raise unlabelled_error(f"{missing} of the {len(labels)} {split} examples "
                           f"in {data_dir}")
  return np.asarray(labels, np.int32)


class LabelledRecords:
  """A records source (ArrayRecord) with labels: item i is (bytes, label)."""

  def __init__(self, records, labels: np.ndarray):
    if len(records) != len(labels):
      raise DataError(f"{len(records)} records but {len(labels)} labels: the "
                      "shard metadata does not match its shards; prepare "
                      "again.")
    self.records, self.labels = records, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[bytes, int]:
    return self.records[index], int(self.labels[index])


def keeps_label(seed: int, position: int, rate: float) -> bool:
  """False for the examples label dropout gives "no class": a share `rate`,
  drawn from (seed, position in the record order) alone."""
  if rate <= 0:
    return True
  draw = np.random.default_rng((seed, _DROPOUT_STREAM, position)).random()
  return bool(draw >= rate)


class ClassTokenize(grain.transforms.MapWithIndex):
  """(bytes, label) at record-order position i -> tokens [BOS, class, ids...,
  EOS] and "classes", the class token repeated for every token."""

  def __init__(self, tokenizer, *, seed: int = 0, dropout: float = 0.0):
    if not 0 <= dropout <= 1:
      raise DataError(f"config.train.label_dropout={dropout} must lie in "
                      "[0, 1].")
    self.tokenizer, self.seed, self.dropout = tokenizer, seed, dropout

  def map_with_index(self, index: int, element) -> dict[str, np.ndarray]:
    data, label = element
    keep = keeps_label(self.seed, index, self.dropout)
    cls = self.tokenizer.class_id(label if keep else None)
    tok = self.tokenizer
    ids = np.asarray(tok.encode(data), np.int32)
    tokens = np.concatenate([np.array([tok.bos_id, cls], np.int32), ids,
                             np.array([tok.eos_id], np.int32)])
    return {"tokens": tokens, "classes": np.full(len(tokens), cls, np.int32)}


def labelled_dataset(records, labels: np.ndarray) -> grain.MapDataset:
  """A Grain MapDataset over (bytes, label) pairs."""
  return grain.MapDataset.source(LabelledRecords(records, labels))
