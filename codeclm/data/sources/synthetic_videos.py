"""The synthetic video source: moving shapes and camera pans, clip i from i.

Clips are drawn over the synthetic image source's pictures, so both media
get the same content statistics without any data on disk.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from PIL import ImageDraw

from codeclm.data.sources import synthetic_images
from codeclm.data.sources.base import check_index
from codeclm.data.sources.base import Item


@dataclasses.dataclass(frozen=True)
class SyntheticVideoSource:
  """Clips of moving shapes and camera pans, item i determined by i alone.

  Made at the codec's frame rate and size, so the codec neither resamples
  nor letterboxes them.
  """
  num_examples: int
  width: int = 256
  height: int = 144
  frames: int = 15
  fps: float = 3.0

  label_names = None

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Item:
    check_index(index, self.num_examples)
    return Item(key=f"synthetic/{index}", fps=self.fps,
                data=synthetic_video(index, self.width, self.height,
                                     self.frames))


def synthetic_video(index: int, width: int = 256, height: int = 144,
                    frames: int = 15) -> np.ndarray:
  """A [frames, height, width, 3] uint8 clip determined by `index` alone.

  One of three kinds, by a draw seeded with the index: shapes moving over a
  still picture; a camera panning (and maybe zooming) over a larger picture;
  or both. Shapes bounce off the edges, so they stay in view. A 64x48 clip
  of 15 frames takes a few milliseconds.
  """
  rng = np.random.default_rng((0x71DE0, index))
  kind = rng.integers(3)
  background = (_still(rng, width, height) if kind == 0 else
                _pan(rng, width, height, frames))
  shapes = _moving_shapes(rng, width, height) if kind != 1 else []
  out = np.empty((frames, height, width, 3), np.uint8)
  for t in range(frames):
    frame = background(t)
    if shapes:
      draw = ImageDraw.Draw(frame)
      for shape in shapes:
        shape(draw, t)
    out[t] = np.asarray(frame)
  return out


def _picture(rng, width: int, height: int) -> Image.Image:
  """A synthetic picture from the video's own random stream."""
  return synthetic_images.synthetic_picture(int(rng.integers(1 << 31)), width,
                                            height)


def _still(rng, width: int, height: int):
  picture = _picture(rng, width, height)
  return lambda t: picture.copy()


def _pan(rng, width: int, height: int, frames: int):
  """A window gliding across a canvas up to twice the frame size.

  The window moves at least 40% of the free range on each axis, resampled
  at sub-pixel offsets so that every frame moves; in a third of the clips its
  size also changes linearly (a zoom in or out).
  """
  factor = rng.uniform(1.3, 2.0)
  cw, ch = int(width * factor), int(height * factor)
  canvas = _picture(rng, cw, ch)
  scales = rng.uniform(0.6, 1.0, 2) if rng.random() < 1 / 3 else np.ones(2)
  # Window corner as a fraction of the free range, from one side to the other.
  flip = rng.random(2) < 0.5
  start, end = rng.uniform(0, 0.3, 2), rng.uniform(0.7, 1, 2)
  start, end = np.where(flip, 1 - start, start), np.where(flip, 1 - end, end)
  span = max(frames - 1, 1)

  def frame(t: int) -> Image.Image:
    a = t / span
    scale = scales[0] + a * (scales[1] - scales[0])
    w, h = width * scale, height * scale
    x, y = (start + a * (end - start)) * (cw - w, ch - h)
    return canvas.resize((width, height), Image.Resampling.BILINEAR,
                         box=(x, y, x + w, y + h))

  return frame


def _moving_shapes(rng, width: int, height: int) -> list:
  """Draw functions of 1-4 filled shapes with random velocities, bouncing."""
  scale = min(width, height)
  shapes = []
  for _ in range(rng.integers(1, 5)):
    rx, ry = rng.uniform(0.06, 0.25, 2) * scale
    p0 = rng.uniform(0, 1, 2) * (width, height)
    # 3% to 20% of the frame per step either way: x264 sees real motion.
    v = (rng.uniform(0.03, 0.2, 2) * rng.choice((-1, 1), 2) *
         (width, height))
    colour = synthetic_images.random_colour(rng)
    ellipse = rng.random() < 0.5

    def shape(draw, t, rx=rx, ry=ry, p0=p0, v=v, colour=colour,
              ellipse=ellipse):
      # Reflect the free path into [0, size]: a bounce off each edge.
      size = np.array((width, height), np.float64)
      p = np.abs((p0 + v * t + size) % (2 * size) - size)
      box = (p[0] - rx, p[1] - ry, p[0] + rx, p[1] + ry)
      (draw.ellipse if ellipse else draw.rectangle)(box, fill=colour)

    shapes.append(shape)
  return shapes
