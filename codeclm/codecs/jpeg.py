"""The JPEG codec: pixels <-> the paper's canonical JPEG bytes.

Owns everything about the JPEG format in codeclm: loading any picture into a
fixed-size RGB image, encoding it with the Jpeg-LM settings (Pillow,
quality 25, 4:2:0, tables stripped with `streamtype=2`, a restart marker after
every MCU), the tables-only header re-inserted to decode, prompts cut at
restart markers, and a decoder that turns any byte string a model writes into
pixels plus a report of how much of it was valid.

Decoding never trusts the model's headers. It takes the entropy-coded data
(after an SOS segment if there is one), splits it into restart intervals, checks
each with a small Huffman decoder built from the codec's own tables, replaces
bad or missing MCUs with a flat grey one, and has Pillow decode a canonical
file built from the codec's own headers. Restart markers only delimit MCUs:
MCUs are placed in stream order and the markers' numbers (D0..D7) are ignored
and rewritten, so a wrongly numbered marker does not make an MCU unclean.
"""

import contextlib
import dataclasses
import functools
import io
import os
import re
from typing import ClassVar, NamedTuple
import warnings

import numpy as np
import PIL
from PIL import features
from PIL import Image
from PIL import ImageOps

from codeclm import codecs
from codeclm.codecs import CodecError

_SOI, _EOI, _SOS = b"\xff\xd8", b"\xff\xd9", b"\xff\xda"
_RST = tuple(bytes([0xFF, 0xD0 + i]) for i in range(8))
# A restart marker in entropy-coded data, with any fill bytes before it. Data
# 0xFF bytes are stuffed as FF 00, so FF D0..D7 there is always a marker.
_RST_RE = re.compile(rb"\xff+[\xd0-\xd7]")
# Pixels per MCU, (width, height), for each chroma subsampling Pillow offers.
_MCU_SIZE = {"4:4:4": (8, 8), "4:2:2": (16, 8), "4:2:0": (16, 16)}
_GREY = 128  # Level shift: an all-zero MCU decodes to this.
_ORIENTATION = 0x0112  # EXIF tag.
_VERSION_KEYS = ("pillow", "libjpeg")


@dataclasses.dataclass(frozen=True)
class DecodeReport:
  """How much of a byte string was a valid image.

  expected: MCUs an image of the codec's size has.
  found: restart intervals present in the bytes (a trailing partial one
    included, extra ones beyond `expected` too).
  clean: intervals among the first `expected` that Huffman-decode to exactly
    one MCU; the others are drawn as flat grey.
  """
  expected: int
  found: int
  clean: int

  @property
  def clean_fraction(self) -> float:
    return self.clean / self.expected

  def to_dict(self) -> dict:
    return dict(expected=self.expected, found=self.found, clean=self.clean,
                clean_fraction=self.clean_fraction)


@dataclasses.dataclass(frozen=True)
class JpegCodec:
  """Jpeg-LM's canonical JPEG at one size, quality and chroma subsampling.

  Loading: alpha is composited on white; 16-bit greyscale is scaled to 8 bits
  (mode I too when it holds values above 255, as old Pillow gave 16-bit PNGs;
  mode F is taken as 0..1 when it lies in that range, else clipped to 0..255);
  the EXIF orientation is applied; the image is centre-cropped to the target
  aspect ratio and resized with LANCZOS. Large JPEG files are decoded at a
  reduced DCT scale (Pillow `draft`) when that still leaves at least twice the
  target resolution, which is far faster and visually equivalent.
  """
  width: int = 256
  height: int = 256
  quality: int = 25
  subsampling: str = "4:2:0"
  name: ClassVar[str] = "jpeg"

  def __post_init__(self):
    if self.subsampling not in _MCU_SIZE:
      raise CodecError(f"Unknown JPEG subsampling {self.subsampling!r}; use one "
                       f"of {sorted(_MCU_SIZE)}.")
    if not (isinstance(self.quality, int) and 1 <= self.quality <= 100):
      raise CodecError(f"JPEG quality={self.quality!r} must be an int in "
                       "[1, 100] (the paper uses 25).")
    for field, size, step in (("width", self.width, self.mcu_size[0]),
                              ("height", self.height, self.mcu_size[1])):
      if not (isinstance(size, int) and size > 0 and size % step == 0):
        near = max(step, step * round(size / step)) if isinstance(
            size, (int, float)) else step
        raise CodecError(
            f"JPEG {field}={size!r} must be a positive multiple of the "
            f"{step}-pixel MCU {field} at subsampling {self.subsampling}, so "
            f"that every MCU is whole; use e.g. {field}={near}.")

  # -- geometry ----------------------------------------------------------------

  @property
  def mcu_size(self) -> tuple[int, int]:
    """(width, height) in pixels of one MCU, i.e. one restart interval."""
    return _MCU_SIZE[self.subsampling]

  @property
  def mcu_grid(self) -> tuple[int, int]:
    """(columns, rows) of MCUs in an image."""
    return (self.width // self.mcu_size[0], self.height // self.mcu_size[1])

  @property
  def num_mcus(self) -> int:
    """MCUs per image, e.g. 256 at 256x256 4:2:0."""
    cols, rows = self.mcu_grid
    return cols * rows

  # -- settings ----------------------------------------------------------------

  def settings(self) -> dict:
    """JSON-able settings, with the library versions that produced the bytes."""
    return dict(name=self.name, width=self.width, height=self.height,
                quality=self.quality, subsampling=self.subsampling,
                pillow=PIL.__version__, libjpeg=features.version("jpg"))

  @classmethod
  def from_settings(cls, settings: dict) -> "JpegCodec":
    """The codec `settings()` describes; the version keys are ignored."""
    return cls(**codecs.fields_of(cls, settings, _VERSION_KEYS))

  # -- encoding ----------------------------------------------------------------

  def load(self, image) -> Image.Image:
    """Any picture as a (width, height) RGB image (see the class docstring).

    image: a PIL image, an HxW / HxWx1 / HxWx3 / HxWx4 uint8 array, a path, or
    the bytes of an image file (the first frame of an animation). May return
    `image` itself when it is already an RGB image of the right size and
    orientation. Raises CodecError naming the
    input when it cannot be read.
    """
    with _reading(image):
      im = _open(image, self.width, self.height)
      im = _normalize_mode(im)
      im = _crop_resize(im, self.width, self.height)
      if im.mode == "RGBA":
        flat = Image.new("RGB", im.size, (255, 255, 255))
        flat.paste(im, mask=im.getchannel("A"))
        im = flat
      elif im.mode != "RGB":
        im = im.convert("RGB")
    return im

  def encode(self, image) -> bytes:
    """The canonical stripped JPEG stream (streamtype=2) of `image`."""
    return _save(self.load(image), self.quality, self.subsampling, 2)

  def header(self) -> bytes:
    """The tables-only JPEG stream (SOI DQT.. DHT.. EOI) for these settings."""
    return _header(self.quality, self.subsampling)

  def wrap(self, data: bytes) -> bytes:
    """A standalone .jpg: the header's tables inserted after SOI (no repair)."""
    if not bytes(data[:2]) == _SOI:
      raise CodecError(
          f"wrap() needs a stream that starts with SOI (FF D8); got "
          f"{bytes(data[:2]).hex(' ') or 'no bytes'} ({len(data)} bytes). Use "
          "decode() or repair() for model output.")
    return _SOI + self.header()[2:-2] + bytes(data[2:])

  # -- files -------------------------------------------------------------------

  def preview(self, pixels: np.ndarray) -> np.ndarray:
    """The one picture grids and TensorBoard show for decoded `pixels`."""
    return pixels

  def save(self, stem: str, data: bytes) -> list[str]:
    """Writes `stem.jpg` (the bytes as a file) and `stem.png` (as decoded).

    The .jpg is `data` with the header re-inserted, or its repaired rebuild
    when `data` does not start like a JPEG stream. Never raises for model
    output. Returns the paths written.
    """
    try:
      jpg = self.wrap(data)
    except CodecError:
      jpg = self.repair(data)[0]
    with open(stem + ".jpg", "wb") as f:
      f.write(jpg)
    Image.fromarray(self.decode(data)[0]).save(stem + ".png")
    return [stem + ".jpg", stem + ".png"]

  # -- model output ------------------------------------------------------------

  def repair(self, data: bytes) -> tuple[bytes, DecodeReport]:
    """A canonical, decodable .jpg rebuilt from any byte string, and its report.

    The first `num_mcus` restart intervals are kept in stream order where they
    Huffman-decode to exactly one MCU (no invalid code, no coefficient past
    index 63, at most 7 bits of 1-padding left); the rest and the missing ones
    become flat grey MCUs. Headers, tables and marker numbers come from the
    codec, never from `data`. Never raises for any bytes-like `data`.
    """
    layout = _layout(self.width, self.height, self.quality, self.subsampling)
    pieces = _intervals(_entropy(_as_bytes(data))[0])
    expected = self.num_mcus
    kept, clean = [], 0
    for piece in pieces[:expected]:
      if _mcu_ok(piece, layout.blocks):
        kept.append(piece)
        clean += 1
      else:
        kept.append(layout.grey)
    kept += [layout.grey] * (expected - len(kept))
    body = [layout.prefix]
    for i, piece in enumerate(kept):
      if i:
        body.append(_RST[(i - 1) % 8])
      body.append(piece)
    body.append(_EOI)
    return b"".join(body), DecodeReport(expected, len(pieces), clean)

  def decode(self, data: bytes) -> tuple[np.ndarray, DecodeReport]:
    """(height, width, 3) uint8 pixels of any byte string, and its report.

    Never raises for any bytes-like `data` (see `repair`); should Pillow
    still fail, the picture is mid grey.
    """
    fixed, report = self.repair(data)
    shape = (self.height, self.width, 3)
    try:
      with Image.open(io.BytesIO(fixed)) as im:
        pixels = np.asarray(im.convert("RGB"))
      if pixels.shape == shape and pixels.dtype == np.uint8:
        return pixels, report
    except Exception:  # pylint: disable=broad-exception-caught
      pass  # Model output must never crash the caller: fall back to grey.
    return np.full(shape, _GREY, np.uint8), report

  def count_mcus(self, data: bytes) -> int:
    """MCUs present: complete restart intervals plus a trailing one before EOI.

    Unlike `DecodeReport.found`, a trailing interval that no EOI closes
    (output still being written, or cut) is not counted.
    """
    entropy, closed = _entropy(_as_bytes(data))
    pieces = _RST_RE.split(entropy)
    return len(pieces) - 1 + int(closed and bool(pieces[-1]))

  def prompt(self, data: bytes, ratio: float, *, whole_rows: bool = True
             ) -> bytes:
    """The prefix of `data` that ends right after the marker closing MCU k.

    whole_rows: k = round(ratio * rows) * columns (the top of the image, as
    the paper prompts), else k = round(ratio * num_mcus). k is kept within
    [one unit, all but one unit] (a unit being a row or an MCU), so a prompt is
    never empty nor the whole image. The prefix keeps the stream's own headers.
    """
    if not 0 < ratio < 1:
      raise CodecError(f"Prompt ratio={ratio!r} must lie strictly between 0 "
                       "and 1 (e.g. 0.25, 0.5, 0.75).")
    cols, rows = self.mcu_grid
    unit, units = (cols, rows) if whole_rows else (1, self.num_mcus)
    if units < 2:
      raise CodecError(
          f"A {self.width}x{self.height} image has a single "
          f"{'MCU row' if whole_rows else 'MCU'}: no prompt can be cut; use "
          "whole_rows=False or a larger codec.")
    k = unit * min(max(round(ratio * units), 1), units - 1)
    data = _as_bytes(data)
    start, end = _entropy_span(data)
    found = 0
    for found, marker in enumerate(_RST_RE.finditer(data, start, end), 1):
      if found == k:
        return data[:marker.end()]
    raise CodecError(
        f"Cannot cut a prompt of {k} MCUs (ratio={ratio}) from {len(data)} "
        f"bytes holding only {found} restart markers; pass a full encoded "
        "image from encode().")


# -- loading ---------------------------------------------------------------------


_describe = codecs.describe


@contextlib.contextmanager
def _reading(image):
  """Turns Pillow's many error types, and its bomb warning, into CodecError.

  The bomb warning becomes an error only inside this block: catch_warnings
  restores the filters on exit, and Image.MAX_IMAGE_PIXELS is never touched.
  (Before Python 3.14 the filter is process-wide while the block runs, so a
  concurrent thread's bomb warning may also raise; Pillow's own error would.)
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      yield
  except CodecError:
    raise
  except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
    raise CodecError(
        f"{_describe(image)} is too large to decode safely ({e}); shrink it "
        "first or leave it out of the data.") from e
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Pillow's readers raise OSError, SyntaxError, ValueError, EOFError,
    # struct.error, ...: all mean the same thing to a caller.
    raise CodecError(
        f"{_describe(image)} is not a readable image ({type(e).__name__}: "
        f"{e}); check or replace the file, or leave it out.") from e


def _open(image, width: int, height: int) -> Image.Image:
  """The input as a loaded PIL image in its own mode, EXIF orientation applied."""
  if isinstance(image, np.ndarray):
    return _from_array(image)
  if isinstance(image, Image.Image):
    _check_size(image, image)
    return _upright(image)
  if not isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
    raise CodecError(
        f"Cannot load an {_describe(image)}: pass a PIL image, a uint8 array, "
        "a path, or the bytes of an image file.")
  source = image
  if not isinstance(image, (str, os.PathLike)):
    if not len(image):
      raise CodecError(f"{_describe(image)}: empty input; pass the bytes of an "
                       "image file.")
    source = io.BytesIO(image)
  with Image.open(source) as opened:
    _check_size(opened, image)
    if opened.format == "JPEG":
      _draft(opened, width, height)
    return _upright(opened)  # Loaded before the file closes.


def _upright(im: Image.Image) -> Image.Image:
  """`im` loaded, turned as its EXIF orientation says (a copy only if turned)."""
  im.load()
  if im.getexif().get(_ORIENTATION, 1) in range(2, 9):
    return ImageOps.exif_transpose(im)
  return im


def _check_size(im: Image.Image, image) -> None:
  w, h = im.size
  if w <= 0 or h <= 0:
    raise CodecError(f"{_describe(image)} has zero size ({w}x{h}); pass a "
                     "non-empty image.")
  limit = Image.MAX_IMAGE_PIXELS
  if limit and w * h > limit:
    raise CodecError(
        f"{_describe(image)} is {w}x{h}, above Pillow's decompression-bomb "
        f"limit of {limit} pixels; shrink it first or leave it out.")


def _from_array(array: np.ndarray) -> Image.Image:
  ok_shape = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
  if array.dtype != np.uint8 or not ok_shape:
    raise CodecError(
        f"Cannot load an {_describe(array)}: pass uint8 pixels shaped HxW, "
        "HxWx1, HxWx3 or HxWx4 (e.g. np.clip(x * 255, 0, 255).astype(np.uint8)"
        " for floats in [0, 1]).")
  if not array.size:
    raise CodecError(f"{_describe(array)} has zero size; pass a non-empty "
                     "image.")
  if array.ndim == 3 and array.shape[2] == 1:
    array = array[..., 0]
  return Image.fromarray(array)


def _draft(im: Image.Image, width: int, height: int) -> None:
  """Asks libjpeg for a 1/2, 1/4 or 1/8 DCT-scaled decode that still leaves
  the crop at least twice the target size (an unloaded JPEG only)."""
  w, h = im.size
  if im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
    width, height = height, width  # Transposed after decoding.
  crop_w, crop_h = min(w, h * width / height), min(h, w * height / width)
  scale = max(2 * width / crop_w, 2 * height / crop_h)
  if scale < 0.5:
    im.draft(None, (int(np.ceil(w * scale)), int(np.ceil(h * scale))))


def _normalize_mode(im: Image.Image) -> Image.Image:
  """The image in mode L, RGB or RGBA, with 8-bit values."""
  mode = im.mode
  if mode in ("L", "RGB", "RGBA"):
    return im
  if mode.startswith("I;16") or mode in ("I", "F"):
    a = np.nan_to_num(np.asarray(im).astype(np.float64))
    if mode.startswith("I;16") or (mode == "I" and a.max() > 255):
      a = a / 257
    elif mode == "F" and a.min() >= 0 and a.max() <= 1:
      a = a * 255
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
  if mode == "P":
    return im.convert("RGBA" if "transparency" in im.info else "RGB")
  if mode in ("LA", "PA", "RGBa"):
    return im.convert("RGBA")
  return im.convert("RGB")  # 1, CMYK, YCbCr, LAB, HSV, RGBX, ...


def _crop_resize(im: Image.Image, width: int, height: int) -> Image.Image:
  """Centre crop (whole pixels) to the target aspect ratio, then LANCZOS.

  The crop is a real one: resize(box=...) alone would let the filter reach
  past the box and blend cropped-off content into the edges.
  """
  w, h = im.size
  if (w, h) == (width, height):
    return im
  if w * height > h * width:  # Too wide: crop the sides.
    crop = round(h * width / height)
    box = ((w - crop) // 2, 0, (w - crop) // 2 + crop, h)
  else:
    crop = round(w * height / width)
    box = (0, (h - crop) // 2, w, (h - crop) // 2 + crop)
  if box != (0, 0, w, h):
    im = im.crop(box)
  return im.resize((width, height), Image.Resampling.LANCZOS)


def _save(im: Image.Image, quality: int, subsampling: str,
          streamtype: int) -> bytes:
  """Pillow's JPEG with the paper's options; `comment=b""` keeps a source
  file's COM text (carried in im.info) out of the stream."""
  out = io.BytesIO()
  im.save(out, "JPEG", quality=quality, subsampling=subsampling,
          streamtype=streamtype, restart_marker_blocks=1, comment=b"")
  return out.getvalue()


# -- headers and tables ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _header(quality: int, subsampling: str) -> bytes:
  """Pillow's tables-only stream (streamtype=1); tables depend only on these."""
  size = _MCU_SIZE[subsampling]
  return _save(Image.new("RGB", size, (_GREY,) * 3), quality, subsampling, 1)


class _Layout(NamedTuple):
  """What decoding needs at one setting, from the codec's own encodings."""
  prefix: bytes  # SOI, APP0, tables, SOF, DRI, SOS: everything before MCU 0.
  grey: bytes  # Entropy bytes of a flat grey MCU (each block: DC 0, EOB).
  blocks: tuple  # (DC table, AC table) lookups for each block of an MCU.


@functools.lru_cache(maxsize=None)
def _layout(width: int, height: int, quality: int, subsampling: str) -> _Layout:
  """Headers and grey MCU from a reference encoding of a flat grey image.

  A flat image at the level-shift value has all-zero coefficients, and DC
  prediction restarts at every marker, so each of its intervals is the grey MCU.
  """
  image = Image.new("RGB", (width, height), (_GREY,) * 3)
  reference = _save(image, quality, subsampling, 0)
  by_marker = dict(segments(reference))
  start, end = _entropy_span(reference)
  grey = _RST_RE.split(reference[start:end])[0]
  tables = {}
  for marker, payload in segments(_header(quality, subsampling)):
    if marker == 0xC4:
      tables.update(_parse_dht(payload))
  sof, sos = by_marker[0xC0], by_marker[0xDA]
  sampling = {sof[6 + 3 * i]: sof[7 + 3 * i] for i in range(sof[5])}
  blocks = []
  for i in range(sos[0]):
    component, selectors = sos[1 + 2 * i], sos[2 + 2 * i]
    h, v = sampling[component] >> 4, sampling[component] & 15
    blocks += [(tables[0, selectors >> 4], tables[1, selectors & 15])] * (h * v)
  return _Layout(reference[:start], grey, tuple(blocks))


def segments(jpeg: bytes):
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


def _parse_dht(payload: bytes) -> dict:
  """{(class, id): lookup} for each table of a DHT segment; class 0 DC, 1 AC."""
  tables, i = {}, 0
  while i < len(payload):
    kind, counts = payload[i], payload[i + 1:i + 17]
    symbols = payload[i + 17:i + 17 + sum(counts)]
    tables[kind >> 4, kind & 15] = _lookup(counts, symbols, ac=kind >> 4 == 1)
    i += 17 + sum(counts)
  return tables


def _lookup(counts: bytes, symbols: bytes, ac: bool) -> list[int]:
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
  # _mcu_ok relies on the all-ones code being unused, as JPEG requires.
  assert not table[0xFFFF], "Huffman table uses the all-ones code"
  return table


# -- parsing model output --------------------------------------------------------


def _as_bytes(data) -> bytes:
  return codecs.as_bytes(data, "JPEG")


def _entropy_span(data: bytes) -> tuple[int, int]:
  """[start, end) of the entropy-coded data: after the first SOS segment (or
  from byte 0 when there is none and no SOI either), up to the first EOI."""
  sos = data.find(_SOS)
  if sos >= 0:
    start = min(len(data), sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"))
  elif data.startswith(_SOI):
    start = len(data)  # Headers only, or cut before the scan.
  else:
    start = 0
  end = data.find(_EOI, start)
  return start, len(data) if end < 0 else end


def _entropy(data: bytes) -> tuple[bytes, bool]:
  """The entropy-coded data, and whether an EOI closes it."""
  start, end = _entropy_span(data)
  return data[start:end], end < len(data)


def _intervals(entropy: bytes) -> list[bytes]:
  """Restart intervals in stream order; an empty trailing one is not one."""
  pieces = _RST_RE.split(entropy)
  return pieces if pieces[-1] else pieces[:-1]


def _mcu_ok(piece: bytes, blocks: tuple) -> bool:
  """Whether `piece` Huffman-decodes to exactly one MCU of `blocks`."""
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
