"""Byte-level BPE over codec bytes, with BOS/EOS; an exact bytes <-> ids map.

Owns the vocabulary: training it with Hugging Face `tokenizers`, saving and
loading it as tokenizer.json, and turning byte strings into token ids and back.

Counting (as in Jpeg-LM): `vocab_size` at training counts BPE entries, the 256
single bytes included, so the JPEG default of 320 means 256 bytes + 64 merges
(AVC: 1024 = 256 + 768). BOS and EOS are two extra ids after those entries, so
the model's embedding has `ByteBPE.vocab_size` = 320 + 2 = 322 rows. There is
no separate padding token: `pad_id` is EOS, because padded positions are masked
out of the loss and attention, so a third special would be an embedding row
that is never trained.

Ids: 0..255 are the single bytes, in byte order (id b is byte b); 256.. are the
merges in the order they were learned; then BOS, EOS.

How bytes become text for `tokenizers`: byte b is the character chr(b)
(latin-1), so any byte string is a str of characters U+0000..U+00FF and back,
with nothing lost (NUL and control characters included). There is no
normalizer and no pre-tokenizer, so a whole example is one "word" and merges
may span any bytes. The BPE's initial alphabet holds all 256 characters, so
every byte has an id even when the training data lacks it. The special tokens'
names contain characters above U+00FF ("⟨bos⟩", "⟨eos⟩"), which no input can
contain: encode() never emits them and never splits data on them, even data
that holds the literal bytes "<|bos|>" or the UTF-8 of "⟨bos⟩".

The ids <-> bytes map is exact for every byte string: decode(encode(x)) == x.
Training is deterministic (same examples in the same order -> identical
tokenizer.json). Should the data hold fewer distinct pairs than merges asked
for, the trainer stops early and `train` warns with the size it reached.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Sequence
import warnings

import numpy as np
from tokenizers import AddedToken
from tokenizers import decoders
from tokenizers import models
from tokenizers import Tokenizer
from tokenizers import trainers

NUM_BYTES = 256
BOS = "\u27e8bos\u27e9"  # ⟨bos⟩: outside latin-1, so never made from bytes.
EOS = "\u27e8eos\u27e9"  # ⟨eos⟩
SPECIALS = (BOS, EOS)
_TRAIN_BATCH = 64  # Examples handed to the Rust trainer per batch.


def _text(data) -> str:
  """A byte string as latin-1 text: byte b -> chr(b)."""
  if isinstance(data, str):
    raise TypeError(
        "ByteBPE encodes bytes, not str; got str starting "
        f"{data[:20]!r}. Pass the codec's bytes (or text.encode('utf-8')).")
  if not isinstance(data, bytes):
    try:
      data = bytes(memoryview(data))
    except TypeError:
      raise TypeError(f"ByteBPE encodes bytes; got {type(data).__name__}. "
                      "Pass bytes, bytearray or memoryview.") from None
  return data.decode("latin-1")


class ByteBPE:
  """A byte-level BPE with BOS/EOS (see the module docstring for the ids).

  Attributes:
    vocab_size: every id, specials included: the model's embedding size.
    num_entries: BPE entries (256 bytes + merges), i.e. ids below bos_id.
    bos_id, eos_id: the two specials, right after the BPE entries.
    pad_id: equals eos_id (padding is masked, so needs no id of its own).
  """

  def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer"):
    """Wraps a `tokenizers.Tokenizer` built by `train`; checks it (see load)."""
    self._check(tokenizer, source)
    self._tokenizer = tokenizer
    self.num_entries = tokenizer.get_vocab_size(with_added_tokens=False)
    self.bos_id = self.num_entries
    self.eos_id = self.num_entries + 1
    self.pad_id = self.eos_id
    self.vocab_size = self.num_entries + len(SPECIALS)
    # bytes of each id, specials empty: decode is a lookup and a join.
    self._pieces = [tokenizer.id_to_token(i).encode("latin-1")
                    for i in range(self.num_entries)] + [b""] * len(SPECIALS)

  # -- building ----------------------------------------------------------------

  @classmethod
  def train(cls, examples: Iterable[bytes], vocab_size: int = 320) -> ByteBPE:
    """Learns vocab_size - 256 merges from `examples` (each one byte string).

    vocab_size counts BPE entries with the 256 bytes, not BOS/EOS. Warns if the
    data runs out of pairs to merge before reaching it.
    """
    if not isinstance(vocab_size, int) or vocab_size < NUM_BYTES:
      raise ValueError(
          f"vocab_size={vocab_size!r} must be an int >= {NUM_BYTES}: it counts "
          "the 256 single bytes plus the merges (Jpeg-LM: 320, Avc-LM: 1024).")
    tokenizer = Tokenizer(models.BPE())
    # Fuse joins tokens without spaces, so the file alone decodes correctly.
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=0, show_progress=False,
        initial_alphabet=[chr(b) for b in range(NUM_BYTES)])
    tokenizer.train_from_iterator(_batches(examples), trainer)
    reached = tokenizer.get_vocab_size(with_added_tokens=False)
    if reached < vocab_size:
      warnings.warn(
          f"ByteBPE.train: asked for {vocab_size} BPE entries but the training "
          f"data only allowed {reached} ({reached - NUM_BYTES} merges): it has "
          "too few distinct byte pairs. The tokenizer is usable with "
          f"vocab_size={reached + len(SPECIALS)}; train on more or longer "
          "examples to reach the requested size.", stacklevel=2)
    tokenizer.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return cls(tokenizer)

  @classmethod
  def from_json(cls, s: str, source: str = "tokenizer JSON") -> ByteBPE:
    """The tokenizer `to_json` wrote; `source` names it in errors."""
    try:
      tokenizer = Tokenizer.from_str(s)
    except Exception as e:  # tokenizers raises a bare Exception.
      raise ValueError(
          f"{source} is not a valid tokenizer.json ({e}); write it with "
          "ByteBPE.save or train a new one with ByteBPE.train.") from e
    return cls(tokenizer, source)

  @classmethod
  def load(cls, path: str | os.PathLike) -> ByteBPE:
    """Reads a tokenizer.json written by `save`."""
    try:
      with open(path, encoding="utf-8") as f:
        s = f.read()
    except OSError as e:
      raise ValueError(
          f"Cannot read tokenizer file {os.fspath(path)!r} ({e}); point at the "
          "tokenizer.json that data preparation wrote.") from e
    return cls.from_json(s, source=repr(os.fspath(path)))

  def to_json(self) -> str:
    """The whole tokenizer as tokenizer.json text (deterministic)."""
    return self._tokenizer.to_str(pretty=True)

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
      f.write(self.to_json())

  @staticmethod
  def _check(tokenizer: Tokenizer, source: str) -> None:
    """Raises unless `tokenizer` is laid out as `train` makes it."""
    config = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    problems = []
    if config["model"]["type"] != "BPE":
      problems.append(f"model is {config['model']['type']}, not BPE")
    if config.get("normalizer") or config.get("pre_tokenizer"):
      problems.append("it has a normalizer or pre-tokenizer")
    bad_bytes = [b for b in range(NUM_BYTES) if vocab.get(chr(b)) != b]
    if bad_bytes:
      problems.append(f"{len(bad_bytes)} single bytes (first "
                      f"{bad_bytes[0]:#04x}) do not have id = byte value")
    if any(not t or max(t) > "\xff" for t in vocab):
      problems.append("entries are empty or hold characters outside latin-1")
    n = len(vocab)
    specials = [tokenizer.token_to_id(s) for s in SPECIALS]
    if specials != [n, n + 1] or tokenizer.get_vocab_size() != n + 2:
      problems.append(f"specials {SPECIALS} are not exactly ids {n}, {n + 1}")
    if problems:
      raise ValueError(
          f"{source} is not a ByteBPE tokenizer: {'; '.join(problems)}. Train "
          "one with ByteBPE.train (or codeclm's prepare mode).")

  # -- using -------------------------------------------------------------------

  def encode(self, data: bytes) -> np.ndarray:
    """int32 token ids of a byte string, without BOS/EOS."""
    # The batch API skips computing character offsets: about 2x faster.
    enc = self._tokenizer.encode_batch_fast([_text(data)],
                                            add_special_tokens=False)[0]
    return np.array(enc.ids, np.int32)

  def encode_batch(self, datas: Sequence[bytes]) -> list[np.ndarray]:
    """encode() of each byte string, in parallel over the library's threads."""
    encs = self._tokenizer.encode_batch_fast([_text(d) for d in datas],
                                             add_special_tokens=False)
    return [np.array(e.ids, np.int32) for e in encs]

  def decode(self, ids) -> bytes:
    """The bytes of a sequence of ids; BOS/EOS/PAD ids are dropped."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (ids.size == 0 or
                             np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"decode() takes a 1-D sequence of int ids; got shape "
                       f"{ids.shape} dtype {ids.dtype}. Decode rows one by one.")
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      bad = ids[(ids < 0) | (ids >= self.vocab_size)]
      raise ValueError(
          f"decode() got ids outside [0, {self.vocab_size}), e.g. "
          f"{bad[:5].tolist()}: they were not made by this tokenizer (was the "
          "model built with vocab_size=tokenizer.vocab_size?).")
    pieces = self._pieces
    return b"".join([pieces[i] for i in ids.tolist()])

  def __repr__(self) -> str:
    return (f"ByteBPE(entries={self.num_entries}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, vocab_size={self.vocab_size})")


def _batches(examples: Iterable[bytes]) -> Iterator[list[str]]:
  """Examples as lists of latin-1 text, which the trainer reads in parallel."""
  batch = []
  for data in examples:
    batch.append(_text(data))
    if len(batch) == _TRAIN_BATCH:
      yield batch
      batch = []
  if batch:
    yield batch
