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

The byte rules (NAL units, slice headers, frame starts) are in
`h264_bitstream`, everything PyAV does (reading videos, x264, libavcodec,
MP4) in `video_io`; this module holds the codec's settings and API.

keep_headers=True is the paper's form instead ("for more complicated codecs
like AVC, we let BPE handle such metadata"): x264's Annex B stream exactly as
libx264 writes it, SPS, PPS and SEI at its start, so the bytes play in any
H.264 decoder on their own. Both forms decode, prompt, count and save the same
way (`decode` and `save` use the codec's own SPS/PPS once, whatever the stream
carries).

Sizes must be multiples of 16: a frame is then a whole grid of 16x16
macroblocks, the SPS carries no cropping, and the slice count of a frame is
exact (width / 16 * height / 16 macroblocks, `slice_max_mbs` per slice).
"""

import dataclasses
import fractions
import functools
import os
import re
from typing import ClassVar, NamedTuple

import av
import numpy as np
from PIL import Image

from codeclm import codecs
from codeclm.codecs import CodecError
from codeclm.codecs import h264_bitstream
from codeclm.codecs import video_io

_VERSION_KEYS = ("pyav", "libavcodec", "x264")
_SHORT = ("pad", "skip")
_PROFILES = ("baseline", "main", "high")
_GREY = 128  # Preview slots of frames that did not decode.


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
    targets = self._sample_times()
    times, pictures, end = video_io.read_frames(video, fps or self.fps,
                                                targets)
    if targets[-1] >= end and self.short == "skip":
      raise CodecError(
          f"{codecs.describe(video, 'video')} lasts {float(end):.2f} s, not "
          f"longer than the {float(targets[-1]):.2f} s of its last sample "
          f"({self.frames} frames at {self.fps} fps); leave it out, or set "
          "short='pad' to repeat its last frame.")
    return video_io.sample(times, pictures, targets, self.width, self.height)

  def _sample_times(self) -> list[fractions.Fraction]:
    rate = video_io.rate(self.fps)
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
    return raw if self.keep_headers else h264_bitstream.canonical(raw)

  def _x264(self, frames: np.ndarray) -> bytes:
    """x264's Annex B stream of `frames`, as libx264 writes it."""
    params = dict(bframes=self.bframes, ref=self.refs,
                  slice_max_mbs=self.slice_max_mbs, trellis=self.trellis,
                  me=self.me, subme=self.subme, psy=self.psy,
                  mixed_refs=self.mixed_refs, fast_pskip=self.fast_pskip,
                  partitions=self.partitions, threads=self.threads)
    return video_io.encode_x264(frames, self.fps, profile=self.profile,
                                qp=self.qp, threads=self.threads,
                                params=params)

  def header(self) -> bytes:
    """The SPS and PPS NAL units (with start codes) these settings produce."""
    return _reference(self).header

  def wrap(self, data: bytes) -> bytes:
    """header + data: an Annex B stream any H.264 decoder plays.

    Data that already starts with an SPS is returned unchanged. No repair:
    use `decode` or `save` for model output.
    """
    data = _as_bytes(data)
    first = h264_bitstream.START_CODE.search(data)
    if first and data[first.end():first.end() + 1] and (
        data[first.end()] & 31 == h264_bitstream.SPS):
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
    units = (self._access_unit(g, i == 0) for i, g in enumerate(groups))
    pictures = video_io.decode_h264(units, self.width, self.height)
    pictures = pictures[:self.frames]
    out = (np.stack(pictures) if pictures else
           np.zeros((0, self.height, self.width, 3), np.uint8))
    return out, AvcDecodeReport(self.frames, len(pictures), found, clean,
                                self.slices_per_frame)

  def _clean_frames(self, data) -> tuple[list[list[bytes]], int, int]:
    """(clean slice payloads of each of the first `frames` frames, slices
    found, slices clean); a frame with no clean slice is left out."""
    try:
      data = _as_bytes(data)
    except CodecError:
      return [], 0, 0
    slices = h264_bitstream.slices(data, self.macroblocks, self.slice_max_mbs)
    return h264_bitstream.clean_frames(slices, self.frames, self.slice_max_mbs)

  def _access_unit(self, payloads: list[bytes], first: bool) -> bytes:
    return h264_bitstream.access_unit(payloads,
                                      self.header() if first else b"")

  def count_slices(self, data: bytes) -> int:
    """Slice NAL units (types 1 and 5) in `data`."""
    return sum(payload[0] & 31 in h264_bitstream.SLICE_TYPES
               for _, payload in h264_bitstream.nal_spans(_as_bytes(data)))

  def count_frames(self, data: bytes) -> int:
    """Frame starts in `data`: slices whose first_mb_in_slice is 0."""
    return len(h264_bitstream.frame_starts(_as_bytes(data)))

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
    starts = h264_bitstream.frame_starts(data)
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
      packets = [(self._access_unit(g, False),
                  g[0][0] & 31 == h264_bitstream.IDR) for g in groups]
      if video_io.write_mp4(stem + ".mp4", self.header(), packets, self.fps,
                            self.width, self.height):
        paths.append(stem + ".mp4")
      images = [Image.fromarray(f) for f in frames]
      images[0].save(stem + ".gif", save_all=True, append_images=images[1:],
                     duration=round(1000 / self.fps), loop=0)
      paths.append(stem + ".gif")
    Image.fromarray(self.preview(frames)).save(stem + ".png")
    paths.append(stem + ".png")
    return paths


class _Reference(NamedTuple):
  header: bytes
  x264: str  # e.g. "core 165", "" when x264 wrote no SEI.


@functools.lru_cache(maxsize=None)
def _reference(codec: AvcCodec) -> _Reference:
  """Header and x264 version of a codec, from encoding one black frame."""
  raw = codec._x264(  # pylint: disable=protected-access
      np.zeros((1, codec.height, codec.width, 3), np.uint8))
  return _Reference(h264_bitstream.parameter_sets(raw),
                    h264_bitstream.x264_version(raw))


def _as_bytes(data) -> bytes:
  return codecs.as_bytes(data, "AVC")
