"""The labelled synthetic source: N classes told apart by their colour.

Item i has class c = i % N: a flat background in the class's own colour
(hue 360 * c / N, fixed saturation and brightness) with one to three shapes
(ellipses, rectangles, triangles, as synthetic_images.py draws them) in
colours within HUE_SPREAD degrees of that hue, random saturation and
brightness. A fixed rule checks a picture's class (`class_of`: the circular
mean hue of its coloured pixels, nearest class hue), which is what
class-conditional samples are scored by.

Why flat backgrounds: after JPEG, every background MCU of a class is the
same byte string (restart markers re-align each MCU), so a 100-step demo
model learns which class makes which string. Measured: with backgrounds and
shapes of random saturation and brightness (gradients, stripes, noise) such a
model told the 4 classes apart no better than chance; with the class's own
background colour, 0.98 of held-out pictures by likelihood.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools

import numpy as np
from PIL import Image
from PIL import ImageDraw

from codeclm.data.sources.base import check_index
from codeclm.data.sources.base import DataError
from codeclm.data.sources.base import Item
from codeclm.data.sources.synthetic_images import draw_shape

HUE_SPREAD = 12.0        # degrees either side of a class's hue
_SEED = 0xC1A55          # not the unlabelled source's: other pictures
_MIN_SATURATION = 0.55   # colours are clearly coloured ...
_MIN_VALUE = 0.35        # ... and not black, so their hue is visible
_BACKGROUND_SV = (0.85, 0.8)  # saturation and brightness of every background


def class_hue(label: int, num_classes: int) -> float:
  """Class `label`'s hue in degrees: 360 * label / num_classes."""
  return 360.0 * label / num_classes


def label_names(num_classes: int) -> list[str]:
  """"hue000", "hue090", ...: the class names say their hue."""
  return [f"hue{round(class_hue(c, num_classes)):03d}"
          for c in range(num_classes)]


def _hue_colour(rng, hue: float) -> tuple[int, int, int]:
  h = ((hue + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) / 360.0) % 1.0
  s = rng.uniform(_MIN_SATURATION, 1.0)
  v = rng.uniform(_MIN_VALUE, 1.0)
  return tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v))


def background_colour(label: int, num_classes: int) -> tuple[int, int, int]:
  """Class `label`'s background: its hue at _BACKGROUND_SV."""
  rgb = colorsys.hsv_to_rgb(class_hue(label, num_classes) / 360.0,
                            *_BACKGROUND_SV)
  return tuple(int(round(255 * x)) for x in rgb)


def class_picture(index: int, num_classes: int, width: int = 256,
                  height: int = 256) -> Image.Image:
  """Item `index`'s picture: class index % num_classes's background and
  palette; depends only on the index, the class count and the size."""
  label = index % num_classes
  colour = functools.partial(_hue_colour, hue=class_hue(label, num_classes))
  rng = np.random.default_rng((_SEED, index))
  image = Image.new("RGB", (width, height),
                    background_colour(label, num_classes))
  draw = ImageDraw.Draw(image)
  for _ in range(rng.integers(1, 4)):
    draw_shape(draw, rng, width, height, min(width, height), colour)
  return image


def class_of(pixels: np.ndarray, num_classes: int) -> int:
  """The class whose hue is nearest to the saturation-weighted circular mean
  hue of an HxWx3 uint8 picture (the rule samples are checked by)."""
  hsv = np.asarray(Image.fromarray(np.asarray(pixels, np.uint8)).convert(
      "HSV"), np.float32) / 255.0
  hue, weight = hsv[..., 0] * 2 * np.pi, hsv[..., 1] * hsv[..., 2]
  mean = np.arctan2((weight * np.sin(hue)).sum(), (weight * np.cos(hue)).sum())
  degrees = np.degrees(mean) % 360.0
  centres = np.array([class_hue(c, num_classes) for c in range(num_classes)])
  gap = np.abs((degrees - centres + 180.0) % 360.0 - 180.0)
  return int(np.argmin(gap))


@dataclasses.dataclass(frozen=True)
class SyntheticClassSource:
  """`num_examples` labelled pictures; item i has class i % num_classes."""
  num_examples: int
  num_classes: int
  width: int = 256
  height: int = 256

  def __post_init__(self):
    if self.num_classes < 2:
      raise DataError(f"synthetic_classes needs config.data.num_classes >= "
                       f"2; got {self.num_classes}.")

  @property
  def label_names(self) -> list[str]:
    return label_names(self.num_classes)

  def __len__(self) -> int:
    return self.num_examples

  def class_of(self, pixels: np.ndarray) -> int:
    """The class the hue rule gives a picture (the eval job scores guided
    samples by it beside its Inception classifier)."""
    return class_of(pixels, self.num_classes)

  def __getitem__(self, index: int) -> Item:
    check_index(index, self.num_examples)
    return Item(key=f"synthetic_classes/{index}",
                data=class_picture(index, self.num_classes, self.width,
                                   self.height),
                label=index % self.num_classes)
