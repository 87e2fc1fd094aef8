"""The reference images of an FID evaluation, and what FID sees of them.

Reference images are what the model was trained to reproduce before JPEG
loss: `codec.load` (centre crop, LANCZOS resize to the codec size), uint8
RGB. FID sees them and the decoded samples through the Inception's own
conversion (bilinear resize to 299x299, see codeclm/eval/inception.py).

Downscaled variant (`eval.downscale=True`): references are halved
(`PIL.Image.reduce(2)`, a 2x2 box average) and pasted in the top-left corner
of a black canvas of the codec's size; the model's prompt is cut from that
canvas, at `ratio` of the *active* rows (the top half of the canvas), and
FID sees only the active top-left quarter of references and samples alike.

Signatures take the config's sections, never the whole config:
`reference_spec(ec, data)` and `open_reference(ec, data, spec, codec)`, with
`ec` the eval section, `data` the data section and `codec` the codec object.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import ml_collections
import numpy as np
from PIL import Image

from codeclm.data import sources
from codeclm.data.sources.base import DataError


# -- the references ------------------------------------------------------------


def reference_spec(ec, data) -> str:
  """eval.source, else the training source (TFDS: its validation split)."""
  if ec.source:
    return ec.source
  spec = data.source
  kind, _, arg = spec.partition(":")
  if kind == "tfds":
    return f"tfds:{arg.partition(':')[0]}:validation"
  if ec.num_examples > data.eval_examples:
    logging.warning(
        "eval.num_examples=%d exceeds data.eval_examples=%d: references past "
        "the held-out split of %r were seen in training.",
        ec.num_examples, data.eval_examples, spec)
  return spec


def split_of(spec: str, num_examples: int) -> str:
  kind, _, arg = spec.partition(":")
  if kind == "tfds":
    return arg.partition(":")[2] or "train"
  return f"first {num_examples} items"


def open_reference(ec, data, spec: str, codec) -> Any:
  """The reference source: `spec` at the codec's size, N items or an error.

  Labelled as the training data is (data.labels_from_folders for folders):
  labels give FID per class and the guided samples' classes (per_class.py).
  """
  n = ec.num_examples
  view = ml_collections.ConfigDict(dict(
      data=dict(data.to_dict(), source=spec, num_examples=n),
      codec=codec.settings()))
  source = sources.open_source(view.data, view.codec)
  if len(source) < n:
    raise DataError(f"The reference source {spec!r} has {len(source)} images, "
                    f"fewer than eval.num_examples={n}; lower it.")
  return source


def load_reference(source, codec, index: int) -> tuple[np.ndarray, int]:
  """Reference `index` as the codec loads it (uint8 HxWx3), and its label
  (-1: unlabelled)."""
  item = source[index]
  label = -1 if item.label is None else int(item.label)
  try:
    return np.asarray(codec.load(item.data)), label
  except ValueError as e:
    raise DataError(f"Reference image {index} ({item.key}) cannot be read: "
                    f"{e}") from e


# -- the downscaled canvas and what FID sees -----------------------------------


def to_canvas(pixels: np.ndarray) -> np.ndarray:
  """The image halved (2x2 box average) in the top-left of a black canvas."""
  h, w = pixels.shape[:2]
  if h % 2 or w % 2:
    raise ValueError(f"Downscaling needs even image sides; got {h}x{w}. Use "
                     "a codec width and height divisible by 2 MCUs.")
  canvas = np.zeros_like(pixels)
  canvas[:h // 2, :w // 2] = np.asarray(Image.fromarray(pixels).reduce(2))
  return canvas


def fid_view(pixels: np.ndarray, downscale: bool) -> np.ndarray:
  """The part of an image FID sees: all of it, or the active top-left."""
  if not downscale:
    return pixels
  h, w = pixels.shape[:2]
  return pixels[:h // 2, :w // 2]


def prompt_ratio(ratio: float, downscale: bool) -> float:
  """The canvas ratio whose MCU rows are `ratio` of the active rows."""
  return ratio / 2 if downscale else ratio
