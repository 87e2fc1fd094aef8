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
tokenizer.json).

Class tokens (data.conditioning="class", `with_classes`): after EOS, one id
per class in label order, then one "no class" id (label dropout, unguided
sampling). Their names ("⟨class 3: cat⟩", "⟨no class⟩") are outside latin-1
too, so no data can make them; decode() drops them like BOS/EOS. The names in
tokenizer.json are what tells a workdir which id is which class. Should the data hold fewer distinct pairs than merges asked
for, the trainer stops early and `train` warns with the size it reached.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Sequence
import warnings

from etils import epath
import numpy as np
from tokenizers import AddedToken
from tokenizers import decoders
from tokenizers import models
from tokenizers import processors
from tokenizers import Tokenizer
from tokenizers import trainers

NUM_BYTES = 256
BOS = "\u27e8bos\u27e9"  # ⟨bos⟩: outside latin-1, so never made from bytes.
EOS = "\u27e8eos\u27e9"  # ⟨eos⟩
SPECIALS = (BOS, EOS)
NO_CLASS = "\u27e8no class\u27e9"  # ⟨no class⟩


def class_token(index: int, name: str) -> str:
  """The token of class `index` ("⟨class 3: cat⟩"); unique by index."""
  return f"\u27e8class {index}: {name}\u27e9"


def _class_name(index: int, token: str) -> str | None:
  """The class name in `token` if it is class_token(index, name), else None."""
  head, tail = f"\u27e8class {index}: ", "\u27e9"
  if token.startswith(head) and token.endswith(tail):
    return token[len(head):-len(tail)]
  return None
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


def _checked_ids(ids, vocab_size: int) -> np.ndarray:
  """decode()'s input as a 1-D int array, or an error naming what is wrong."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or not (ids.size == 0 or
                           np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"decode() takes a 1-D sequence of int ids; got shape "
                     f"{ids.shape} dtype {ids.dtype}. Decode rows one by one.")
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    raise ValueError(
        f"decode() got ids outside [0, {vocab_size}), e.g. "
        f"{bad[:5].tolist()}: they were not made by this tokenizer (was the "
        "model built with vocab_size=tokenizer.vocab_size?).")
  return ids


class ByteBPE:
  """A byte-level BPE with BOS/EOS (see the module docstring for the ids).

  Attributes:
    vocab_size: every id, specials included: the model's embedding size.
    num_entries: BPE entries (256 bytes + merges), i.e. ids below bos_id.
    bos_id, eos_id: the two specials, right after the BPE entries.
    pad_id: equals eos_id (padding is masked, so needs no id of its own).
    class_names: the classes whose tokens follow EOS ([] = unconditional).
    no_class_id: the "no class" token after them (None without classes).
  """

  def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer"):
    """Wraps a `tokenizers.Tokenizer` built by `train`; checks it (see load)."""
    self.class_names = tuple(self._check(tokenizer, source))
    self._tokenizer = tokenizer
    self.num_entries = tokenizer.get_vocab_size(with_added_tokens=False)
    self.bos_id = self.num_entries
    self.eos_id = self.num_entries + 1
    self.pad_id = self.eos_id
    extra = len(self.class_names) + 1 if self.class_names else 0
    self.no_class_id = self.eos_id + extra if extra else None
    self.vocab_size = self.num_entries + len(SPECIALS) + extra
    # bytes of each id, specials empty: decode is a lookup and a join.
    self._pieces = [tokenizer.id_to_token(i).encode("latin-1")
                    for i in range(self.num_entries)] + [b""] * (
                        len(SPECIALS) + extra)

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

  @staticmethod
  def load(path: str | os.PathLike):
    """Reads a workdir's tokenizer.json: a ByteBPE, or the ByteCharTokenizer
    of an imported model (the same interface); see `load` below."""
    return load(path)

  def with_classes(self, names: Sequence[str]) -> ByteBPE:
    """This tokenizer with a token per class and "no class" after EOS.

    Its BPE ids, BOS and EOS stay the same; an existing class list is
    replaced (the names must be those of the data's labels, in order).
    """
    names = [str(n) for n in names]
    if not names:
      raise ValueError("with_classes needs at least one class name (the "
                       "data's label names).")
    config = json.loads(self.to_json())
    config["added_tokens"] = config["added_tokens"][:len(SPECIALS)]
    tokenizer = Tokenizer.from_str(json.dumps(config))
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in
         [class_token(i, n) for i, n in enumerate(names)] + [NO_CLASS]])
    return type(self)(tokenizer)

  def class_id(self, label: int | None) -> int:
    """The token of class index `label`; None (or -1) = "no class"."""
    if not self.class_names:
      raise ValueError("This tokenizer has no class tokens: prepare the data "
                       "with --config.data.conditioning=class.")
    if label is None or label == -1:
      return self.no_class_id
    if not 0 <= label < len(self.class_names):
      raise ValueError(f"Class {label} is not one of the tokenizer's "
                       f"{len(self.class_names)} classes.")
    return self.eos_id + 1 + int(label)

  def to_json(self) -> str:
    """The whole tokenizer as tokenizer.json text (deterministic)."""
    return self._tokenizer.to_str(pretty=True)

  def save(self, path: str | os.PathLike) -> None:
    epath.Path(path).write_text(self.to_json(), encoding="utf-8")

  @staticmethod
  def _check(tokenizer: Tokenizer, source: str) -> list[str]:
    """Raises unless `tokenizer` is laid out as `train` (and `with_classes`)
    makes it; returns its class names ([] without class tokens)."""
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
    extra = tokenizer.get_vocab_size() - n - 2
    names = [_class_name(i, tokenizer.id_to_token(n + 2 + i) or "")
             for i in range(max(0, extra - 1))]
    if specials != [n, n + 1] or not (
        extra == 0 or extra >= 2 and None not in names and
        tokenizer.id_to_token(n + 1 + extra) == NO_CLASS):
      problems.append(f"specials {SPECIALS} are not exactly ids {n}, {n + 1}"
                      " (followed by class tokens and the no-class token)")
    if problems:
      raise ValueError(
          f"{source} is not a ByteBPE tokenizer: {'; '.join(problems)}. Train "
          "one with ByteBPE.train (or codeclm's prepare mode).")
    return names

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
    ids = _checked_ids(ids, self.vocab_size)
    pieces = self._pieces
    return b"".join([pieces[i] for i in ids.tolist()])

  def __repr__(self) -> str:
    classes = (f", classes={len(self.class_names)}, no_class_id="
               f"{self.no_class_id}" if self.class_names else "")
    return (f"ByteBPE(entries={self.num_entries}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}{classes}, vocab_size={self.vocab_size})")


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


# -- Hugging Face tokenizers over byte characters (Jpeg-LM) --------------------
#
# The released Jpeg-LM checkpoints read each byte b as the character
# chr(BRAILLE + b) (the Braille block) and run their own Llama-style tokenizer
# over that text. `ByteCharTokenizer` wraps such a tokenizer behind the same
# interface as ByteBPE (encode, encode_batch, decode, bos_id, eos_id, pad_id,
# vocab_size); a workdir stores it as a tokenizer.json that holds the Hugging
# Face tokenizer.json with the ids codeclm needs beside it. `load` reads either
# kind of file, and `to_hf` / `from_hf` turn a ByteBPE into a Hugging Face
# tokenizer over the same characters and back, exactly.

BRAILLE = 0x2800  # chr(BRAILLE + b) is byte b's character.
_FORMAT = "codeclm.ByteCharTokenizer"  # Key that marks the wrapper file.


def to_chars(data) -> str:
  """Bytes as Braille text: byte b -> chr(0x2800 + b)."""
  codes = np.frombuffer(_text(data).encode("latin-1"), np.uint8)
  return (codes.astype("<u4") + BRAILLE).tobytes().decode("utf-32-le")


def from_chars(text: str) -> bytes:
  """The bytes of Braille text; characters outside the 256 are dropped."""
  codes = np.frombuffer(text.encode("utf-32-le"), "<u4") - np.uint32(BRAILLE)
  return codes[codes < NUM_BYTES].astype(np.uint8).tobytes()


class ByteCharTokenizer:
  """A Hugging Face tokenizer over byte characters, with codeclm's interface.

  encode(bytes) -> ids without BOS/EOS; decode(ids) -> bytes, dropping special
  ids, ids past the tokenizer (a model's padded vocabulary) and any text that
  is not a byte character, so model output never fails to decode.

  Attributes:
    vocab_size: the model's embedding rows (may exceed the tokenizer's ids).
    bos_id, eos_id, pad_id: pad is EOS, as in ByteBPE.
    class_names, no_class_id: none (imported models are unconditional).
  """
  class_names = ()
  no_class_id = None

  def __init__(self, tokenizer: Tokenizer, *, bos_id: int, eos_id: int,
               vocab_size: int, source: str = "tokenizer"):
    self._tokenizer = tokenizer
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, eos_id
    self.vocab_size = vocab_size
    self.num_entries = tokenizer.get_vocab_size(with_added_tokens=True)
    if self.num_entries > vocab_size:
      raise ValueError(
          f"{source} has {self.num_entries} ids but the model has "
          f"vocab_size={vocab_size} embedding rows; use the tokenizer the "
          "model was trained with.")
    for name, i in (("bos_id", bos_id), ("eos_id", eos_id)):
      if not 0 <= i < self.num_entries:
        raise ValueError(f"{source}: {name}={i} is not an id of the tokenizer "
                         f"(0..{self.num_entries - 1}).")
    self._specials = {bos_id, eos_id} | {
        i for i, t in tokenizer.get_added_tokens_decoder().items()
        if t.special}
    self._check_covers_bytes(source)

  def _check_covers_bytes(self, source: str) -> None:
    """Raises unless every byte encodes to known ids and decodes back."""
    unk = self._tokenizer.model.unk_token if hasattr(
        self._tokenizer.model, "unk_token") else None
    unk_id = self._tokenizer.token_to_id(unk) if unk else None
    chars = [to_chars(bytes([b])) for b in range(NUM_BYTES)]
    encs = self._tokenizer.encode_batch_fast(chars, add_special_tokens=False)
    bad = [b for b, e in enumerate(encs)
           if not e.ids or unk_id in e.ids or self.decode(e.ids) != bytes([b])]
    if bad:
      raise ValueError(
          f"{source} cannot encode {len(bad)} of the 256 byte characters "
          f"chr(0x2800 + b) (first: byte {bad[0]:#04x}, character "
          f"{chars[bad[0]]!r}): they map to the unknown token or do not decode "
          "back. A Jpeg-LM tokenizer must cover the whole Braille block "
          "U+2800..U+28FF (or fall back to bytes).")

  @classmethod
  def from_json(cls, s: str, source: str = "tokenizer JSON"):
    wrapper = json.loads(s)
    try:
      tokenizer = Tokenizer.from_str(json.dumps(wrapper["tokenizer"]))
    except Exception as e:  # tokenizers raises a bare Exception.
      raise ValueError(f"{source} holds no valid Hugging Face tokenizer "
                       f"({e}); import the model again.") from e
    return cls(tokenizer, bos_id=wrapper["bos_id"], eos_id=wrapper["eos_id"],
               vocab_size=wrapper["vocab_size"], source=source)

  def to_json(self) -> str:
    return json.dumps(dict(
        format=_FORMAT, bos_id=self.bos_id, eos_id=self.eos_id,
        vocab_size=self.vocab_size,
        tokenizer=json.loads(self._tokenizer.to_str())), indent=1,
                      ensure_ascii=False)

  def save(self, path: str | os.PathLike) -> None:
    epath.Path(path).write_text(self.to_json(), encoding="utf-8")

  def hf_json(self) -> str:
    """The Hugging Face tokenizer.json inside."""
    return self._tokenizer.to_str(pretty=True)

  def encode(self, data: bytes) -> np.ndarray:
    """int32 token ids of a byte string, without BOS/EOS."""
    return self.encode_batch([data])[0]

  def encode_batch(self, datas: Sequence[bytes]) -> list[np.ndarray]:
    encs = self._tokenizer.encode_batch_fast([to_chars(d) for d in datas],
                                             add_special_tokens=False)
    return [np.array(e.ids, np.int32) for e in encs]

  def decode(self, ids) -> bytes:
    """The bytes of ids; specials, padding ids and non-byte text dropped."""
    ids = _checked_ids(ids, self.vocab_size)
    keep = [i for i in ids.tolist()
            if i < self.num_entries and i not in self._specials]
    return from_chars(self._tokenizer.decode(keep, skip_special_tokens=True))

  def __repr__(self) -> str:
    return (f"ByteCharTokenizer(ids={self.num_entries}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, vocab_size={self.vocab_size})")


def load(path: str | os.PathLike):
  """The tokenizer in a codeclm tokenizer.json: a ByteBPE or ByteCharTokenizer."""
  try:
    s = epath.Path(path).read_text(encoding="utf-8")
  except OSError as e:
    raise ValueError(
        f"Cannot read tokenizer file {os.fspath(path)!r} ({e}); point at the "
        "tokenizer.json that data preparation (or import_hf) wrote.") from e
  return from_json(s, repr(os.fspath(path)))


def from_json(s: str, source: str = "tokenizer JSON"):
  try:
    is_wrapper = json.loads(s).get("format") == _FORMAT
  except (ValueError, AttributeError):
    is_wrapper = False
  if is_wrapper:
    return ByteCharTokenizer.from_json(s, source)
  return ByteBPE.from_json(s, source)


# -- ByteBPE <-> a Hugging Face tokenizer over byte characters ----------------


def _map_tokens(config: dict, fn) -> dict:
  """A tokenizer.json dict with every BPE vocab entry and merge mapped by fn."""
  model = dict(config["model"])
  model["vocab"] = {fn(t): i for t, i in model["vocab"].items()}
  # Pairs, as tokenizers writes them ("a b" strings would be ambiguous here).
  model["merges"] = [[fn(a), fn(b)] for a, b in model["merges"]]
  return {**config, "model": model}


def to_hf(tokenizer: ByteBPE) -> Tokenizer:
  """The ByteBPE as a Hugging Face tokenizer over byte characters.

  Same ids; entries spelled in Braille characters (byte b -> chr(0x2800 + b)),
  as the Jpeg-LM releases read bytes; a post-processor puts BOS first, so
  `tokenizer(to_chars(prompt))` gives codeclm's prompt ids.
  """
  config = _map_tokens(json.loads(tokenizer.to_json()),
                       lambda t: to_chars(t.encode("latin-1")))
  hf = Tokenizer.from_str(json.dumps(config))
  hf.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
      special_tokens=[(BOS, tokenizer.bos_id)])
  return hf


def from_hf(tokenizer: Tokenizer) -> ByteBPE | None:
  """The ByteBPE that `to_hf` made this tokenizer from, or None if it is not one."""
  config = json.loads(tokenizer.to_str())
  vocab = config.get("model", {}).get("vocab", {})
  if (config["model"].get("type") != "BPE" or not isinstance(vocab, dict) or
      any(any(not BRAILLE <= ord(c) < BRAILLE + NUM_BYTES for c in t)
          for t in vocab)):
    return None
  config = _map_tokens(config, lambda t: from_chars(t).decode("latin-1"))
  config["post_processor"] = None
  try:
    return ByteBPE.from_json(json.dumps(config))
  except ValueError:
    return None
