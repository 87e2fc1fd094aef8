"""JPEG bytes below the codec: markers, headers and entropy-coded data.

The one parser of JPEG headers in codeclm: the codec's repair and the
sampler's JPEG grammar both read the Huffman tables (`huffman_tables`) and
the scan layout (`scan_layout`) of the codec's own streams here, so the two
can never disagree about a setting. The rest reads what a model writes:
where its entropy-coded data lies, its restart intervals, and whether one
Huffman-decodes to exactly one MCU. Knows nothing of Pillow or of codecs.
"""

import re
from typing import NamedTuple

SOI, EOI, _SOS = b"\xff\xd8", b"\xff\xd9", b"\xff\xda"
RST = tuple(bytes([0xFF, 0xD0 + i]) for i in range(8))
# A restart marker in entropy-coded data, with any fill bytes before it. Data
# 0xFF bytes are stuffed as FF 00, so FF D0..D7 there is always a marker.
RST_RE = re.compile(rb"\xff+[\xd0-\xd7]")
_SOF0, _DHT, _SOS_MARKER, _DRI = 0xC0, 0xC4, 0xDA, 0xDD


# -- headers (the codec's own, trusted) ----------------------------------------


def _segments(jpeg: bytes):
  """(marker, payload) of a well-formed JPEG's segments, up to SOS (trusted)."""
  i = 2
  while i + 4 <= len(jpeg) and jpeg[i] == 0xFF:
    marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2:i + 4], "big")
    if marker == 0xD9:
      return
    yield marker, jpeg[i + 4:i + 2 + length]
    if marker == 0xDA:
      return
    i += 2 + length


def huffman_tables(jpeg: bytes) -> dict[tuple[int, int], tuple[bytes, bytes]]:
  """{(class, id): (counts, symbols)} of each table in `jpeg`'s DHT segments.

  Class 0 is DC, 1 AC; counts[i] is the number of codes of i + 1 bits. Raw,
  so that each reader builds the decoder it needs (a lookup, a tree).
  """
  tables = {}
  for marker, payload in _segments(jpeg):
    if marker != _DHT:
      continue
    i = 0
    while i < len(payload):
      kind, counts = payload[i], payload[i + 1:i + 17]
      symbols = payload[i + 17:i + 17 + sum(counts)]
      tables[kind >> 4, kind & 15] = counts, symbols
      i += 17 + sum(counts)
  return tables


class ScanLayout(NamedTuple):
  """What a baseline JPEG's SOF0, DRI and SOS segments say about its scan."""
  width: int
  height: int
  restart_interval: int  # MCUs per restart interval (DRI); 0: no DRI.
  blocks: tuple  # (DC table id, AC table id) of each block of an MCU, in order.
  num_mcus: int  # MCUs per image.
  end: int  # Offset just past the headers (SOS included): MCU 0 starts here.


def scan_layout(jpeg: bytes) -> ScanLayout | None:
  """The scan layout of a well-formed JPEG; None without SOF0 or SOS."""
  found, end = {}, 2
  for marker, payload in _segments(jpeg):
    found[marker] = payload
    end += 4 + len(payload)
  sof, sos, dri = found.get(_SOF0), found.get(_SOS_MARKER), found.get(_DRI)
  if sof is None or sos is None:
    return None
  interval = int.from_bytes(dri, "big") if dri else 0
  height, width = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5],
                                                                  "big")
  sampling = {sof[6 + 3 * i]: sof[7 + 3 * i] for i in range(sof[5])}
  hmax = max(s >> 4 for s in sampling.values())
  vmax = max(s & 15 for s in sampling.values())
  num_mcus = -(-width // (8 * hmax)) * -(-height // (8 * vmax))
  blocks = []
  for i in range(sos[0]):
    component, selectors = sos[1 + 2 * i], sos[2 + 2 * i]
    h, v = sampling[component] >> 4, sampling[component] & 15
    blocks += [(selectors >> 4, selectors & 15)] * (h * v)
  return ScanLayout(width, height, interval, tuple(blocks), num_mcus, end)


def huffman_lookup(counts: bytes, symbols: bytes, ac: bool) -> list[int]:
  """A 16-bit peek -> (bits to consume << 8 | symbol) table; 0: invalid code.

  Bits to consume = the code's length plus the value bits it announces (the
  low 4 bits of an AC symbol, the whole DC symbol), so a checker never needs
  the coefficient values themselves.
  """
  table = [0] * 65536
  code, n = 0, 0
  for length in range(1, 17):
    for _ in range(counts[length - 1]):
      symbol = symbols[n]
      n += 1
      extra = symbol & 15 if ac else symbol
      shift = 16 - length
      table[code << shift:(code + 1) << shift] = (
          [(length + extra) << 8 | symbol] * (1 << shift))
      code += 1
    code <<= 1
  # mcu_ok relies on the all-ones code being unused, as JPEG requires.
  assert not table[0xFFFF], "Huffman table uses the all-ones code"
  return table


# -- model output (untrusted) --------------------------------------------------


def entropy_span(data: bytes) -> tuple[int, int]:
  """[start, end) of the entropy-coded data: after the first SOS segment (or
  from byte 0 when there is none and no SOI either), up to the first EOI."""
  sos = data.find(_SOS)
  if sos >= 0:
    length = int.from_bytes(data[sos + 2:sos + 4], "big")
    start = min(len(data), sos + 2 + length)
  elif data.startswith(SOI):
    start = len(data)  # Headers only, or cut before the scan.
  else:
    start = 0
  end = data.find(EOI, start)
  return start, len(data) if end < 0 else end


def entropy(data: bytes) -> tuple[bytes, bool]:
  """The entropy-coded data, and whether an EOI closes it."""
  start, end = entropy_span(data)
  return data[start:end], end < len(data)


def intervals(entropy_data: bytes) -> list[bytes]:
  """Restart intervals in stream order; an empty trailing one is not one."""
  pieces = RST_RE.split(entropy_data)
  return pieces if pieces[-1] else pieces[:-1]


def mcu_ok(piece: bytes, blocks: tuple) -> bool:
  """Whether `piece` Huffman-decodes to exactly one MCU of `blocks`, a
  (DC, AC) pair of `huffman_lookup` tables per block."""
  if b"\xff" in piece.replace(b"\xff\x00", b""):
    return False  # A marker inside: not entropy-coded data.
  raw = piece.replace(b"\xff\x00", b"\xff")
  nbits = 8 * len(raw)
  # 48 bits of 1-padding: the all-ones code is invalid, so a read that starts
  # past the data fails, and no read (<= 16 + 15 bits) can pass the padding.
  total = nbits + 48
  bits = int.from_bytes(raw, "big") << 48 | (1 << 48) - 1
  pos = 0
  for dc, ac in blocks:
    entry = dc[bits >> (total - 16 - pos) & 0xFFFF]
    if not entry:
      return False
    pos += entry >> 8
    k = 1
    while k < 64:
      entry = ac[bits >> (total - 16 - pos) & 0xFFFF]
      if not entry:
        return False
      pos += entry >> 8
      run_size = entry & 0xFF
      if run_size & 15:
        k += (run_size >> 4) + 1
      elif run_size == 0xF0:  # ZRL: sixteen zeros.
        k += 16
      else:  # EOB.
        break
      if k > 64:
        return False  # A coefficient index past 63.
    if pos > nbits:
      return False
  pad = nbits - pos
  return pad < 8 and (bits >> 48) & ((1 << pad) - 1) == (1 << pad) - 1
