"""Video through PyAV for the AVC codec: frames in, x264 out, H.264 back.

Kept apart from the codec (`avc`) so that the codec reads as its settings
and byte rules, and all of libav's timestamps, rotations, sample aspect
ratios, logging and error types live here. Every failure to read an input is
a CodecError naming it; decoding and muxing model output never raise.
"""

import contextlib
import fractions
import functools
import io
import os

import av
import numpy as np
from PIL import Image

from codeclm import codecs
from codeclm.codecs import CodecError


def _describe(video) -> str:
  return codecs.describe(video, "video")


def rate(fps: float) -> fractions.Fraction:
  """fps as an exact fraction (29.97 -> 2997/100, 30000/1001 stays close)."""
  return fractions.Fraction(fps).limit_denominator(100_000)


# -- reading -------------------------------------------------------------------


def read_frames(video, fps: float, targets: list[fractions.Fraction]):
  """(times, lazy pictures, end time) of an array of frames shown at `fps`,
  or of a video file (path or bytes, `fps` ignored) decoded up to the last of
  the `targets` times."""
  if isinstance(video, np.ndarray):
    return _array_frames(video, fps)
  if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)):
    return _file_frames(video, targets)
  raise CodecError(
      f"Cannot load an {_describe(video)}: pass a path, the bytes of a "
      "video file, or a [T, H, W, 3] uint8 array.")


def sample(times, pictures, targets, width: int, height: int) -> np.ndarray:
  """[len(targets), height, width, 3] uint8: the picture shown at each
  target time, letterboxed (each picture converted once)."""
  picked, i = [], 0
  for target in targets:
    while i + 1 < len(times) and times[i + 1] <= target:
      i += 1
    picked.append(i)
  cache = {}
  out = np.empty((len(targets), height, width, 3), np.uint8)
  for k, i in enumerate(picked):
    if i not in cache:
      cache[i] = _letterbox(pictures[i](), width, height)
    out[k] = cache[i]
  return out


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
  r = rate(fps)
  times = [i / r for i in range(len(video))]
  pictures = [functools.partial(Image.fromarray, frame) for frame in video]
  return times, pictures, len(video) / r


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
      frame_rate = stream.average_rate or stream.guessed_rate or None
      sar = (stream.sample_aspect_ratio
             or stream.codec_context.sample_aspect_ratio)
      origin, count = None, 0
      for frame in container.decode(stream):
        if frame.pts is None:
          if not frame_rate:
            raise CodecError(
                f"{_describe(video)} has frames without timestamps and no "
                "frame rate; remux it with timestamps (e.g. into .mp4).")
          time = count / fractions.Fraction(frame_rate)
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
  step = duration or (
      1 / fractions.Fraction(frame_rate) if frame_rate else None) or (
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


# -- x264 and libavcodec -------------------------------------------------------


def encode_x264(frames: np.ndarray, fps: float, *, profile: str, qp: int,
                threads: int, params: dict) -> bytes:
  """x264's Annex B stream of [n, height, width, 3] uint8 `frames`, as
  libx264 writes it; `params` are x264-params (underscores become dashes)."""
  r = rate(fps)
  ctx = av.CodecContext.create("libx264", "w")
  ctx.width, ctx.height, ctx.pix_fmt = frames.shape[2], frames.shape[1], (
      "yuv420p")
  ctx.time_base, ctx.framerate = 1 / r, r
  ctx.thread_count = threads
  ctx.options = {
      "profile": profile, "qp": str(qp),
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


def decode_h264(units, width: int, height: int) -> list[np.ndarray]:
  """[height, width, 3] uint8 frames libavcodec builds from `units`.

  units: Annex B access units, one packet each; an iterable consumed inside
  the guard, so that a failure while building them is swallowed too.
  show_all outputs frames even before an IDR frame; frames of another size
  are dropped. Never raises; libav's log messages are kept from the caller's
  logs.
  """
  pictures = []
  with av.logging.Capture(local=True):
    try:
      ctx = av.CodecContext.create("h264", "r")
      ctx.thread_count = 1
      ctx.flags2 |= av.codec.context.Flags2.show_all
      packets = list(units)
      for packet in packets + [None]:
        try:
          decoded = ctx.decode(None if packet is None else av.Packet(packet))
        except (av.FFmpegError, ValueError):  # Damage: skip this packet.
          continue
        for frame in decoded:
          if (frame.width, frame.height) == (width, height):
            pictures.append(frame.to_ndarray(format="rgb24"))
    except Exception:  # pylint: disable=broad-exception-caught
      pass  # Model output must never crash the caller: keep what decoded.
  return pictures


def write_mp4(path: str, header: bytes, packets: list[tuple[bytes, bool]],
              fps: float, width: int, height: int) -> bool:
  """Muxes (access unit, is keyframe) packets, one per frame (pts = dts =
  frame index, time base 1/fps), behind `header` (SPS, PPS) into an MP4;
  False (and no file) if libav refuses the stream."""
  r = rate(fps)
  try:
    with av.logging.Capture(local=True):
      with av.open(io.BytesIO(header), format="h264") as template, \
          av.open(path, "w", format="mp4") as out:
        stream = out.add_stream_from_template(template.streams.video[0])
        stream.time_base = 1 / r  # The muxer may pick a finer one.
        stream.codec_context.extradata = header
        stream.codec_context.width = width
        stream.codec_context.height = height
        for i, (unit, keyframe) in enumerate(packets):
          packet = av.Packet(unit)
          packet.stream = stream
          packet.time_base = 1 / r
          packet.pts = packet.dts = i
          packet.duration = 1
          packet.is_keyframe = keyframe
          out.mux(packet)
    return True
  except (av.FFmpegError, ValueError):
    with contextlib.suppress(OSError):
      os.remove(path)
    return False
