"""Any picture as a fixed-size RGB image, the JPEG codec's input.

Kept apart from the codec because reading pictures is all Pillow's many
formats, modes and failure types, and none of it is JPEG: the codec encodes
whatever `load_rgb` gives it. Every failure is a CodecError naming the input.
"""

import contextlib
import io
import os
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

from codeclm import codecs
from codeclm.codecs import CodecError

_ORIENTATION = 0x0112  # EXIF tag.


def load_rgb(image, width: int, height: int) -> Image.Image:
  """`image` as a (width, height) RGB image (see `jpeg.JpegCodec`).

  image: a PIL image, an HxW / HxWx1 / HxWx3 / HxWx4 uint8 array, a path, or
  the bytes of an image file (the first frame of an animation). May return
  `image` itself when it is already an RGB image of the right size and
  orientation. Raises CodecError naming the input when it cannot be read.
  """
  with _reading(image):
    im = _open(image, width, height)
    im = _normalize_mode(im)
    im = _crop_resize(im, width, height)
    if im.mode == "RGBA":
      flat = Image.new("RGB", im.size, (255, 255, 255))
      flat.paste(im, mask=im.getchannel("A"))
      im = flat
    elif im.mode != "RGB":
      im = im.convert("RGB")
  return im


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
        f"{codecs.describe(image)} is too large to decode safely ({e}); shrink "
        "it first or leave it out of the data.") from e
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Pillow's readers raise OSError, SyntaxError, ValueError, EOFError,
    # struct.error, ...: all mean the same thing to a caller.
    raise CodecError(
        f"{codecs.describe(image)} is not a readable image ({type(e).__name__}"
        f": {e}); check or replace the file, or leave it out.") from e


def _open(image, width: int, height: int) -> Image.Image:
  """The input as a loaded PIL image in its own mode, EXIF orientation
  applied."""
  if isinstance(image, np.ndarray):
    return _from_array(image)
  if isinstance(image, Image.Image):
    _check_size(image, image)
    return _upright(image)
  if not isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
    raise CodecError(
        f"Cannot load an {codecs.describe(image)}: pass a PIL image, a uint8 "
        "array, a path, or the bytes of an image file.")
  source = image
  if not isinstance(image, (str, os.PathLike)):
    if not len(image):
      raise CodecError(f"{codecs.describe(image)}: empty input; pass the "
                       "bytes of an image file.")
    source = io.BytesIO(image)
  with Image.open(source) as opened:
    _check_size(opened, image)
    if opened.format == "JPEG":
      _draft(opened, width, height)
    return _upright(opened)  # Loaded before the file closes.


def _upright(im: Image.Image) -> Image.Image:
  """`im` loaded and turned as its EXIF orientation says (copied if turned)."""
  im.load()
  if im.getexif().get(_ORIENTATION, 1) in range(2, 9):
    return ImageOps.exif_transpose(im)
  return im


def _check_size(im: Image.Image, image) -> None:
  w, h = im.size
  if w <= 0 or h <= 0:
    raise CodecError(f"{codecs.describe(image)} has zero size ({w}x{h}); pass "
                     "a non-empty image.")
  limit = Image.MAX_IMAGE_PIXELS
  if limit and w * h > limit:
    raise CodecError(
        f"{codecs.describe(image)} is {w}x{h}, above Pillow's "
        f"decompression-bomb limit of {limit} pixels; shrink it first or "
        "leave it out.")


def _from_array(array: np.ndarray) -> Image.Image:
  ok_shape = array.ndim == 2 or (
      array.ndim == 3 and array.shape[2] in (1, 3, 4))
  if array.dtype != np.uint8 or not ok_shape:
    raise CodecError(
        f"Cannot load an {codecs.describe(array)}: pass uint8 pixels shaped "
        "HxW, HxWx1, HxWx3 or HxWx4 (e.g. np.clip(x * 255, 0, 255).astype("
        "np.uint8) for floats in [0, 1]).")
  if not array.size:
    raise CodecError(f"{codecs.describe(array)} has zero size; pass a "
                     "non-empty image.")
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
