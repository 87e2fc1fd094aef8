"""The AVC (H.264) codec: videos <-> the paper's canonical H.264 bytes.

Owns everything about H.264 in codeclm: loading any video (a file, its bytes,
or an array of frames) into a fixed number of letterboxed RGB frames at a fixed
frame rate, encoding them with Avc-LM's libx264 settings (baseline profile,
constant QP 37, one macroblock per slice, ...) through PyAV, the parameter-set
header re-inserted to decode, prompts cut at frame starts, and a decoder that
turns any byte string a model writes into frames plus a report of how much of
it was valid. Files for people (.h264, .mp4, .gif, .png) are written by `save`.

Canonical bytes are x264's Annex B stream with the parts that never change for
one codec setting removed: the sequence and picture parameter sets (SPS, PPS)
and x264's SEI message (its version and option string). What is left is one
slice NAL unit per slice. Start codes are normalised: the first slice of every
frame gets the 4-byte start code 00 00 00 01 (Annex B's zero_byte before the
first NAL unit of an access unit), every other slice the 3-byte 00 00 01, so
"00 00 00 01" marks exactly the frame boundaries.

keep_headers=True is the paper's form instead ("for more complicated codecs
like AVC, we let BPE handle such metadata"): x264's Annex B stream exactly as
libx264 writes it, SPS, PPS and SEI at its start, so the bytes play in any
H.264 decoder on their own. Both forms decode, prompt, count and save the same
way (`decode` and `save` use the codec's own SPS/PPS once, whatever the stream
carries).

Sizes must be multiples of 16: a frame is then a whole grid of 16x16
macroblocks, the SPS carries no cropping, and the slice count of a frame is
exact (width / 16 * height / 16 macroblocks, `slice_max_mbs` per slice).

A frame starts at a slice whose header says first_mb_in_slice == 0; that
exp-Golomb number comes right after the one-byte NAL header, so frames and
slices are counted, and prompts cut, without decoding.
"""

import contextlib
import dataclasses
import fractions
import functools
import io
import os
import re
from typing import ClassVar, NamedTuple

import av
import numpy as np
from PIL import Image

from codeclm import codecs
from codeclm.codecs import CodecError

_VERSION_KEYS = ("pyav", "libavcodec", "x264")
_SHORT = ("pad", "skip")
_PROFILES = ("baseline", "main", "high")
_GREY = 128  # Preview slots of frames that did not decode.
_START = re.compile(b"\x00\x00\x01")
_LONG, _SHORT_CODE = b"\x00\x00\x00\x01", b"\x00\x00\x01"
_SLICE_TYPES = (1, 5)  # Non-IDR and IDR coded slices (no data partitioning).
_IDR, _SPS, _PPS = 5, 7, 8
# slice_type values a baseline stream may use: P, I (and their "all slices of
# the picture have this type" forms 5, 7). An IDR slice must be I.
_P_OR_I, _I_ONLY = frozenset((0, 2, 5, 7)), frozenset((2, 7))
_HEADER_BYTES = 16  # Enough of a slice for first_mb, slice_type and pps_id.


@dataclasses.dataclass(frozen=True)
class AvcDecodeReport:
  """How much of a byte string was a valid video.

  frames_expected: the codec's `frames`.
  frames_decoded: frames the decoder built (at most `frames_expected`).
  slices_found: slice NAL units (types 1 and 5) in the bytes, all of them.
  slices_clean: slices that (a) lie in one of the first `frames_expected`
    frames (a frame starts at each slice with first_mb_in_slice == 0),
    (b) have a header that parses: forbidden bit 0, first_mb_in_slice a slice
    start inside the frame (a multiple of slice_max_mbs below the macroblock
    count), slice_type P or I (I in an IDR NAL unit), pic_parameter_set_id 0,
    and (c) continue the macroblock order of their frame: first_mb_in_slice is
    0 for the frame's first slice, else the preceding slice's plus
    slice_max_mbs, and beyond every slice already counted clean in the frame.
    Only clean slices reach the decoder (libavcodec does not support arbitrary
    slice order), so damaged or missing macroblocks are concealed. The slice
    data itself (CAVLC residuals) is not checked: a slice cut short still
    counts if its header is whole.
  """
  frames_expected: int
  frames_decoded: int
  slices_found: int
  slices_clean: int
  slices_per_frame: int

  @property
  def clean_fraction(self) -> float:
    """Clean slices over all slices a full video has."""
    return self.slices_clean / (self.frames_expected * self.slices_per_frame)

  def to_dict(self) -> dict:
    return dict(frames_expected=self.frames_expected,
                frames_decoded=self.frames_decoded,
                slices_found=self.slices_found, slices_clean=self.slices_clean,
                clean_fraction=self.clean_fraction)


class _Slice(NamedTuple):
  """One slice NAL unit of a byte string."""
  start: int  # Offset of its start code (the leading zero of a 4-byte one).
  payload: bytes  # NAL header byte onwards, trailing zero bytes dropped.
  first_mb: int | None  # first_mb_in_slice, None when it does not parse.
  header_ok: bool  # The whole header check (b) of AvcDecodeReport passed.


@dataclasses.dataclass(frozen=True)
class AvcCodec:
  """Avc-LM's canonical H.264 video: a size, frame rate, length and x264 setup.

  Loading samples the frame shown at each time k / fps (k = 0 .. frames - 1,
  times counted from the first frame), then letterboxes it: scaled with
  LANCZOS to fit width x height keeping its aspect ratio (the display one: a
  non-square sample aspect ratio and a rotation in the file are applied),
  centred on black. A video is short when it has no frame at the last sample
  time, i.e. it lasts at most (frames - 1) / fps seconds; short="pad" repeats
  its last frame, short="skip" raises CodecError (data preparation then skips
  and lists it).

  The x264 fields are the paper's settings; x264's preset is its default
  ("medium"), which the fields override. keep_headers: keep x264's SPS, PPS
  and SEI in the bytes (the paper's form) instead of only the slices.
  """
  width: int = 256
  height: int = 144
  fps: float = 3.0
  frames: int = 15
  qp: int = 37
  profile: str = "baseline"
  bframes: int = 0
  slice_max_mbs: int = 1
  trellis: int = 0
  me: str = "dia"
  subme: int = 0
  psy: int = 0
  mixed_refs: int = 0
  fast_pskip: int = 0
  partitions: str = "none"
  refs: int = 3
  threads: int = 1
  short: str = "pad"
  keep_headers: bool = False
  name: ClassVar[str] = "avc"

  def __post_init__(self):
    for field in ("width", "height"):
      size = getattr(self, field)
      if not (isinstance(size, int) and size >= 16 and size % 16 == 0):
        near = max(16, 16 * round(size / 16)) if isinstance(
            size, (int, float)) else 16
        raise CodecError(
            f"AVC {field}={size!r} must be a positive multiple of 16 (the "
            "macroblock size), so that frames hold whole macroblocks and need "
            f"no cropping; use e.g. {field}={near}.")
    if not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 240):
      raise CodecError(f"AVC fps={self.fps!r} must be a number in (0, 240] "
                       "(the paper uses 3).")
    if not (isinstance(self.frames, int) and self.frames >= 1):
      raise CodecError(f"AVC frames={self.frames!r} must be an int >= 1 (the "
                       "paper uses 15: 5 s at 3 fps).")
    if not (isinstance(self.qp, int) and 0 <= self.qp <= 51):
      raise CodecError(f"AVC qp={self.qp!r} must be an int in [0, 51] (the "
                       "paper uses 37).")
    if self.profile not in _PROFILES:
      raise CodecError(f"AVC profile={self.profile!r} is not one of "
                       f"{_PROFILES} (the paper uses 'baseline').")
    if self.profile == "baseline" and self.bframes:
      raise CodecError(f"AVC bframes={self.bframes!r}: the baseline profile "
                       "has no B-frames; use bframes=0 or profile='main'.")
    if self.short not in _SHORT:
      raise CodecError(f"AVC short={self.short!r} must be 'pad' (repeat the "
                       "last frame) or 'skip' (raise so the video is skipped).")
    for field in ("bframes", "trellis", "subme", "psy", "mixed_refs",
                  "fast_pskip"):
      if not (isinstance(getattr(self, field), int)
              and getattr(self, field) >= 0):
        raise CodecError(f"AVC {field}={getattr(self, field)!r} must be an "
                         "int >= 0.")
    for field in ("slice_max_mbs", "refs", "threads"):
      if not (isinstance(getattr(self, field), int)
              and getattr(self, field) >= 1):
        raise CodecError(f"AVC {field}={getattr(self, field)!r} must be an "
                         "int >= 1.")
    if not isinstance(self.keep_headers, bool):
      raise CodecError(f"AVC keep_headers={self.keep_headers!r} must be True "
                       "(the paper's form: SPS, PPS and SEI in the stream) or "
                       "False (slices only, the default).")
    for field in ("me", "partitions"):
      if not re.fullmatch(r"[a-z0-9,]+", str(getattr(self, field))):
        raise CodecError(f"AVC {field}={getattr(self, field)!r} is not an x264 "
                         "option value (e.g. me='dia', partitions='none').")

  # -- geometry ----------------------------------------------------------------

  @property
  def mb_grid(self) -> tuple[int, int]:
    """(columns, rows) of 16x16 macroblocks in a frame."""
    return self.width // 16, self.height // 16

  @property
  def macroblocks(self) -> int:
    """Macroblocks per frame, e.g. 144 at 256x144."""
    cols, rows = self.mb_grid
    return cols * rows

  @property
  def slices_per_frame(self) -> int:
    """Slices x264 writes per frame (`slice_max_mbs` macroblocks each)."""
    return -(-self.macroblocks // self.slice_max_mbs)

  # -- settings ----------------------------------------------------------------

  def settings(self) -> dict:
    """JSON-able settings, with the library versions that produced the bytes."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return dict(name=self.name, **fields, pyav=av.__version__,
                libavcodec=".".join(
                    map(str, av.library_versions["libavcodec"])),
                x264=_reference(self).x264)

  @classmethod
  def from_settings(cls, settings: dict) -> "AvcCodec":
    """The codec `settings()` describes; the version keys are ignored."""
    return cls(**codecs.fields_of(cls, settings, _VERSION_KEYS))

  # -- loading -----------------------------------------------------------------

  def load(self, video, fps: float | None = None) -> np.ndarray:
    """[frames, height, width, 3] uint8: `video` sampled and letterboxed.

    video: a path or the bytes of a video file (any container and codec PyAV
    reads; the first video stream), or a [T, H, W, 3] uint8 array of frames
    of any size shown at `fps` frames per second (default: the codec's fps;
    `fps` is ignored for files, which carry their own timestamps). Raises
    CodecError naming the input when it cannot be read, or when it is short
    and short="skip".
    """
    if isinstance(video, np.ndarray):
      times, pictures, end = _array_frames(video, fps or self.fps)
    elif isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
      times, pictures, end = _file_frames(video, self._sample_times())
    else:
      raise CodecError(
          f"Cannot load an {_describe(video)}: pass a path, the bytes of a "
          "video file, or a [T, H, W, 3] uint8 array.")
    targets = self._sample_times()
    if targets[-1] >= end and self.short == "skip":
      raise CodecError(
          f"{_describe(video)} lasts {float(end):.2f} s, not longer than the "
          f"{float(targets[-1]):.2f} s of its last sample ({self.frames} "
          f"frames at {self.fps} fps); leave it out, or set short='pad' to "
          "repeat its last frame.")
    picked, i = [], 0
    for target in targets:
      while i + 1 < len(times) and times[i + 1] <= target:
        i += 1
      picked.append(i)
    cache = {}
    out = np.empty((self.frames, self.height, self.width, 3), np.uint8)
    for k, i in enumerate(picked):
      if i not in cache:
        cache[i] = _letterbox(pictures[i](), self.width, self.height)
      out[k] = cache[i]
    return out

  def _sample_times(self) -> list[fractions.Fraction]:
    rate = _rate(self.fps)
    return [k / rate for k in range(self.frames)]

  # -- encoding ----------------------------------------------------------------

  def encode(self, video, fps: float | None = None) -> bytes:
    """The canonical bytes of `video` (see the module docstring and `load`)."""
    return self.encode_frames(self.load(video, fps))

  def encode_frames(self, frames: np.ndarray) -> bytes:
    """Canonical bytes of frames already [frames, height, width, 3] uint8
    (x264's own stream when keep_headers)."""
    frames = np.asarray(frames)
    shape = (self.frames, self.height, self.width, 3)
    if frames.shape != shape or frames.dtype != np.uint8:
      raise CodecError(
          f"encode_frames needs uint8 frames of shape {shape}, got "
          f"{frames.dtype} {frames.shape}; use encode() for any video.")
    raw = self._x264(frames)
    return raw if self.keep_headers else _canonical(raw)

  def _x264(self, frames: np.ndarray) -> bytes:
    """x264's Annex B stream of `frames`, as libx264 writes it."""
    rate = _rate(self.fps)
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = self.width, self.height, "yuv420p"
    ctx.time_base, ctx.framerate = 1 / rate, rate
    ctx.thread_count = self.threads
    params = dict(bframes=self.bframes, ref=self.refs,
                  slice_max_mbs=self.slice_max_mbs, trellis=self.trellis,
                  me=self.me, subme=self.subme, psy=self.psy,
                  mixed_refs=self.mixed_refs, fast_pskip=self.fast_pskip,
                  partitions=self.partitions, threads=self.threads)
    ctx.options = {
        "profile": self.profile, "qp": str(self.qp),
        "x264-params": ":".join(f"{k.replace('_', '-')}={v}"
                                for k, v in params.items())}
    out = []
    for i, rgb in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
      frame = frame.reformat(format="yuv420p")
      frame.pts = i
      out += [bytes(p) for p in ctx.encode(frame)]
    out += [bytes(p) for p in ctx.encode(None)]
    return b"".join(out)

  def header(self) -> bytes:
    """The SPS and PPS NAL units (with start codes) these settings produce."""
    return _reference(self).header

  def wrap(self, data: bytes) -> bytes:
    """header + data: an Annex B stream any H.264 decoder plays.

    Data that already starts with an SPS is returned unchanged. No repair:
    use `decode` or `save` for model output.
    """
    data = _as_bytes(data)
    first = _START.search(data)
    if first and data[first.end():first.end() + 1] and (
        data[first.end()] & 31 == _SPS):
      return data
    return self.header() + data

  # -- model output ------------------------------------------------------------

  def decode(self, data: bytes) -> tuple[np.ndarray, AvcDecodeReport]:
    """([n, height, width, 3] uint8 frames, report) of any byte string.

    The clean slices (see AvcDecodeReport) of the first `frames` frames go to
    libavcodec behind this codec's own header (SPS, PPS and SEI in `data` are
    dropped), one packet per frame, with show_all so that frames are output
    even before an IDR frame; n is what it builds, 0 .. frames. Never raises
    for any bytes-like `data`; libav's log messages are kept from the caller's
    logs.
    """
    groups, found, clean = self._clean_frames(data)
    pictures = []
    with av.logging.Capture(local=True):
      try:
        ctx = av.CodecContext.create("h264", "r")
        ctx.thread_count = 1
        ctx.flags2 |= av.codec.context.Flags2.show_all
        packets = [self._access_unit(g, i == 0) for i, g in enumerate(groups)]
        for packet in packets + [None]:
          try:
            decoded = ctx.decode(None if packet is None else av.Packet(packet))
          except (av.FFmpegError, ValueError):  # Damage: skip this packet.
            continue
          for frame in decoded:
            if (frame.width, frame.height) == (self.width, self.height):
              pictures.append(frame.to_ndarray(format="rgb24"))
      except Exception:  # pylint: disable=broad-exception-caught
        pass  # Model output must never crash the caller: keep what decoded.
    pictures = pictures[:self.frames]
    out = (np.stack(pictures) if pictures else
           np.zeros((0, self.height, self.width, 3), np.uint8))
    return out, AvcDecodeReport(self.frames, len(pictures), found, clean,
                                self.slices_per_frame)

  def _clean_frames(self, data) -> tuple[list[list[bytes]], int, int]:
    """(clean slice payloads of each of the first `frames` frames, slices
    found, slices clean); a frame with no clean slice is left out."""
    try:
      slices = self._slices(_as_bytes(data))
    except CodecError:
      return [], 0, 0
    frames: list[list[bytes]] = []
    frame, previous, covered = -1, None, -1
    for s in slices:
      if s.first_mb == 0:
        frame, previous, covered = frame + 1, None, -1
        frames.append([])
      if frame < 0:  # Slices before any frame start: nowhere to put them.
        previous = s.first_mb
        continue
      # previous is None at a frame start (expect 0), or after a slice whose
      # first_mb did not parse (then nothing continues it).
      expected = 0 if previous is None else previous + self.slice_max_mbs
      if (frame < self.frames and s.header_ok and s.first_mb == expected
          and s.first_mb > covered):
        frames[frame].append(s.payload)
        covered = s.first_mb
      previous = s.first_mb
    frames = frames[:self.frames]
    return [f for f in frames if f], len(slices), sum(map(len, frames))

  def _access_unit(self, payloads: list[bytes], first: bool) -> bytes:
    head = self.header() if first else b""
    return head + b"".join(
        (_LONG if i == 0 else _SHORT_CODE) + p for i, p in enumerate(payloads))

  def _slices(self, data: bytes) -> list[_Slice]:
    """The slice NAL units of `data`, with their headers checked."""
    out = []
    for start, payload in _nal_spans(data):
      if payload[0] & 31 not in _SLICE_TYPES:
        continue
      first_mb, ok = self._parse_header(payload)
      out.append(_Slice(start, payload, first_mb, ok))
    return out

  def _parse_header(self, payload: bytes) -> tuple[int | None, bool]:
    values = _exp_golomb(_unescape(payload[1:1 + _HEADER_BYTES]), 3)
    if not values:
      return None, False
    first_mb = values[0]
    if len(values) < 3:
      return first_mb, False
    slice_type, pps_id = values[1], values[2]
    allowed = _I_ONLY if payload[0] & 31 == _IDR else _P_OR_I
    ok = (payload[0] & 0x80 == 0 and first_mb < self.macroblocks
          and first_mb % self.slice_max_mbs == 0 and slice_type in allowed
          and pps_id == 0)
    return first_mb, ok

  def count_slices(self, data: bytes) -> int:
    """Slice NAL units (types 1 and 5) in `data`."""
    return sum(payload[0] & 31 in _SLICE_TYPES
               for _, payload in _nal_spans(_as_bytes(data)))

  def count_frames(self, data: bytes) -> int:
    """Frame starts in `data`: slices whose first_mb_in_slice is 0."""
    return len(self._frame_starts(_as_bytes(data)))

  def _frame_starts(self, data: bytes) -> list[int]:
    return [start for start, payload in _nal_spans(data)
            if payload[0] & 31 in _SLICE_TYPES and _starts_frame(payload)]

  def prompt(self, data: bytes, ratio: float) -> bytes:
    """The prefix of `data` holding its first k = round(ratio * frames) frames.

    k is kept within [1, frames - 1], so a prompt is never empty nor the whole
    video (the paper prompts with 10 of 15 frames: ratio=2/3).
    """
    if not 0 < ratio < 1:
      raise CodecError(f"Prompt ratio={ratio!r} must lie strictly between 0 "
                       "and 1 (e.g. 2/3 for 10 of 15 frames).")
    if self.frames < 2:
      raise CodecError(f"A video of frames={self.frames} cannot be split into "
                       "a prompt and a continuation; use frames >= 2.")
    return self.prompt_frames(
        data, min(max(round(ratio * self.frames), 1), self.frames - 1))

  def prompt_frames(self, data: bytes, k: int) -> bytes:
    """The prefix of `data` up to the start code of the first slice of frame
    k (counted from 0): its first k frames, and any header before them."""
    if not (isinstance(k, int) and k >= 1):
      raise CodecError(f"Prompt of k={k!r} frames: k must be an int >= 1.")
    data = _as_bytes(data)
    starts = self._frame_starts(data)
    if len(starts) <= k:
      raise CodecError(
          f"Cannot cut a prompt of {k} frames from {len(data)} bytes that "
          f"start only {len(starts)} frames; pass a full encoded video from "
          "encode() with more than k frames.")
    return data[:starts[k]]

  # -- files for people --------------------------------------------------------

  def preview(self, frames: np.ndarray, every: int = 1) -> np.ndarray:
    """One [height, width * slots, 3] uint8 strip of the frames, side by side.

    The slots are frames 0, every, 2 * every, ... of the codec's `frames`;
    slots past the frames given (a short decode) are mid grey.
    """
    if not (isinstance(every, int) and every >= 1):
      raise CodecError(f"preview every={every!r} must be an int >= 1.")
    frames = np.asarray(frames)
    slots = range(0, self.frames, every)
    strip = np.full((self.height, self.width * len(slots), 3), _GREY, np.uint8)
    for j, k in enumerate(slots):
      if k < len(frames) and frames[k].shape == (self.height, self.width, 3):
        strip[:, j * self.width:(j + 1) * self.width] = frames[k]
    return strip

  def save(self, stem: str | os.PathLike, data: bytes) -> list[str]:
    """Writes stem.h264, stem.mp4, stem.gif and stem.png; returns their paths.

    .h264: the Annex B stream decode() plays (this codec's header and the clean
    slices). .mp4: the same access units muxed without re-encoding, at the
    codec's fps. .gif: the decoded frames, animated. .png: `preview` of them.
    Model garbage never raises: the .mp4 and .gif are left out when nothing
    decodes (the .h264 and a grey strip are still written). File system
    errors do raise.
    """
    stem = os.fspath(stem)
    groups = self._clean_frames(data)[0]
    units = [self._access_unit(g, i == 0) for i, g in enumerate(groups)]
    frames, _ = self.decode(data)
    paths = [stem + ".h264"]
    with open(paths[0], "wb") as f:
      f.write(b"".join(units) or self.header())
    if len(frames):
      if self._write_mp4(stem + ".mp4", groups):
        paths.append(stem + ".mp4")
      images = [Image.fromarray(f) for f in frames]
      images[0].save(stem + ".gif", save_all=True, append_images=images[1:],
                     duration=round(1000 / self.fps), loop=0)
      paths.append(stem + ".gif")
    Image.fromarray(self.preview(frames)).save(stem + ".png")
    paths.append(stem + ".png")
    return paths

  def _write_mp4(self, path: str, groups: list[list[bytes]]) -> bool:
    """Muxes one packet per frame (pts = dts = frame index, time base 1/fps)
    into an MP4; False (and no file) if libav refuses the stream."""
    rate = _rate(self.fps)
    try:
      with av.logging.Capture(local=True):
        with av.open(io.BytesIO(self.header()), format="h264") as template, \
            av.open(path, "w", format="mp4") as out:
          stream = out.add_stream_from_template(template.streams.video[0])
          stream.time_base = 1 / rate  # The muxer may pick a finer one.
          stream.codec_context.extradata = self.header()
          stream.codec_context.width = self.width
          stream.codec_context.height = self.height
          for i, group in enumerate(groups):
            packet = av.Packet(self._access_unit(group, False))
            packet.stream = stream
            packet.time_base = 1 / rate
            packet.pts = packet.dts = i
            packet.duration = 1
            packet.is_keyframe = group[0][0] & 31 == _IDR
            out.mux(packet)
      return True
    except (av.FFmpegError, ValueError):
      with contextlib.suppress(OSError):
        os.remove(path)
      return False


class _Reference(NamedTuple):
  header: bytes
  x264: str  # e.g. "core 165", "" when x264 wrote no SEI.


@functools.lru_cache(maxsize=None)
def _reference(codec: AvcCodec) -> _Reference:
  """Header and x264 version of a codec, from encoding one black frame."""
  raw = codec._x264(  # pylint: disable=protected-access
      np.zeros((1, codec.height, codec.width, 3), np.uint8))
  header = b"".join(_LONG + payload for payload in _nal_units(raw)
                    if payload[0] & 31 in (_SPS, _PPS))
  found = re.search(rb"x264 - core (\d+)( r\d+ \w+)?", raw)
  return _Reference(header, found.group(0)[7:].decode() if found else "")


# -- bytes ---------------------------------------------------------------------


def _as_bytes(data) -> bytes:
  return codecs.as_bytes(data, "AVC")


def _nal_spans(data: bytes):
  """(start-code offset, payload) of each non-empty NAL unit in Annex B bytes.

  The offset includes a zero byte just before 00 00 01 (a 4-byte start code);
  the payload runs to the next start code, its trailing zero bytes dropped.
  Bytes before the first start code are not a NAL unit and are ignored.
  """
  codes = [m.start() for m in _START.finditer(data)]
  for i, at in enumerate(codes):
    end = codes[i + 1] if i + 1 < len(codes) else len(data)
    payload = data[at + 3:end].rstrip(b"\x00")
    if payload:
      yield (at - 1 if at and data[at - 1] == 0 else at), payload


def _nal_units(data: bytes) -> list[bytes]:
  return [payload for _, payload in _nal_spans(data)]


def _canonical(stream: bytes) -> bytes:
  """x264's stream without SPS, PPS, SEI (and anything but slices), with a
  4-byte start code exactly before each frame's first slice."""
  return b"".join((_LONG if _starts_frame(payload) else _SHORT_CODE) + payload
                  for payload in _nal_units(stream)
                  if payload[0] & 31 in _SLICE_TYPES)


def _starts_frame(payload: bytes) -> bool:
  """Whether a slice's first_mb_in_slice is 0: ue(v) 0 is the single bit 1.
  (The byte after the NAL header is never an emulation-prevention byte.)"""
  return len(payload) > 1 and payload[1] & 0x80 != 0


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


# -- loading -------------------------------------------------------------------


def _describe(video) -> str:
  return codecs.describe(video, "video")


def _rate(fps: float) -> fractions.Fraction:
  """fps as an exact fraction (29.97 -> 2997/100, 30000/1001 stays close)."""
  return fractions.Fraction(fps).limit_denominator(100_000)


def _array_frames(video: np.ndarray, fps: float):
  """(times, lazy pictures, end time) of an array of frames at `fps`."""
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[3] != 3 or (
      not video.size):
    raise CodecError(
        f"Cannot load an {_describe(video)}: pass non-empty uint8 frames "
        "shaped [T, H, W, 3] (e.g. np.clip(x * 255, 0, 255).astype(np.uint8) "
        "for floats in [0, 1]).")
  if not (isinstance(fps, (int, float)) and fps > 0):
    raise CodecError(f"Frame rate fps={fps!r} of an {_describe(video)} must "
                     "be a positive number.")
  rate = _rate(fps)
  times = [i / rate for i in range(len(video))]
  pictures = [functools.partial(Image.fromarray, frame) for frame in video]
  return times, pictures, len(video) / rate


def _file_frames(video, targets: list[fractions.Fraction]):
  """(times, lazy pictures, end time) of a video file's first video stream.

  Decodes up to the first frame after the last target time and keeps only the
  frames shown at some target time (a long or large video never sits in
  memory whole).
  """
  if isinstance(video, (bytes, bytearray, memoryview)) and not len(video):
    raise CodecError(f"{_describe(video)}: empty input; pass the bytes of a "
                     "video file.")
  source = video if isinstance(video, (str, os.PathLike)) else io.BytesIO(
      bytes(video))
  times, pictures = [], []
  pending = None  # (time, frame, duration) of the newest frame decoded.
  try:
    with av.logging.Capture(local=True), av.open(source) as container:
      if not container.streams.video:
        raise CodecError(f"{_describe(video)} has no video stream; pass a "
                         "video file.")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      rate = stream.average_rate or stream.guessed_rate or None
      sar = (stream.sample_aspect_ratio
             or stream.codec_context.sample_aspect_ratio)
      origin, count = None, 0
      for frame in container.decode(stream):
        if frame.pts is None:
          if not rate:
            raise CodecError(
                f"{_describe(video)} has frames without timestamps and no "
                "frame rate; remux it with timestamps (e.g. into .mp4).")
          time = count / fractions.Fraction(rate)
        else:
          time = fractions.Fraction(frame.pts) * stream.time_base
        count += 1
        origin = time if origin is None else origin
        time -= origin
        if pending and time <= pending[0]:
          continue  # Out of order or repeated: keep the first one.
        if pending and any(pending[0] <= t < time for t in targets):
          times.append(pending[0])
          pictures.append(_picture_of(pending[1], sar))
        duration = (fractions.Fraction(frame.duration) * stream.time_base
                    if frame.duration else None)
        pending = (time, frame, duration)
        if time > targets[-1]:
          break
  except CodecError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Demuxers and decoders raise av.FFmpegError subclasses, OSError,
    # ValueError, ...: all mean the same thing to a caller.
    raise CodecError(
        f"{_describe(video)} is not a readable video ({type(e).__name__}: "
        f"{e}); check or replace the file, or leave it out.") from e
  if pending is None:
    raise CodecError(f"{_describe(video)} has no decodable video frames; "
                     "check or replace the file, or leave it out.")
  last, frame, duration = pending
  times.append(last)
  pictures.append(_picture_of(frame, sar))
  step = duration or (1 / fractions.Fraction(rate) if rate else None) or (
      last - times[-2] if len(times) > 1 else fractions.Fraction(1, 30))
  return times, pictures, last + step


def _picture_of(frame: "av.VideoFrame", sar: fractions.Fraction | None):
  """A function giving the frame as a PIL image as it is shown: square pixels
  (sar: the stream's sample aspect ratio), rotation applied."""
  rgb = frame.to_ndarray(format="rgb24")
  turns = round((frame.rotation or 0) / 90) % 4

  def picture() -> Image.Image:
    im = Image.fromarray(np.rot90(rgb, turns) if turns else rgb)
    if sar and sar > 0 and sar != 1:
      wide = sar if turns % 2 == 0 else 1 / sar
      im = im.resize((max(1, round(im.width * wide)), im.height),
                     Image.Resampling.LANCZOS)
    return im
  return picture


def _letterbox(im: Image.Image, width: int, height: int) -> np.ndarray:
  """`im` scaled to fit width x height (LANCZOS), centred on black."""
  if im.mode != "RGB":
    im = im.convert("RGB")
  w, h = im.size
  scale = min(width / w, height / h)
  size = (min(width, max(1, round(w * scale))),
          min(height, max(1, round(h * scale))))
  if size != (w, h):
    im = im.resize(size, Image.Resampling.LANCZOS)
  out = np.zeros((height, width, 3), np.uint8)
  x, y = (width - size[0]) // 2, (height - size[1]) // 2
  out[y:y + size[1], x:x + size[0]] = np.asarray(im)
  return out
