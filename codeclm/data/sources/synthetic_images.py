"""The synthetic image source: varied pictures, item i drawn from seed i.

Needs no data on disk, so tests, benchmarks and demos can prepare and train
anywhere; the video source draws its backgrounds with `synthetic_picture`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from PIL import ImageDraw

from codeclm.data.sources.base import check_index
from codeclm.data.sources.base import Item


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """Simple but varied pictures: backgrounds, shapes, stripes, strokes.

  Item i depends only on i (and the size), so any process or core draws the
  same picture; the content is rich enough that the codec bytes are not
  trivial (edges, gradients, flat areas and texture all appear).
  """
  num_examples: int
  width: int = 256
  height: int = 256

  label_names = None

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Item:
    check_index(index, self.num_examples)
    # A PIL image, not an array: saves the codec two copies per picture.
    return Item(key=f"synthetic/{index}",
                data=synthetic_picture(index, self.width, self.height))


def synthetic_image(index: int, width: int = 256, height: int = 256
                    ) -> np.ndarray:
  """An HxWx3 uint8 picture determined by `index` alone."""
  return np.asarray(synthetic_picture(index, width, height))


def synthetic_picture(index: int, width: int = 256, height: int = 256, *,
                      colour=None, seed: int = 0x5EED) -> Image.Image:
  """`synthetic_image` as an RGB PIL image.

  `colour(rng)` draws every colour (default `random_colour`); the labelled
  source (synthetic_classes.py) passes a palette per class, and its own seed.
  """
  colour = colour or random_colour
  rng = np.random.default_rng((seed, index))
  image = _background(rng, width, height, colour)
  draw = ImageDraw.Draw(image)
  scale = min(width, height)
  for _ in range(rng.integers(2, 9)):
    draw_shape(draw, rng, width, height, scale, colour)
  if rng.random() < 0.5:
    _strokes(draw, rng, width, height, scale, colour)
  return image


def random_colour(rng) -> tuple[int, int, int]:
  """An RGB colour from `rng` (the synthetic video source shares it)."""
  return tuple(int(c) for c in rng.integers(0, 256, 3))


def _background(rng, width: int, height: int, colour) -> Image.Image:
  """A gradient, stripes, a checkerboard or a flat colour with noise.

  Computed as 8-bit levels between two colours, then coloured through a
  palette by Pillow: per-pixel numpy work is kept to one or two passes, so a
  256x256 picture takes well under a millisecond.
  """
  kind = rng.integers(4)
  a = np.array(colour(rng), np.float32)
  b = np.array(colour(rng), np.float32)
  x = np.arange(width, dtype=np.float32)
  y = np.arange(height, dtype=np.float32)
  if kind == 0:  # Linear gradient in a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    x, y = x * np.cos(angle), y * np.sin(angle)
    lo = x.min() + y.min()
    k = 255 / max(x.max() + y.max() - lo, 1.0)
    level = ((x - x.min()) * k)[None, :] + ((y - y.min()) * k)[:, None]
  elif kind == 1:  # Stripes of random period and direction.
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(4, max(5.0, min(width, height) / 4))
    x, y = x * (np.cos(angle) / period), y * (np.sin(angle) / period) + 1e4
    level = ((x[None, :] + y[:, None]).astype(np.int32) & 1) * 255
  elif kind == 2:  # Checkerboard.
    cell = int(rng.integers(2, max(3, min(width, height) // 4)))
    cx = (np.arange(width) // cell).astype(np.uint8)
    cy = (np.arange(height) // cell).astype(np.uint8)
    level = ((cx[None, :] + cy[:, None]) & 1) * 255
  else:  # Flat with a little noise.
    level = rng.integers(0, 26, (height, width), dtype=np.uint8)
  palette = a + np.linspace(0, 1, 256, dtype=np.float32)[:, None] * (b - a)
  image = Image.frombytes("P", (width, height),
                          np.ascontiguousarray(level, np.uint8).tobytes())
  image.putpalette(palette.clip(0, 255).astype(np.uint8).tobytes())
  return image.convert("RGB")


def draw_shape(draw: ImageDraw.ImageDraw, rng, width: int, height: int,
           scale: int, colour) -> None:
  """One filled ellipse, rectangle or triangle, sometimes outlined."""
  cx, cy = rng.uniform(0, width), rng.uniform(0, height)
  rx, ry = rng.uniform(0.05, 0.35, 2) * scale
  outline = colour(rng) if rng.random() < 0.3 else None
  line = int(max(1, scale // 64))
  kind = rng.integers(3)
  if kind == 0:
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry),
                 fill=colour(rng), outline=outline, width=line)
  elif kind == 1:
    draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry),
                   fill=colour(rng), outline=outline, width=line)
  else:
    angles = rng.uniform(0, 2 * np.pi, 3)
    points = [(cx + rx * np.cos(t), cy + ry * np.sin(t)) for t in angles]
    draw.polygon(points, fill=colour(rng), outline=outline)


def _strokes(draw: ImageDraw.ImageDraw, rng, width: int, height: int,
             scale: int, colour) -> None:
  """Rows of short polylines that look like handwriting or text."""
  colour = colour(rng)
  size = rng.uniform(0.03, 0.08) * scale
  line = int(max(1, size // 6))
  y = rng.uniform(0, height * 0.5)
  for _ in range(rng.integers(1, 4)):
    x = rng.uniform(0, width * 0.3)
    for _ in range(rng.integers(3, 10)):
      glyph = [(x + rng.uniform(0, size), y + rng.uniform(0, size))
               for _ in range(rng.integers(2, 5))]
      draw.line(glyph, fill=colour, width=line)
      x += size * rng.uniform(0.8, 1.4)
    y += size * 1.6

