"""The JPEG codec: pixels <-> the paper's canonical JPEG bytes.

With `jpeg_bitstream` (markers, headers, Huffman checks) and `image_io`
(pictures in), owns everything about the JPEG format in codeclm: loading any
picture into a fixed-size RGB image, encoding it with the Jpeg-LM settings
(Pillow, quality 25, 4:2:0, tables stripped with `streamtype=2`, a restart
marker after every MCU), the tables-only header re-inserted to decode, prompts
cut at restart markers, and a decoder that turns any byte string a model
writes into pixels plus a report of how much of it was valid.

Decoding never trusts the model's headers. It takes the entropy-coded data
(after an SOS segment if there is one), splits it into restart intervals, checks
each with a small Huffman decoder built from the codec's own tables, replaces
bad or missing MCUs with a flat grey one, and has Pillow decode a canonical
file built from the codec's own headers. Restart markers only delimit MCUs:
MCUs are placed in stream order and the markers' numbers (D0..D7) are ignored
and rewritten, so a wrongly numbered marker does not make an MCU unclean.
"""

import dataclasses
import functools
import io
from typing import ClassVar, NamedTuple

import numpy as np
import PIL
from PIL import features
from PIL import Image

from codeclm import codecs
from codeclm.codecs import CodecError
from codeclm.codecs import image_io
from codeclm.codecs import jpeg_bitstream

# Pixels per MCU, (width, height), for each chroma subsampling Pillow offers.
_MCU_SIZE = {"4:4:4": (8, 8), "4:2:2": (16, 8), "4:2:0": (16, 16)}
_GREY = 128  # Level shift: an all-zero MCU decodes to this.
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
      raise CodecError(f"Unknown JPEG subsampling {self.subsampling!r}; use "
                       f"one of {sorted(_MCU_SIZE)}.")
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
    return image_io.load_rgb(image, self.width, self.height)

  def encode(self, image) -> bytes:
    """The canonical stripped JPEG stream (streamtype=2) of `image`."""
    return _save(self.load(image), self.quality, self.subsampling, 2)

  def header(self) -> bytes:
    """The tables-only JPEG stream (SOI DQT.. DHT.. EOI) for these settings."""
    return _header(self.quality, self.subsampling)

  def wrap(self, data: bytes) -> bytes:
    """A standalone .jpg: the header's tables inserted after SOI (no repair)."""
    if not bytes(data[:2]) == jpeg_bitstream.SOI:
      raise CodecError(
          f"wrap() needs a stream that starts with SOI (FF D8); got "
          f"{bytes(data[:2]).hex(' ') or 'no bytes'} ({len(data)} bytes). Use "
          "decode() or repair() for model output.")
    return jpeg_bitstream.SOI + self.header()[2:-2] + bytes(data[2:])

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
    pieces = jpeg_bitstream.intervals(
        jpeg_bitstream.entropy(_as_bytes(data))[0])
    expected = self.num_mcus
    kept, clean = [], 0
    for piece in pieces[:expected]:
      if jpeg_bitstream.mcu_ok(piece, layout.blocks):
        kept.append(piece)
        clean += 1
      else:
        kept.append(layout.grey)
    kept += [layout.grey] * (expected - len(kept))
    body = [layout.prefix]
    for i, piece in enumerate(kept):
      if i:
        body.append(jpeg_bitstream.RST[(i - 1) % 8])
      body.append(piece)
    body.append(jpeg_bitstream.EOI)
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
    entropy, closed = jpeg_bitstream.entropy(_as_bytes(data))
    pieces = jpeg_bitstream.RST_RE.split(entropy)
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
    start, end = jpeg_bitstream.entropy_span(data)
    found = 0
    markers = jpeg_bitstream.RST_RE.finditer(data, start, end)
    for found, marker in enumerate(markers, 1):
      if found == k:
        return data[:marker.end()]
    raise CodecError(
        f"Cannot cut a prompt of {k} MCUs (ratio={ratio}) from {len(data)} "
        f"bytes holding only {found} restart markers; pass a full encoded "
        "image from encode().")


# -- Pillow --------------------------------------------------------------------


def _save(im: Image.Image, quality: int, subsampling: str,
          streamtype: int) -> bytes:
  """Pillow's JPEG with the paper's options; `comment=b""` keeps a source
  file's COM text (carried in im.info) out of the stream."""
  out = io.BytesIO()
  im.save(out, "JPEG", quality=quality, subsampling=subsampling,
          streamtype=streamtype, restart_marker_blocks=1, comment=b"")
  return out.getvalue()


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
  start, end = jpeg_bitstream.entropy_span(reference)
  grey = jpeg_bitstream.RST_RE.split(reference[start:end])[0]
  tables = {
      key: jpeg_bitstream.huffman_lookup(counts, symbols, ac=key[0] == 1)
      for key, (counts, symbols) in jpeg_bitstream.huffman_tables(
          _header(quality, subsampling)).items()}
  blocks = jpeg_bitstream.scan_layout(reference).blocks
  return _Layout(reference[:start], grey,
                 tuple((tables[0, dc], tables[1, ac]) for dc, ac in blocks))


def _as_bytes(data) -> bytes:
  return codecs.as_bytes(data, "JPEG")
