"""ByteBPE: exact round trip, ids layout, specials, BPE reference, determinism."""

import json
import os
import pathlib
import pickle
import subprocess
import sys
import warnings

from hypothesis import example
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import Tokenizer

from codeclm.tokenizer import ByteBPE

LITERAL_SPECIALS = (b"<|bos|>", b"<|eos|>", b"<s>", b"</s>", b"[PAD]",
                    "\u27e8bos\u27e9".encode("utf-8"),
                    "\u27e8eos\u27e9".encode("utf-8"))


def corpus(n: int = 40, size: int = 1500, seed: int = 0) -> list[bytes]:
  """Skewed random bytes (like entropy-coded data: many pairs repeat), with
  whitespace, NULs and the literal special names mixed in."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    x = np.minimum(rng.zipf(1.4, size), 255).astype(np.uint8).tobytes()
    out.append(x + b" \x00\n\t" * 3 + LITERAL_SPECIALS[i % 7] + b"\xff\xd0")
  return out


DATA = corpus()
TOK = ByteBPE.train(DATA, vocab_size=320)
# Byte strings made of the learned pieces, so that merges are exercised.
PIECES = [TOK.decode([i]) for i in range(TOK.num_entries)]

byte_strings = st.one_of(
    st.binary(max_size=2000),
    st.lists(st.sampled_from(PIECES), max_size=400).map(b"".join),
    st.lists(st.sampled_from(PIECES + list(LITERAL_SPECIALS)),
             max_size=50).map(b"".join),
    st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 255),
              st.integers(0, 5000)),
)


def reference_bpe(data: bytes, merges: list[tuple[str, str]]) -> list[str]:
  """Textbook BPE (GPT-2's bpe()): merge the lowest-ranked adjacent pair,
  every occurrence left to right, until no pair is a merge."""
  rank = {pair: r for r, pair in enumerate(merges)}
  word = [chr(b) for b in data]
  while len(word) > 1:
    pairs = set(zip(word, word[1:]))
    best = min(pairs, key=lambda p: rank.get(p, float("inf")))
    if best not in rank:
      break
    merged, i = [], 0
    while i < len(word):
      if i + 1 < len(word) and (word[i], word[i + 1]) == best:
        merged.append(word[i] + word[i + 1])
        i += 2
      else:
        merged.append(word[i])
        i += 1
    word = merged
  return word


def test_id_layout_and_counting():
  # 320 BPE entries (256 bytes + 64 merges), then BOS and EOS; PAD is EOS.
  assert TOK.num_entries == 320
  assert (TOK.bos_id, TOK.eos_id, TOK.pad_id, TOK.vocab_size) == (
      320, 321, 321, 322)
  for b in range(256):
    assert TOK.decode([b]) == bytes([b])
    np.testing.assert_array_equal(TOK.encode(bytes([b])), [b])
  merged = PIECES[256:]
  assert len(set(merged)) == 64 and all(len(p) >= 2 for p in merged)


@pytest.mark.parametrize("vocab_size", [256, 257, 300, 400])
def test_exact_size(vocab_size):
  tok = ByteBPE.train(DATA, vocab_size=vocab_size)
  assert tok.num_entries == vocab_size
  assert tok.vocab_size == vocab_size + 2
  assert tok.bos_id == vocab_size and tok.eos_id == vocab_size + 1


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(byte_strings)
@example(b"")
@example(bytes(range(256)))
@example(bytes(range(256))[::-1] * 8)
@example(b"\x00" * 10_000)
@example(b"\xff\xd8" + b"\xff\x00" * 3000)
@example(b"".join(LITERAL_SPECIALS))
@example("\u27e8bos\u27e9".encode("latin-1", "replace"))
def test_round_trip(data):
  ids = TOK.encode(data)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert ids.size <= len(data)
  assert ((ids >= 0) & (ids < TOK.num_entries)).all()  # Never a special.
  assert TOK.decode(ids) == data
  assert TOK.decode(ids.tolist()) == data


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(PIECES[:300] + [b" ", b"\x00"]),
                max_size=120).map(b"".join))
def test_matches_textbook_bpe(data):
  merges = [tuple(m) for m in json.loads(TOK.to_json())["model"]["merges"]]
  want = [t.encode("latin-1") for t in reference_bpe(data, merges)]
  assert [TOK.decode([i]) for i in TOK.encode(data)] == want


def test_merges_span_whitespace_and_nul():
  tok = ByteBPE.train([b"a \x00\nb" * 300, b"\x00\x00 \t" * 300], 280)
  pieces = [tok.decode([i]) for i in range(256, tok.num_entries)]
  assert any(b"a \x00\nb" in p for p in pieces)
  assert any(b"\x00\x00 \t\x00" in p for p in pieces)
  assert len(tok.encode(b"a \x00\nb" * 10)) < 10


@pytest.mark.parametrize("literal", LITERAL_SPECIALS)
def test_special_names_in_data_are_plain_bytes(literal):
  data = b"x" + literal + b"\x00" + literal
  ids = TOK.encode(data)
  assert TOK.bos_id not in ids and TOK.eos_id not in ids
  assert TOK.decode(ids) == data
  merges = [tuple(m) for m in json.loads(TOK.to_json())["model"]["merges"]]
  assert [TOK.decode([i]) for i in ids] == [
      t.encode("latin-1") for t in reference_bpe(data, merges)]


def test_decode_drops_specials():
  data = DATA[3][:300]
  ids = TOK.encode(data).tolist()
  framed = [TOK.bos_id, *ids, TOK.eos_id, TOK.pad_id, TOK.pad_id]
  assert TOK.decode(framed) == data
  assert TOK.decode(np.array(framed, np.int64)) == data
  assert TOK.decode([]) == b""
  assert [TOK.decode([i]) for i in (TOK.bos_id, TOK.eos_id)] == [b"", b""]


def test_encode_batch_matches_encode():
  datas = [DATA[0], b"", bytearray(b"\x00\x01"), memoryview(DATA[1][:100]),
           *DATA[5:20]]
  got = TOK.encode_batch(datas)
  assert len(got) == len(datas)
  for g, d in zip(got, datas):
    assert g.dtype == np.int32
    np.testing.assert_array_equal(g, TOK.encode(bytes(d)))
    assert TOK.decode(g) == bytes(d)


def test_save_load_and_the_file_alone(tmp_path):
  path = tmp_path / "tokenizer.json"
  TOK.save(path)
  loaded = ByteBPE.load(path)
  assert loaded.to_json() == TOK.to_json() == path.read_text("utf-8")
  assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (
      TOK.bos_id, TOK.eos_id, TOK.vocab_size)
  data = b"".join(DATA[:3]) + bytes(range(256))
  np.testing.assert_array_equal(loaded.encode(data), TOK.encode(data))
  # The plain library, given only the file and latin-1 text, agrees.
  raw = Tokenizer.from_file(str(path))
  ids = raw.encode(data.decode("latin-1"), add_special_tokens=False).ids
  np.testing.assert_array_equal(ids, TOK.encode(data))
  framed = [TOK.bos_id, *ids, TOK.eos_id]
  assert raw.decode(framed, skip_special_tokens=True).encode("latin-1") == data


def test_pickles_for_loader_workers():
  # Grain sends the tokenizer to its worker processes by pickling.
  clone = pickle.loads(pickle.dumps(TOK))
  data = DATA[7]
  np.testing.assert_array_equal(clone.encode(data), TOK.encode(data))
  assert clone.decode(clone.encode(data)) == data
  assert (clone.bos_id, clone.eos_id, clone.vocab_size) == (
      TOK.bos_id, TOK.eos_id, TOK.vocab_size)
  classes = pickle.loads(pickle.dumps(TOK.with_classes(["a", "b"])))
  assert (classes.class_names, classes.class_id(1), classes.no_class_id,
          classes.vocab_size) == (("a", "b"), 323, 324, 325)


def test_deterministic_across_processes():
  first = TOK.to_json()
  assert ByteBPE.train(corpus(), vocab_size=320).to_json() == first
  # Another interpreter (other hash seeds, thread timing) gives the same file.
  script = ("import sys; from tests.test_tokenizer import corpus; "
            "from codeclm.tokenizer import ByteBPE; "
            "sys.stdout.write(ByteBPE.train(corpus(), 320).to_json())")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                       text=True, check=True, encoding="utf-8",
                       cwd=pathlib.Path(__file__).parents[1],
                       env=dict(os.environ, PYTHONHASHSEED="123"))
  assert out.stdout == first


def test_too_little_data_warns_with_reached_size():
  with pytest.warns(UserWarning, match=r"asked for 320 .* only allowed 257"):
    tok = ByteBPE.train([b"ab"], vocab_size=320)
  assert tok.num_entries == 257 and tok.vocab_size == 259
  assert tok.decode(tok.encode(b"abab\x00")) == b"abab\x00"
  with pytest.warns(UserWarning, match="only allowed 256"):
    tok = ByteBPE.train([], vocab_size=300)
  assert tok.decode(tok.encode(bytes(range(256)))) == bytes(range(256))


def test_no_warning_when_size_is_reached():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ByteBPE.train(DATA[:5], vocab_size=300)


def test_bad_inputs_say_what_to_do(tmp_path):
  with pytest.raises(ValueError, match="must be an int >= 256"):
    ByteBPE.train(DATA, vocab_size=200)
  with pytest.raises(TypeError, match="not str"):
    TOK.encode("text")
  with pytest.raises(TypeError, match="not str"):
    ByteBPE.train(["text"])
  with pytest.raises(TypeError, match="got int"):
    TOK.encode(5)
  with pytest.raises(ValueError, match=r"outside \[0, 322\)"):
    TOK.decode([1, 322])
  with pytest.raises(ValueError, match=r"outside \[0, 322\)"):
    TOK.decode([-1])
  with pytest.raises(ValueError, match="1-D sequence of int"):
    TOK.decode([[1, 2]])
  with pytest.raises(ValueError, match="1-D sequence of int"):
    TOK.decode([1.5])
  missing = tmp_path / "nope.json"
  with pytest.raises(ValueError, match="nope.json"):
    ByteBPE.load(missing)
  garbage = tmp_path / "garbage.json"
  garbage.write_text("{not json")
  with pytest.raises(ValueError, match="garbage.json.*not a valid"):
    ByteBPE.load(garbage)
  # A real BPE tokenizer.json, but not one of ours: it splits on whitespace
  # and lacks the byte alphabet and the specials.
  other = Tokenizer(models.BPE())
  other.pre_tokenizer = pre_tokenizers.Whitespace()
  other_path = tmp_path / "other.json"
  other.save(str(other_path))
  with pytest.raises(ValueError, match=r"other.json.*not a ByteBPE.*"
                     r"pre-tokenizer.*single bytes.*specials"):
    ByteBPE.load(other_path)
