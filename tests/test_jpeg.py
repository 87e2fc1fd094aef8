"""JPEG codec: Pillow agreement, headers, prompts, loading, bad input, repair."""

import functools
import io
import json
import struct
import warnings
import zlib

from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest
from skimage import data as skdata

from codeclm.codecs import CodecError
from codeclm.codecs import jpeg

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
C64 = jpeg.JpegCodec(64, 64)
C128 = jpeg.JpegCodec(128, 128)


@functools.lru_cache(maxsize=None)
def photo(name: str, width: int, height: int) -> np.ndarray:
  """A real photograph, resized (not cropped) to width x height."""
  image = Image.fromarray(getattr(skdata, name)()).convert("RGB")
  return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))


def pillow_save(pixels: np.ndarray, **options) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "JPEG", **options)
  return out.getvalue()


def pillow_decode(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    assert im.format == "JPEG"
    return np.asarray(im.convert("RGB"))


def rst_positions(data: bytes) -> list[int]:
  """Offsets of the FF Dn restart markers (a plain scan; FF is stuffed)."""
  return [i for i in range(len(data) - 1)
          if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]


def intervals(data: bytes) -> tuple[bytes, list[bytes]]:
  """(headers through SOS, restart intervals) of a canonical stream."""
  sos = data.index(b"\xff\xda")
  start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
  cuts = [start] + [p + 2 for p in rst_positions(data)]
  ends = rst_positions(data) + [data.index(b"\xff\xd9", start)]
  return data[:start], [data[a:b] for a, b in zip(cuts, ends)]


def assemble(head: bytes, pieces: list[bytes]) -> bytes:
  out = head
  for i, piece in enumerate(pieces):
    out += (bytes([0xFF, 0xD0 + (i - 1) % 8]) if i else b"") + piece
  return out + b"\xff\xd9"


# -- encoding ------------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("codec", [
    jpeg.JpegCodec(), C64, jpeg.JpegCodec(96, 48),
    jpeg.JpegCodec(64, 48, quality=60, subsampling="4:2:2"),
    jpeg.JpegCodec(40, 24, quality=10, subsampling="4:4:4")],
    ids=str)
def test_encode_is_plain_pillow_save(name, codec):
  pixels = photo(name, codec.width, codec.height)
  expected = pillow_save(pixels, quality=codec.quality,
                         subsampling=codec.subsampling, streamtype=2,
                         restart_marker_blocks=1)
  assert codec.encode(pixels) == expected
  assert codec.encode(Image.fromarray(pixels)) == expected


def test_encode_drops_source_comment():
  image = Image.fromarray(photo("coffee", 64, 64))
  image.info["comment"] = b"from the source file"
  assert b"source file" not in C64.encode(image)
  assert C64.encode(image) == C64.encode(np.asarray(image))


@pytest.mark.parametrize("codec", [C64, jpeg.JpegCodec(),
                                   jpeg.JpegCodec(48, 32, subsampling="4:2:2"),
                                   jpeg.JpegCodec(24, 16, subsampling="4:4:4")],
                         ids=str)
@pytest.mark.parametrize("name", PHOTOS)
def test_decode_matches_pillow_on_wrapped_stream(codec, name):
  data = codec.encode(photo(name, codec.width, codec.height))
  wrapped = codec.wrap(data)
  with Image.open(io.BytesIO(wrapped)) as im:
    assert (im.format, im.size, im.mode) == (
        "JPEG", (codec.width, codec.height), "RGB")
  pixels, report = codec.decode(data)
  assert pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels, pillow_decode(wrapped))
  assert report == jpeg.DecodeReport(codec.num_mcus, codec.num_mcus,
                                     codec.num_mcus)
  assert report.clean_fraction == 1.0
  # A complete file (tables in it) decodes the same: its headers are ignored.
  assert codec.decode(wrapped)[1] == report
  np.testing.assert_array_equal(codec.decode(wrapped)[0], pixels)


def test_encode_stream_structure():
  data = C64.encode(photo("astronaut", 64, 64))
  assert data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")
  assert b"\xff\xdb" not in data and b"\xff\xc4" not in data  # No tables.
  markers = [data[p + 1] for p in rst_positions(data)]
  assert markers == [0xD0 + i % 8 for i in range(C64.num_mcus - 1)]


def test_header_cached_and_tables_only():
  header = C64.header()
  assert jpeg.JpegCodec(128, 32).header() is header  # Same settings: cached.
  assert jpeg.JpegCodec(quality=26).header() != header
  assert header.startswith(b"\xff\xd8") and header.endswith(b"\xff\xd9")
  assert header.count(b"\xff\xdb") >= 1 and header.count(b"\xff\xc4") >= 1
  assert b"\xff\xc0" not in header and b"\xff\xda" not in header
  expected = pillow_save(np.zeros((16, 16, 3), np.uint8), quality=25,
                         subsampling="4:2:0", streamtype=1)
  assert header == expected


def test_wrap_needs_soi():
  with pytest.raises(CodecError, match="SOI"):
    C64.wrap(b"\x00\x01junk")


def test_save_writes_a_real_jpeg_and_its_decode(tmp_path):
  data = C64.encode(photo("coffee", 64, 64))
  paths = C64.save(str(tmp_path / "a"), data)
  assert paths == [str(tmp_path / "a.jpg"), str(tmp_path / "a.png")]
  with open(paths[0], "rb") as f:
    assert f.read() == C64.wrap(data)
  np.testing.assert_array_equal(np.asarray(Image.open(paths[1])),
                                C64.decode(data)[0])
  # Model garbage still gives a decodable file: the repaired rebuild.
  paths = C64.save(str(tmp_path / "b"), b"\x00garbage")
  with open(paths[0], "rb") as f:
    assert pillow_decode(f.read()).shape == (64, 64, 3)
  assert C64.preview(C64.decode(data)[0]).shape == (64, 64, 3)


def test_geometry_and_settings():
  assert jpeg.JpegCodec().num_mcus == 256
  assert jpeg.JpegCodec(64, 32, subsampling="4:2:2").num_mcus == 16
  assert jpeg.JpegCodec(64, 32, subsampling="4:4:4").num_mcus == 32
  codec = jpeg.JpegCodec(96, 64, quality=30)
  settings_ = json.loads(json.dumps(codec.settings()))
  assert settings_["name"] == "jpeg" and settings_["pillow"]
  assert settings_["libjpeg"]
  assert jpeg.JpegCodec.from_settings(settings_) == codec
  with pytest.raises(CodecError, match="unknown keys"):
    jpeg.JpegCodec.from_settings(dict(settings_, qualty=3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=100), "width=100.*multiple of the 16-pixel.*width=96"),
    (dict(height=8), "height=8.*4:2:0"),
    (dict(width=24, height=24, subsampling="4:2:2"), "width=24"),
    (dict(subsampling="4:1:1"), "subsampling"),
    (dict(quality=0), "quality"),
])
def test_bad_settings(kwargs, match):
  with pytest.raises(CodecError, match=match):
    jpeg.JpegCodec(**kwargs)


# -- prompts -------------------------------------------------------------------


@pytest.mark.parametrize("codec", [C64, C128, jpeg.JpegCodec(),
                                   jpeg.JpegCodec(64, 32, subsampling="4:2:2"),
                                   jpeg.JpegCodec(32, 32, subsampling="4:4:4")],
                         ids=str)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_prompt_is_top_rows(codec, ratio):
  """Measured: a prompt's MCU rows decode exactly as in the full image, except
  at 4:2:0 the last pixel row before the cut, where libjpeg's fancy (triangle)
  chroma upsampling mixes in the chroma row below the cut."""
  data = codec.encode(photo("chelsea", codec.width, codec.height))
  full, _ = codec.decode(data)
  cut = codec.prompt(data, ratio)
  cols, rows = codec.mcu_grid
  k = round(ratio * rows) * cols
  assert data.startswith(cut) and cut.endswith(bytes([0xFF, 0xD0 + (k - 1) % 8]))
  assert codec.count_mcus(cut) == k
  pixels, report = codec.decode(cut)
  assert report == jpeg.DecodeReport(codec.num_mcus, k, k)
  top = k // cols * codec.mcu_size[1]
  same = (pixels[:top] == full[:top]).all(axis=(1, 2))
  if codec.subsampling == "4:2:0":
    assert same[:-1].all() and not same[-1]
  else:
    assert same.all()
  # Below the cut the MCUs are missing: flat grey away from the boundary.
  assert (pixels[top + 1:] == 128).all()


def test_prompt_mcu_granularity():
  data = C64.encode(photo("coffee", 64, 64))
  cut = C64.prompt(data, 0.3, whole_rows=False)
  assert C64.count_mcus(cut) == round(0.3 * 16) == 5
  assert C64.decode(cut)[1] == jpeg.DecodeReport(16, 5, 5)
  # k stays within [one unit, all but one unit].
  assert C64.count_mcus(C64.prompt(data, 0.01)) == 4
  assert C64.count_mcus(C64.prompt(data, 0.99)) == 12
  assert C64.count_mcus(C64.prompt(data, 0.99, whole_rows=False)) == 15


def test_prompt_errors():
  data = C64.encode(photo("coffee", 64, 64))
  for ratio in (0, 1, -0.5, 1.5):
    with pytest.raises(CodecError, match="ratio"):
      C64.prompt(data, ratio)
  with pytest.raises(CodecError, match="restart markers"):
    C64.prompt(data[:len(data) // 3], 0.75)
  with pytest.raises(CodecError, match="single"):
    jpeg.JpegCodec(32, 16).prompt(data, 0.5)


def test_count_mcus():
  data = C64.encode(photo("rocket", 64, 64))
  positions = rst_positions(data)
  assert C64.count_mcus(data) == 16
  assert C64.count_mcus(b"") == 0
  assert C64.count_mcus(data[:positions[0] + 2]) == 1
  # Cut inside an interval: only complete intervals count...
  assert C64.count_mcus(data[:positions[6] - 1]) == 6
  # ...but an interval closed by EOI does, and an empty one does not.
  assert C64.count_mcus(data[:positions[6]] + b"\xff\xd9") == 7
  assert C64.count_mcus(data[:positions[6] + 2] + b"\xff\xd9") == 7
  assert C64.count_mcus(data + b"\xff\xd0junk") == 16  # After EOI: ignored.


# -- loading -------------------------------------------------------------------


def test_load_centre_crops_then_resizes():
  wide = np.zeros((50, 100, 3), np.uint8)
  wide[:, :25] = (255, 0, 0)
  wide[:, 25:75] = photo("coffee", 50, 50)
  wide[:, 75:] = (0, 255, 0)
  reference = Image.fromarray(wide[:, 25:75]).resize(
      (32, 32), Image.Resampling.LANCZOS)
  codec = jpeg.JpegCodec(32, 32)
  np.testing.assert_array_equal(np.asarray(codec.load(wide)), reference)
  tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
  loaded = jpeg.JpegCodec(32, 32).load(tall)
  np.testing.assert_array_equal(
      np.asarray(loaded),
      Image.fromarray(tall[25:75]).resize((32, 32), Image.Resampling.LANCZOS))
  assert jpeg.JpegCodec(48, 16).load(wide).size == (48, 16)


def _modes() -> dict:
  """{mode: (image in that mode, the RGB picture it should load as)}."""
  rgb = photo("astronaut", 64, 64)
  grey = np.asarray(Image.fromarray(rgb).convert("L"))
  opaque = np.dstack([rgb, np.full((64, 64), 255, np.uint8)])
  clear = np.dstack([rgb, np.zeros((64, 64), np.uint8)])
  palette = Image.fromarray(rgb).quantize(64)
  cmyk = Image.fromarray(rgb).convert("CMYK")
  as_rgb = lambda x: np.asarray(Image.fromarray(x).convert("RGB"))
  return {
      "RGBA opaque": (Image.fromarray(opaque), rgb),
      "RGBA clear": (Image.fromarray(clear), np.full_like(rgb, 255)),
      "P": (palette, np.asarray(palette.convert("RGB"))),
      "L": (Image.fromarray(grey), as_rgb(grey)),
      "L array": (grey, as_rgb(grey)),
      "HxWx1 array": (grey[..., None], as_rgb(grey)),
      "CMYK": (cmyk, np.asarray(cmyk.convert("RGB"))),
      "I;16": (Image.fromarray(grey.astype(np.uint16) * 257), as_rgb(grey)),
      "F": (Image.fromarray(grey.astype(np.float32) / 255), as_rgb(grey)),
      "1": (Image.fromarray(grey > 128), as_rgb((grey > 128).astype(np.uint8)
                                                * 255)),
  }


@pytest.mark.parametrize("mode", list(_modes()))
def test_load_modes(mode):
  image, expected = _modes()[mode]
  if isinstance(image, Image.Image):  # The input really is in that mode.
    assert image.mode == mode.split()[0]
  loaded = C64.load(image)
  assert (loaded.mode, loaded.size) == ("RGB", (64, 64))
  np.testing.assert_array_equal(np.asarray(loaded), expected)
  assert C64.decode(C64.encode(image))[1].clean == 16


def test_load_semitransparent_composites_on_white():
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[..., 3] = 64  # 25% red over white.
  loaded = np.asarray(jpeg.JpegCodec(16, 16).load(rgba)).astype(int)
  np.testing.assert_allclose(loaded[0, 0], [255 + (200 - 255) * 64 / 255,
                                            255 * 191 / 255, 255 * 191 / 255],
                             atol=1)


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("as_path", [True, False])
def test_load_applies_exif_orientation(tmp_path, orientation, as_path):
  stored = np.zeros((64, 96, 3), np.uint8)  # 96 wide, 64 tall, as stored.
  stored[:32, :48] = (255, 0, 0)  # Red top-left quadrant.
  stored[32:, 48:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = tmp_path / "turned.jpg"
  Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
  source = str(path) if as_path else path.read_bytes()
  codec = jpeg.JpegCodec(48, 32)
  loaded = np.asarray(codec.load(source)).astype(int)
  with Image.open(path) as im:
    upright = ImageOps.exif_transpose(im)
  expected = np.asarray(codec.load(upright)).astype(int)
  np.testing.assert_array_equal(loaded, expected)
  # Independent check of the turn: where the red quadrant must end up.
  red = {3: (-1, -1), 6: (0, -1), 8: (-1, 0)}[orientation]
  assert np.abs(loaded[red] - [255, 0, 0]).max() < 40
  upright_size = (96, 64) if orientation == 3 else (64, 96)
  assert upright.size == upright_size
  assert codec.encode(source) == codec.encode(loaded.astype(np.uint8))


def test_load_large_jpeg_uses_reduced_decode():
  big = Image.fromarray(photo("astronaut", 512, 512)).resize(
      (1024, 1024), Image.Resampling.BICUBIC)
  out = io.BytesIO()
  big.save(out, "JPEG", quality=95)
  codec = jpeg.JpegCodec(64, 64)
  fast = np.asarray(codec.load(out.getvalue())).astype(int)
  with Image.open(io.BytesIO(out.getvalue())) as im:
    full = np.asarray(codec.load(im.convert("RGB"))).astype(int)
  assert np.abs(fast - full).mean() < 1.0 and np.abs(fast - full).max() < 16


# -- bad input -----------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
  """A PNG claiming a size, with a token IDAT (Pillow reads only the header)."""
  def chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload +
            struct.pack(">I", zlib.crc32(kind + payload)))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
          chunk(b"IDAT", zlib.compress(b"\0" * 16)))


def test_bad_inputs_name_the_input(tmp_path):
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  text = tmp_path / "notes.jpg"
  text.write_bytes(b"this is not an image")
  truncated = tmp_path / "cut.jpg"
  truncated.write_bytes(pillow_save(photo("coffee", 128, 128))[:400])
  cases = [
      (str(empty), "empty.png"),
      (empty, "empty.png"),  # os.PathLike
      (str(text), "notes.jpg"),
      (str(truncated), "cut.jpg"),
      (str(tmp_path / "missing.jpg"), "missing.jpg"),
      (b"this is not an image", "20 bytes"),
      (b"", "0 bytes"),
      (np.zeros((0, 8, 3), np.uint8), r"shape \(0, 8, 3\).*zero size"),
      (np.zeros((8, 8, 3), np.float32), "float32.*uint8"),
      (np.zeros((8, 8, 2), np.uint8), r"shape \(8, 8, 2\)"),
      (Image.new("RGB", (0, 0)), "zero size"),
      (42, "type int"),
  ]
  for image, match in cases:
    with pytest.raises(CodecError, match=match):
      C64.encode(image)


def test_decompression_bomb_is_codec_error(tmp_path, monkeypatch):
  filters = list(warnings.filters)
  limit = Image.MAX_IMAGE_PIXELS
  # Above the limit (Pillow warns) and above twice it (Pillow raises).
  for side in (10_000, 100_000):
    path = tmp_path / f"bomb{side}.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(CodecError, match=f"bomb{side}.png.*too large"):
      C64.load(str(path))
    with pytest.raises(CodecError, match="bytes of image data.*too large"):
      C64.load(path.read_bytes())
  assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == limit
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  with pytest.raises(CodecError, match="32x32.*limit of 100"):
    C64.load(Image.new("RGB", (32, 32)))


# -- decoding model output -----------------------------------------------------


def annex_k(*codes: str) -> bytes:
  """Entropy bytes from Huffman code strings of the standard tables (JPEG
  Annex K), padded with 1s and byte-stuffed: an independent encoder."""
  bits = "".join(codes)
  bits += "1" * (-len(bits) % 8)
  raw = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
  return raw.replace(b"\xff", b"\xff\x00")


Y_DC0, Y_DC1, Y_AC01, Y_EOB, Y_ZRL = "00", "010", "00", "1010", "11111111001"
C_DC0, C_EOB = "00", "00"
GREY_CHROMA = (C_DC0, C_EOB, C_DC0, C_EOB)


@pytest.mark.parametrize("codes, clean", [
    ((Y_DC0, Y_EOB) * 4 + GREY_CHROMA, True),  # Flat grey.
    ((Y_DC1, "1", Y_EOB) + (Y_DC0, Y_EOB) * 3 + GREY_CHROMA, True),  # Padded.
    ((Y_DC0, Y_ZRL, Y_ZRL, Y_ZRL, Y_EOB) + (Y_DC0, Y_EOB) * 3 + GREY_CHROMA,
     True),
    ((Y_DC0,) + (Y_AC01, "1") * 63 + (Y_DC0, Y_EOB) * 3 + GREY_CHROMA,
     True),  # Coefficient 63 reached: no EOB needed.
    ((Y_DC0,) + (Y_AC01, "1") * 62 + (Y_ZRL,) + (Y_DC0, Y_EOB) * 3
     + GREY_CHROMA, False),  # 16 zeros from index 63: past 63.
    ((Y_DC0,) + (Y_ZRL,) * 4 + (Y_DC0, Y_EOB) * 3 + GREY_CHROMA, False),
    ((Y_DC0, Y_EOB) * 4 + (C_DC0, C_EOB), False),  # A block short.
    ((Y_DC0, Y_EOB) * 5 + GREY_CHROMA, False),  # A block too many.
    ((Y_DC0, Y_EOB) * 4 + GREY_CHROMA + ("11111111",), False),  # Byte left.
    ((), False),  # Empty interval.
])
def test_huffman_check(codes, clean):
  codec = jpeg.JpegCodec(32, 16)  # Two MCUs: the probe and a flat grey one.
  grey = annex_k(*((Y_DC0, Y_EOB) * 4 + GREY_CHROMA))
  probe = annex_k(*codes)
  for data in (probe + b"\xff\xd0" + grey,  # Bare entropy data.
               codec.wrap(codec.encode(np.zeros((16, 32, 3), np.uint8))
                          ).split(b"\xff\xda")[0] + b"\xff\xda\x00\x0c" +
               b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00" + probe +
               b"\xff\xd7" + grey + b"\xff\xd9"):
    assert codec.repair(data)[1] == jpeg.DecodeReport(2, 2, 1 + clean)


def test_unstuffed_ff_is_unclean():
  """An FF data byte without its 00 stuffing reads as a marker to libjpeg, so
  the interval must be rejected even though its bits alone decode."""
  codec = jpeg.JpegCodec(16, 16)
  codes = ((Y_DC0, Y_AC01, "1", Y_AC01, "1", Y_ZRL, Y_EOB) +
           (Y_DC0, Y_EOB) * 3 + GREY_CHROMA)  # ZRL's 1s fill byte 2: FF.
  stuffed = annex_k(*codes)
  assert stuffed[1:3] == b"\xff\x00"
  assert codec.decode(stuffed)[1].clean == 1
  unstuffed = stuffed.replace(b"\xff\x00", b"\xff")
  pixels, report = codec.decode(unstuffed)
  assert report.clean == 0 and (pixels == 128).all()


def test_padding_must_be_ones():
  codec = jpeg.JpegCodec(16, 16)
  bits = Y_DC1 + "1" + Y_EOB + (Y_DC0 + Y_EOB) * 3 + "".join(GREY_CHROMA)
  ones, zeros = (int(bits + p * (-len(bits) % 8), 2).to_bytes(5, "big")
                 for p in "10")
  assert codec.decode(ones)[1].clean == 1
  assert codec.decode(zeros)[1].clean == 0


def test_grey_mcu_is_annex_k_flat_block():
  layout = jpeg._layout(64, 64, 25, "4:2:0")  # pylint: disable=protected-access
  assert layout.grey == annex_k(*((Y_DC0, Y_EOB) * 4 + GREY_CHROMA))
  pixels, report = C64.decode(b"")
  assert report == jpeg.DecodeReport(16, 0, 0) and report.clean_fraction == 0
  assert pixels.shape == (64, 64, 3) and (pixels == 128).all()


@pytest.mark.parametrize("index", [0, 9, 27, 36, 63])
def test_damaged_mcu_is_grey_and_the_rest_intact(index):
  data = C128.encode(photo("astronaut", 128, 128))
  full, _ = C128.decode(data)
  head, pieces = intervals(data)
  pieces[index] = pieces[index][:len(pieces[index]) // 2]
  pixels, report = C128.decode(assemble(head, pieces))
  assert report == jpeg.DecodeReport(64, 64, 63)
  y, x = 16 * (index // 8), 16 * (index % 8)  # The patch in the 8x8 grid.
  assert (pixels[y + 1:y + 15, x + 1:x + 15] == 128).all()
  # Measured: changes stay within the patch grown by one pixel, the reach of
  # libjpeg's triangle chroma upsampling; everything else is unchanged.
  changed = (pixels != full).any(axis=2)
  assert changed[y:y + 16, x:x + 16].any()
  changed[max(y - 1, 0):y + 17, max(x - 1, 0):x + 17] = False
  assert not changed.any()


def test_out_of_order_markers_and_extra_mcus():
  data = C64.encode(photo("coffee", 64, 64))
  full, report = C64.decode(data)
  head, pieces = intervals(data)
  # Marker numbers are only delimiters: placement is by stream order.
  shuffled = bytearray(data)
  for p in rst_positions(data):
    shuffled[p + 1] = 0xD0 + (shuffled[p + 1] * 5) % 8
  assert C64.decode(bytes(shuffled))[1] == report
  np.testing.assert_array_equal(C64.decode(bytes(shuffled))[0], full)
  # Too many MCUs: the extra ones are found but not drawn.
  extra = C64.decode(assemble(head, pieces + pieces[:3]))
  assert extra[1] == jpeg.DecodeReport(16, 19, 16)
  np.testing.assert_array_equal(extra[0], full)
  # A duplicated MCU shifts the rest by one place (stream order).
  pixels, dup = C64.decode(assemble(head, pieces[:5] + pieces[4:]))
  assert dup == jpeg.DecodeReport(16, 17, 16)
  np.testing.assert_array_equal(pixels[:15], full[:15])
  # No headers at all: the bytes are taken as entropy-coded data.
  bare = b"".join(p + bytes([0xFF, 0xD0 + i % 8])
                  for i, p in enumerate(pieces))
  np.testing.assert_array_equal(C64.decode(bare)[0], full)
  assert C64.decode(bare[:-2] + b"\xff\xd9junk")[1] == report


# -- never raises (hypothesis) -------------------------------------------------

FUZZ = settings(max_examples=75, deadline=None, derandomize=True,
                database=None, suppress_health_check=list(HealthCheck))
STREAM = C64.encode(photo("chelsea", 64, 64))
FULL = C64.decode(STREAM)[0]


def check(data: bytes) -> tuple[np.ndarray, jpeg.DecodeReport]:
  pixels, report = C64.decode(data)
  assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
  assert report.expected == 16
  assert 0 <= report.clean <= report.found and report.clean <= 16
  fixed, again = C64.repair(data)
  assert again == report and pillow_decode(fixed).shape == (64, 64, 3)
  C64.count_mcus(data)
  return pixels, report


@FUZZ
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes(data):
  check(data)
  check(STREAM[:STREAM.index(b"\xff\xda") + 14] + data)  # After real headers.


@FUZZ
@given(st.integers(0, len(STREAM)))
def test_fuzz_truncation(n):
  _, report = check(STREAM[:n])
  complete = C64.count_mcus(STREAM[:n])
  assert complete <= report.clean <= complete + 1


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]),
                          st.integers(0, len(STREAM) - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_fuzz_edits(edits):
  data = bytearray(STREAM)
  for op, pos, value in edits:
    pos %= max(len(data), 1)
    if op == "flip":
      data[pos] ^= 1 << (value % 8)
    elif op == "insert":
      data.insert(pos, value)
    elif data:
      del data[pos]
  check(bytes(data))


@FUZZ
@given(st.lists(st.integers(0, 14), min_size=2, max_size=6),
       st.lists(st.integers(0, 15), max_size=4), st.binary(max_size=50))
def test_fuzz_markers_duplicates_junk(swaps, duplicates, junk):
  head, pieces = intervals(STREAM)
  for d in duplicates:
    pieces.insert(d, pieces[d])
  data = bytearray(assemble(head, pieces) + junk)
  positions = rst_positions(bytes(data)[:len(data) - len(junk)])
  for a, b in zip(swaps[::2], swaps[1::2]):
    a, b = positions[a % len(positions)], positions[b % len(positions)]
    data[a + 1], data[b + 1] = data[b + 1], data[a + 1]
  pixels, report = check(bytes(data))
  assert report == jpeg.DecodeReport(16, 16 + len(duplicates), 16)
  if not duplicates:
    np.testing.assert_array_equal(pixels, FULL)
