"""H.264 Annex B bytes below the codec: NAL units, slice headers, frames.

Everything the AVC codec reads from bytes without decoding them, kept apart
from PyAV (`video_io`) and from the codec's settings (`avc`): the parts a
model's output is checked with must be plain byte logic.

A frame starts at a slice whose header says first_mb_in_slice == 0; that
exp-Golomb number comes right after the one-byte NAL header, so frames and
slices are counted, and prompts cut, without decoding. In canonical bytes the
first slice of every frame has the 4-byte start code 00 00 00 01 (Annex B's
zero_byte before the first NAL unit of an access unit), every other slice the
3-byte 00 00 01.
"""

import re
from typing import NamedTuple

START_CODE = re.compile(b"\x00\x00\x01")
_LONG_START, _SHORT_START = b"\x00\x00\x00\x01", b"\x00\x00\x01"
SLICE_TYPES = (1, 5)  # Non-IDR and IDR coded slices (no data partitioning).
IDR, SPS, PPS = 5, 7, 8
# slice_type values a baseline stream may use: P, I (and their "all slices of
# the picture have this type" forms 5, 7). An IDR slice must be I.
_P_OR_I, _I_ONLY = frozenset((0, 2, 5, 7)), frozenset((2, 7))
_HEADER_BYTES = 16  # Enough of a slice for first_mb, slice_type and pps_id.


# -- NAL units -----------------------------------------------------------------


def nal_spans(data: bytes):
  """(start-code offset, payload) of each non-empty NAL unit in Annex B bytes.

  The offset includes a zero byte just before 00 00 01 (a 4-byte start code);
  the payload runs to the next start code, its trailing zero bytes dropped.
  Bytes before the first start code are not a NAL unit and are ignored.
  """
  codes = [m.start() for m in START_CODE.finditer(data)]
  for i, at in enumerate(codes):
    end = codes[i + 1] if i + 1 < len(codes) else len(data)
    payload = data[at + 3:end].rstrip(b"\x00")
    if payload:
      yield (at - 1 if at and data[at - 1] == 0 else at), payload


def _nal_units(data: bytes) -> list[bytes]:
  return [payload for _, payload in nal_spans(data)]


def canonical(stream: bytes) -> bytes:
  """x264's stream without SPS, PPS, SEI (and anything but slices), with a
  4-byte start code exactly before each frame's first slice."""
  return b"".join(
      (_LONG_START if _starts_frame(payload) else _SHORT_START) + payload
      for payload in _nal_units(stream) if payload[0] & 31 in SLICE_TYPES)


def parameter_sets(stream: bytes) -> bytes:
  """The SPS and PPS NAL units of `stream`, each after a 4-byte start code."""
  return b"".join(_LONG_START + payload for payload in _nal_units(stream)
                  if payload[0] & 31 in (SPS, PPS))


def x264_version(stream: bytes) -> str:
  """x264's version in its SEI, e.g. "core 165"; "" when there is none."""
  found = re.search(rb"x264 - core (\d+)( r\d+ \w+)?", stream)
  return found.group(0)[7:].decode() if found else ""


def access_unit(payloads: list[bytes], header: bytes = b"") -> bytes:
  """`header` and the slices of one frame, the first after a 4-byte start
  code, the others after 3-byte ones."""
  return header + b"".join(
      (_LONG_START if i == 0 else _SHORT_START) + p
      for i, p in enumerate(payloads))


# -- slices --------------------------------------------------------------------


def _starts_frame(payload: bytes) -> bool:
  """Whether a slice's first_mb_in_slice is 0: ue(v) 0 is the single bit 1.
  (The byte after the NAL header is never an emulation-prevention byte.)"""
  return len(payload) > 1 and payload[1] & 0x80 != 0


def frame_starts(data: bytes) -> list[int]:
  """Start-code offsets of the slices that start a frame."""
  return [start for start, payload in nal_spans(data)
          if payload[0] & 31 in SLICE_TYPES and _starts_frame(payload)]


class Slice(NamedTuple):
  """One slice NAL unit of a byte string."""
  start: int  # Offset of its start code (the leading zero of a 4-byte one).
  payload: bytes  # NAL header byte onwards, trailing zero bytes dropped.
  first_mb: int | None  # first_mb_in_slice, None when it does not parse.
  header_ok: bool  # The whole header check (b) of AvcDecodeReport passed.


def slices(data: bytes, macroblocks: int, slice_max_mbs: int) -> list[Slice]:
  """The slice NAL units of `data`, with their headers checked against a
  frame of `macroblocks` cut into slices of `slice_max_mbs`."""
  out = []
  for start, payload in nal_spans(data):
    if payload[0] & 31 not in SLICE_TYPES:
      continue
    first_mb, ok = _parse_header(payload, macroblocks, slice_max_mbs)
    out.append(Slice(start, payload, first_mb, ok))
  return out


def _parse_header(payload: bytes, macroblocks: int,
                  slice_max_mbs: int) -> tuple[int | None, bool]:
  values = _exp_golomb(_unescape(payload[1:1 + _HEADER_BYTES]), 3)
  if not values:
    return None, False
  first_mb = values[0]
  if len(values) < 3:
    return first_mb, False
  slice_type, pps_id = values[1], values[2]
  allowed = _I_ONLY if payload[0] & 31 == IDR else _P_OR_I
  ok = (payload[0] & 0x80 == 0 and first_mb < macroblocks
        and first_mb % slice_max_mbs == 0 and slice_type in allowed
        and pps_id == 0)
  return first_mb, ok


def clean_frames(found: list[Slice], frames: int, slice_max_mbs: int
                 ) -> tuple[list[list[bytes]], int, int]:
  """(clean slice payloads of each of the first `frames` frames, slices
  found, slices clean); a frame with no clean slice is left out. Clean is
  defined by `avc.AvcDecodeReport`."""
  groups: list[list[bytes]] = []
  frame, previous, covered = -1, None, -1
  for s in found:
    if s.first_mb == 0:
      frame, previous, covered = frame + 1, None, -1
      groups.append([])
    if frame < 0:  # Slices before any frame start: nowhere to put them.
      previous = s.first_mb
      continue
    # previous is None at a frame start (expect 0), or after a slice whose
    # first_mb did not parse (then nothing continues it).
    expected = 0 if previous is None else previous + slice_max_mbs
    if (frame < frames and s.header_ok and s.first_mb == expected
        and s.first_mb > covered):
      groups[frame].append(s.payload)
      covered = s.first_mb
    previous = s.first_mb
  groups = groups[:frames]
  return [g for g in groups if g], len(found), sum(map(len, groups))


# -- exp-Golomb ----------------------------------------------------------------


def _unescape(rbsp: bytes) -> bytes:
  """NAL bytes without emulation prevention (00 00 03 -> 00 00)."""
  return rbsp.replace(b"\x00\x00\x03", b"\x00\x00") if b"\x00\x00\x03" in (
      rbsp) else rbsp


def _exp_golomb(data: bytes, count: int) -> list[int]:
  """Up to `count` ue(v) values from the start of `data`; fewer where it ends
  or a code is longer than 32 bits (invalid in a slice header)."""
  value, left, out = int.from_bytes(data, "big"), 8 * len(data), []
  while len(out) < count:
    rest = value & ((1 << left) - 1)
    zeros = left - rest.bit_length()
    if not rest or zeros > 31 or 2 * zeros + 1 > left:
      break
    left -= 2 * zeros + 1
    out.append((rest >> left) - 1)
  return out
