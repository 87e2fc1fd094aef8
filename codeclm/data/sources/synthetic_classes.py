"""The labelled synthetic source: N classes told apart by their palette.

Item i has class i % N and is a synthetic picture (backgrounds, shapes,
stripes, strokes, as synthetic_images.py draws them) whose every colour has a
hue within HUE_SPREAD degrees of 360 * c / N, with random saturation and
brightness. So a small model can learn the classes (the chroma of every
block says it) and a fixed rule checks a picture's class (`class_of`: the
circular mean hue of its coloured pixels, nearest class hue), which is what
class-conditional samples are scored by.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools

import numpy as np
from PIL import Image

from codeclm.data.sources.base import check_index
from codeclm.data.sources.base import DataError
from codeclm.data.sources.base import Item
from codeclm.data.sources.synthetic_images import synthetic_picture

HUE_SPREAD = 12.0        # degrees either side of a class's hue
_SEED = 0xC1A55          # not the unlabelled source's: other pictures
_MIN_SATURATION = 0.55   # colours are clearly coloured ...
_MIN_VALUE = 0.35        # ... and not black, so their hue is visible


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


def class_picture(index: int, num_classes: int, width: int = 256,
                  height: int = 256) -> Image.Image:
  """Item `index`'s picture: class index % num_classes's palette."""
  hue = class_hue(index % num_classes, num_classes)
  return synthetic_picture(index, width, height, seed=_SEED,
                           colour=functools.partial(_hue_colour, hue=hue))


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

  def __getitem__(self, index: int) -> Item:
    check_index(index, self.num_examples)
    return Item(key=f"synthetic_classes/{index}",
                data=class_picture(index, self.num_classes, self.width,
                                   self.height),
                label=index % self.num_classes)
