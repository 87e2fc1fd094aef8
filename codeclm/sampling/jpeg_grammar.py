"""The canonical JPEG stream as a byte automaton, derived from the codec.

Jpeg-LM's streams (one codec setting: fixed Huffman tables, a restart marker
after every MCU) are a regular language apart from one count: the restart
markers' numbers (D0..D7 cycling) and where EOI may come (only after the last
MCU). The automaton recognises everything else; an external MCU counter
carried beside its state checks the markers (see `Walk`): 8x fewer states
than keeping the marker number in the state.

Nothing is hard-coded: the Huffman tables come from the DHT segments of
`codec.header()`; components, sampling factors, the image size and the
restart interval from the SOF, SOS and DRI segments of the codec's own
encoding of a flat image, whose bytes before the scan are the fixed prefix
(SOI APP0 SOF DRI SOS) every stream of the setting starts with. Both are read
by `codecs.jpeg_bitstream`, the parser the codec's repair uses too.

States (byte boundaries): the prefix chain (state i expects prefix[i]); then
one per (bit state, need-00 flag) inside an MCU, where a bit state is one of
  DC tree node | DC magnitude bits left | (k, AC tree node) |
  (index after the coefficient, AC magnitude bits left)
per block, the flag meaning "a data FF was written, 00 must follow"; then
AFTER (MCU complete, byte-aligned), AFTER_FF (the same after a padded FF),
MARKER (an FF that starts a marker was written) and DONE (after EOI: nothing
more; the sampler emits EOS there).

Stricter than libjpeg, as it should be for generation: padding bits are 1s
and fewer than 8; an AC run may not pass coefficient 63; ZRL must leave room
for a coefficient (k + 16 <= 63); after coefficient 63 a block ends with no
EOB (an EOB there would be read as the next block's DC); no fill bytes before
markers; markers only between MCUs. Unreachable states and dead ones (that
cannot reach DONE) are pruned, so a walk can always finish (tested), and
equivalent states merged (`_minimise`).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image

from codeclm.codecs import jpeg
from codeclm.codecs import jpeg_bitstream

_RST0, _EOI = 0xD0, 0xD9
REJECT = -1
_NONE = -(1 << 20)  # In a Huffman tree: no code continues this way.


@dataclasses.dataclass(frozen=True)
class Layout:
  """What the automaton needs from the codec's headers."""
  prefix: bytes          # every byte before MCU 0 (SOI .. SOS)
  blocks: tuple          # (DC tree, AC tree) per block of an MCU, in order
  num_mcus: int          # MCUs per image (from SOF)


def _tree(counts: bytes, symbols: bytes) -> np.ndarray:
  """A canonical Huffman code as a binary tree: child[node, bit].

  >= 0: an inner node; -1 - symbol: a leaf; _NONE: no code continues this
  way (the all-ones path, never a code in JPEG).
  """
  child = [[_NONE, _NONE]]
  code, n = 0, 0
  for length in range(1, 17):
    for _ in range(counts[length - 1]):
      node = 0
      for i in range(length - 1, -1, -1):
        bit = code >> i & 1
        if i == 0:
          child[node][bit] = -1 - symbols[n]
        else:
          if child[node][bit] == _NONE:
            child.append([_NONE, _NONE])
            child[node][bit] = len(child) - 1
          node = child[node][bit]
      code += 1
      n += 1
    code <<= 1
  return np.array(child, np.int64)


def layout_of(codec: jpeg.JpegCodec) -> Layout:
  """The Huffman trees (from codec.header()'s DHT) and the scan layout (SOF,
  DRI, SOS of the codec's own stream of a flat image)."""
  trees = {key: _tree(counts, symbols) for key, (counts, symbols) in
           jpeg_bitstream.huffman_tables(codec.header()).items()}
  stream = codec.encode(Image.new("RGB", (codec.width, codec.height),
                                  (128, 128, 128)))
  scan = jpeg_bitstream.scan_layout(stream)
  if scan is None:
    raise ValueError(f"{codec} writes no baseline SOF0/SOS: the JPEG grammar "
                     "covers baseline Huffman streams only.")
  if scan.restart_interval != 1:
    raise ValueError(
        f"{codec} writes a restart interval of {scan.restart_interval} MCUs; "
        "the JPEG grammar needs a restart marker after every MCU "
        "(restart_marker_blocks=1, the paper's setting).")
  blocks = tuple((trees[0, dc], trees[1, ac]) for dc, ac in scan.blocks)
  return Layout(stream[:scan.end], blocks, scan.num_mcus)


def _bit_automaton(blocks) -> tuple[np.ndarray, int, int]:
  """bit_next [Q, 2] (REJECT where invalid), the MCU's start state, and END.

  END (all blocks done) and PAD (after END) only accept 1-bits; PAD is
  END + 1 = Q - 1.
  """
  ids: dict[tuple, int] = {}

  def sid(key):
    if key not in ids:
      ids[key] = len(ids)
    return ids[key]

  end_key, pad_key = ("end",), ("pad",)
  edges = []  # (from key, bit, to key or None)
  for b, (dc, ac) in enumerate(blocks):
    after_block = ("dc", b + 1, 0) if b + 1 < len(blocks) else end_key
    first_ac = ("ac", b, 1, 0)
    for node in range(len(dc)):
      for bit in (0, 1):
        c = int(dc[node, bit])
        if c == _NONE:
          continue
        if c >= 0:
          edges.append((("dc", b, node), bit, ("dc", b, c)))
        else:
          size = -1 - c
          if size > 11:
            continue
          edges.append((("dc", b, node), bit,
                        ("dcm", b, size) if size else first_ac))
    for left in range(1, 12):
      for bit in (0, 1):
        edges.append((("dcm", b, left), bit,
                      ("dcm", b, left - 1) if left > 1 else first_ac))
    for k in range(1, 64):
      for node in range(len(ac)):
        for bit in (0, 1):
          c = int(ac[node, bit])
          if c == _NONE:
            continue
          if c >= 0:
            to = ("ac", b, k, c)
          else:
            symbol = -1 - c
            run, size = symbol >> 4, symbol & 15
            if symbol == 0x00:
              to = after_block                    # EOB
            elif symbol == 0xF0:
              to = ("ac", b, k + 16, 0) if k + 16 <= 63 else None  # ZRL
            elif size and k + run <= 63:
              to = ("acm", b, k + run + 1, size)
            else:
              to = None
          if to is not None:
            edges.append((("ac", b, k, node), bit, to))
    for after in range(2, 65):
      for left in range(1, 11):
        done = after_block if after == 64 else ("ac", b, after, 0)
        for bit in (0, 1):
          edges.append((("acm", b, after, left), bit,
                        ("acm", b, after, left - 1) if left > 1 else done))
  start = sid(("dc", 0, 0))
  for src, _, dst in edges:
    sid(src)
    if dst not in (end_key, pad_key):
      sid(dst)
  end = sid(end_key)  # After every MCU-internal state.
  sid(pad_key)  # end + 1
  table = np.full((len(ids), 2), REJECT, np.int32)
  for src, bit, dst in edges:
    table[ids[src], bit] = ids[dst]
  table[end, 1] = table[end + 1, 1] = end + 1
  return table, start, end


@dataclasses.dataclass(frozen=True)
class ByteAutomaton:
  """next[state, byte] (REJECT = -1) of canonical streams of one setting.

  State 0 is before SOI. `marker` is the state after an FF that starts a
  marker (the only state where D0..D7 and D9 are markers); `mcu_start` the
  state at the start of every MCU; `done` after EOI.
  """
  next: np.ndarray
  marker: int
  mcu_start: int
  done: int
  num_mcus: int
  prefix_len: int

  @property
  def num_states(self) -> int:
    return self.next.shape[0]

  def walk(self, data: bytes, state: int = 0, count: int = 0) -> "Walk":
    """Runs `data` from (state, count); stops at the first rejected byte."""
    nxt, n = self.next, self.num_mcus
    for i, byte in enumerate(bytes(data)):
      if state == self.marker and byte != 0xFF:
        if byte == _EOI:
          ok = count == n - 1
        else:
          ok = count < n - 1 and byte == _RST0 + count % 8
          count += 1
        if not ok:
          return Walk(REJECT, count, i)
      state = int(nxt[state, byte])
      if state == REJECT:
        return Walk(REJECT, count, i)
    return Walk(state, count, None)

  def random_walks(self, n: int, rng: np.random.Generator) -> list[bytes]:
    """n walks from SOI to EOI, each byte uniform over those allowed (with
    the restart-marker counter): valid streams, noise as pictures (test and
    fuzz inputs)."""
    state = np.zeros(n, np.int64)
    count = np.zeros(n, np.int64)
    out = [bytearray() for _ in range(n)]
    rst = np.arange(256) - _RST0
    while (live := np.flatnonzero(state != self.done)).size:
      rows = self.next[state[live]] >= 0                    # [live, 256]
      marker = (state[live] == self.marker)[:, None]
      c = count[live][:, None]
      last = c == self.num_mcus - 1
      rows &= ~marker | np.where(last, np.arange(256) == _EOI, rst == c % 8)
      pick = (rng.random(rows.shape) * rows).argmax(axis=1)
      count[live] += marker[:, 0] & (pick != _EOI)
      state[live] = self.next[state[live], pick]
      for i, b in zip(live, pick):
        out[i].append(b)
    return [bytes(x) for x in out]


@dataclasses.dataclass(frozen=True)
class Walk:
  """Where a byte string leaves the automaton.

  state: REJECT when a byte was refused; count: restart markers passed (MCUs
  completed before the current one); rejected_at: index of the refused byte.
  """
  state: int
  count: int
  rejected_at: int | None

  @property
  def accepted(self) -> bool:
    return self.rejected_at is None


def _reachable(table: np.ndarray, start: int) -> np.ndarray:
  """bool [rows]: the rows reachable from `start` through `table` (-1: none)."""
  seen = np.zeros(len(table) + 1, bool)  # The last entry absorbs REJECT.
  seen[start] = True
  frontier = np.array([start])
  while frontier.size:
    hit = np.zeros_like(seen)
    hit[table[frontier].ravel()] = True
    new = hit & ~seen
    new[-1] = False
    seen |= new
    frontier = np.flatnonzero(new)
  return seen[:-1]


def _alive(table: np.ndarray, goal: int) -> np.ndarray:
  """bool [rows]: the rows from which some path reaches `goal`."""
  alive = np.zeros(len(table) + 1, bool)  # The last entry absorbs REJECT.
  alive[goal] = True
  todo = np.flatnonzero(~alive[:-1])
  while todo.size:
    grown = alive[table[todo]].any(axis=1)
    if not grown.any():
      break
    alive[todo[grown]] = True
    todo = todo[~grown]
  return alive[:-1]


@functools.lru_cache(maxsize=8)
def build(codec: jpeg.JpegCodec) -> ByteAutomaton:
  """The byte automaton of `codec`'s canonical streams (cached per setting)."""
  layout = layout_of(codec)
  bits, q0, end = _bit_automaton(layout.blocks)
  q = bits.shape[0]
  pad = end + 1
  # Every bit state through each byte's 8 bits, MSB first: [Q, 256], as two
  # 4-bit steps; row q of `sink` is the reject sink, so gathers need no masks.
  sink = np.concatenate([np.where(bits >= 0, bits, q), [[q, q]]]).astype(
      np.int32)
  nibble = np.arange(q + 1, dtype=np.int32)[:, None].repeat(16, 1)
  for i in range(3, -1, -1):
    nibble = sink[nibble, (np.arange(16) >> i & 1)[None, :]]
  # Byte h << 4 | l: whole rows of `nibble` gathered per high nibble h.
  cur = np.concatenate([nibble[nibble[:q, h]] for h in range(16)], axis=1)
  cur[end] = cur[pad] = q  # A whole byte of padding is not allowed.
  cur[cur == q] = REJECT
  values = np.arange(256)
  # Numbering: prefix chain, (MCU-internal bit state < END, flag 0), (the
  # same, flag 1), AFTER, AFTER_FF, MARKER, DONE; unreachable ones (most
  # need-00 states) are pruned at the end.
  p, m = len(layout.prefix), end
  byte_of = np.full(q, REJECT, np.int32)
  byte_of[:m] = p + np.arange(m)
  after, after_ff, marker, done = (int(x) for x in p + 2 * m + np.arange(4))
  table = np.full((p + 2 * m + 4, 256), REJECT, np.int32)
  table[np.arange(p), np.frombuffer(layout.prefix, np.uint8)] = np.arange(
      1, p + 1)
  table[p - 1, layout.prefix[-1]] = byte_of[q0]
  targets = cur[:end]                                  # [m, 256] bit states
  finished = (targets == end) | (targets == pad)
  flag = (values == 0xFF)[None, :]
  to = np.where(targets >= 0, byte_of[np.maximum(targets, 0)] + m * flag,
                REJECT)
  to = np.where(finished, np.where(flag, after_ff, after), to)
  table[p:p + m] = to
  table[p + m + np.arange(m), 0x00] = p + np.arange(m)
  table[after, 0xFF] = marker
  table[after_ff, 0x00] = after
  table[marker, _RST0:_RST0 + 8] = byte_of[q0]
  table[marker, _EOI] = done
  # Keep the states reachable from state 0 that can still reach DONE (some
  # (k, AC node) states only lead to runs past 63), in order.
  keep = _reachable(table, 0) & _alive(table, done)
  table[~np.append(keep, False)[table]] = REJECT
  renumber = np.full(len(table) + 1, REJECT, np.int32)
  renumber[np.flatnonzero(keep)] = np.arange(keep.sum())
  table = renumber[table[keep]]  # REJECT (-1) maps to renumber[-1] = REJECT.
  special = renumber[[0, marker, byte_of[q0], done]]
  table, special = _minimise(table, special)
  return ByteAutomaton(table, *(int(x) for x in special[1:]), layout.num_mcus,
                       p)


def _minimise(table: np.ndarray, special: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
  """(table, special states) with equivalent states merged (Moore).

  Two states are equivalent when every byte leads both to equivalent states
  (or both to REJECT); `special` ones (start, MARKER, MCU start, DONE: the
  walk and the sampler single them out) keep classes of their own. Classes
  are split by a random 64-bit hash of (class, classes of the 256 targets)
  until their number stops growing; states keep their first-seen order, so
  the start stays state 0. 66,725 -> 43,103 states for q25 4:2:0 (AC-node
  states at different coefficient indices that share their futures): every
  table over states shrinks by 35% (benchmarks/RESULTS.md).
  """
  n = table.shape[0]
  cls = np.zeros(n, np.int64)
  cls[special] = 1 + np.arange(len(special))
  weights = np.random.default_rng(0).integers(
      1, 1 << 62, 257, dtype=np.uint64) | np.uint64(1)
  count = len(np.unique(cls))
  while True:
    ext = np.append(cls, -1).astype(np.uint64) + np.uint64(1)  # REJECT: 0.
    key = (ext[table] * weights[:256]).sum(axis=1, dtype=np.uint64) + (
        ext[:n] * weights[256])
    _, first, new = np.unique(key, return_index=True, return_inverse=True)
    stable = len(first) == count
    cls, count = new.reshape(-1), len(first)
    if stable:
      break
  order = np.argsort(first)  # Classes by their first state.
  rank = np.empty(count, np.int64)
  rank[order] = np.arange(count)
  cls = rank[cls]
  merged = np.append(cls, REJECT)[table[first[order]]].astype(np.int32)
  return merged, cls[special]
