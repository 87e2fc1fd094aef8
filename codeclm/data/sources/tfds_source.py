"""Sources: where examples come from, chosen by `config.data.source`.

A source is an indexable sequence of `Item`s (`len`, `source[i]`): prepare
splits work by index across processes and cores, so item i must be the same
wherever and whenever it is read. Items carry what the codec's `encode()`
accepts (a path, file bytes, a PIL image, an HxWx3 or TxHxWx3 uint8 array),
never decoded data the codec could have decoded itself, so a damaged input
fails inside the codec with an error that names it.

  synthetic          built-in pictures or clips, item i seeded by i
  folder:PATH        every image (or video) file below PATH (label =
                     sub-folder name)
  tfds:NAME[:SPLIT]  a TensorFlow Datasets dataset (default split "train")

Images or videos: the codec decides (`config.codec.name`, see MEDIA), and the
same three kinds of source serve both, so prepare and the loader have one
code path for Jpeg-LM and Avc-LM.

Sources are picklable (TFDS re-opens lazily), so worker processes receive
them as they are.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Protocol

import numpy as np
from PIL import Image
from PIL import ImageDraw


class DataError(ValueError):
  """Missing or unusable data: the message names the input and the fix."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One source example: `data` goes to the codec, the rest to the manifest.

  `fps` is the frame rate of a video given as a frame array, for the codec to
  resample from; None for images and files (a container has its own), and a
  frame array without it is taken to be at the codec's rate.
  """
  key: str
  data: Any
  label: int | None = None
  fps: float | None = None


# What each codec encodes: picks the synthetic generator, the file extensions
# of folder sources and the TFDS feature.
MEDIA = {"jpeg": "image", "avc": "video"}


class Source(Protocol):
  """What prepare needs of a source."""

  @property
  def label_names(self) -> list[str] | None:
    ...

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Item:
    ...


def open_source(config) -> Source:
  """The source config.data.source names, capped at config.data.num_examples."""
  spec = config.data.source
  cap = config.data.num_examples
  if cap is not None and cap <= 0:
    raise DataError(f"config.data.num_examples={cap} must be positive or None.")
  codec = config.codec
  if codec.name not in MEDIA:
    raise DataError(f"config.codec.name={codec.name!r} has no source media; "
                    f"use one of {sorted(MEDIA)}.")
  media = MEDIA[codec.name]
  if spec == "synthetic":
    if not cap:
      raise DataError(
          f"The synthetic source needs config.data.num_examples > 0 (how many "
          f"{media}s to make), e.g. --config.data.num_examples=1000.")
    if media == "video":
      return SyntheticVideoSource(cap, codec.width, codec.height, codec.frames,
                                  codec.fps)
    return SyntheticSource(cap, codec.width, codec.height)
  kind, _, arg = spec.partition(":")
  if kind == "folder" and arg:
    source = FolderSource(arg, labels=config.data.labels_from_folders,
                          media=media)
  elif kind == "tfds" and arg:
    name, _, split = arg.partition(":")
    source = TfdsSource(
        name, split or "train", config.data.tfds_data_dir, media=media,
        fps=config.data.tfds_fps if media == "video" else None,
        max_seconds=codec.frames / codec.fps if media == "video" else None)
  else:
    raise DataError(
        f"Unknown config.data.source {spec!r}; use 'synthetic', "
        "'folder:PATH' or 'tfds:NAME[:SPLIT]'.")
  return Capped(source, cap) if cap and cap < len(source) else source


@dataclasses.dataclass(frozen=True)
class Capped:
  """The first `n` items of a source."""
  source: Any
  n: int

  @property
  def label_names(self):
    return self.source.label_names

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> Item:
    if not 0 <= index < self.n:
      raise IndexError(f"Index {index} out of range [0, {self.n}).")
    return self.source[index]


# -- synthetic -----------------------------------------------------------------


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
    if not 0 <= index < self.num_examples:
      raise IndexError(f"Index {index} out of range [0, {self.num_examples}).")
    # A PIL image, not an array: saves the codec two copies per picture.
    return Item(key=f"synthetic/{index}",
                data=synthetic_picture(index, self.width, self.height))


def synthetic_image(index: int, width: int = 256, height: int = 256
                    ) -> np.ndarray:
  """An HxWx3 uint8 picture determined by `index` alone."""
  return np.asarray(synthetic_picture(index, width, height))


def synthetic_picture(index: int, width: int = 256, height: int = 256
                      ) -> Image.Image:
  """`synthetic_image` as an RGB PIL image."""
  rng = np.random.default_rng((0x5EED, index))
  image = _background(rng, width, height)
  draw = ImageDraw.Draw(image)
  scale = min(width, height)
  for _ in range(rng.integers(2, 9)):
    _shape(draw, rng, width, height, scale)
  if rng.random() < 0.5:
    _strokes(draw, rng, width, height, scale)
  return image


def _colour(rng) -> tuple[int, int, int]:
  return tuple(int(c) for c in rng.integers(0, 256, 3))


def _background(rng, width: int, height: int) -> Image.Image:
  """A gradient, stripes, a checkerboard or a flat colour with noise.

  Computed as 8-bit levels between two colours, then coloured through a
  palette by Pillow: per-pixel numpy work is kept to one or two passes, so a
  256x256 picture takes well under a millisecond.
  """
  kind = rng.integers(4)
  a = np.array(_colour(rng), np.float32)
  b = np.array(_colour(rng), np.float32)
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


def _shape(draw: ImageDraw.ImageDraw, rng, width: int, height: int,
           scale: int) -> None:
  """One filled ellipse, rectangle or triangle, sometimes outlined."""
  cx, cy = rng.uniform(0, width), rng.uniform(0, height)
  rx, ry = rng.uniform(0.05, 0.35, 2) * scale
  outline = _colour(rng) if rng.random() < 0.3 else None
  line = int(max(1, scale // 64))
  kind = rng.integers(3)
  if kind == 0:
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_colour(rng),
                 outline=outline, width=line)
  elif kind == 1:
    draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=_colour(rng),
                   outline=outline, width=line)
  else:
    angles = rng.uniform(0, 2 * np.pi, 3)
    points = [(cx + rx * np.cos(t), cy + ry * np.sin(t)) for t in angles]
    draw.polygon(points, fill=_colour(rng), outline=outline)


def _strokes(draw: ImageDraw.ImageDraw, rng, width: int, height: int,
             scale: int) -> None:
  """Rows of short polylines that look like handwriting or text."""
  colour = _colour(rng)
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


# -- synthetic video -----------------------------------------------------------


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
    if not 0 <= index < self.num_examples:
      raise IndexError(f"Index {index} out of range [0, {self.num_examples}).")
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
  return synthetic_picture(int(rng.integers(1 << 31)), width, height)


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
    colour = _colour(rng)
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


# -- folder --------------------------------------------------------------------


def image_extensions() -> frozenset[str]:
  """Lower-case extensions of formats Pillow can open (not save-only ones)."""
  return frozenset(ext.lower() for ext, fmt in
                   Image.registered_extensions().items() if fmt in Image.OPEN)


def video_extensions() -> frozenset[str]:
  """Lower-case extensions of common video containers FFmpeg (PyAV) reads.

  A fixed list rather than FFmpeg's demuxer table, which also claims
  subtitle, audio and text extensions (.srt, .wav, .txt). Animated GIFs are
  included: clip datasets (e.g. TGIF) ship them, and a still one is just a
  one-frame video that the codec pads or skips.
  """
  return frozenset((".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg",
                    ".mpeg", ".ts", ".m2ts", ".mts", ".flv", ".wmv", ".ogv",
                    ".3gp", ".gif"))


_EXTENSIONS = {  # media -> (extensions, examples for error messages)
    "image": (image_extensions, "Pillow opens, e.g. .jpg .png .webp"),
    "video": (video_extensions, "e.g. .mp4 .mov .mkv .webm .avi")}


class FolderSource:
  """Every image (or video) file below a folder, in a fixed shuffled order.

  Paths are sorted, then permuted with a fixed seed: the order depends only
  on the set of files, and the eval split (the first indices) mixes all
  sub-folders rather than holding the alphabetically first class only.
  The item is the path itself: the codec opens it, so a damaged file fails
  there with its name. With `labels`, the label is the index of the file's
  top-level sub-folder in the sorted list of sub-folder names. `media`
  ("image" or "video") picks the file extensions listed.
  """

  def __init__(self, root: str, labels: bool = False, media: str = "image"):
    if media not in _EXTENSIONS:
      raise ValueError(f"media={media!r}; use one of {sorted(_EXTENSIONS)}.")
    self.root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(self.root):
      raise DataError(
          f"Folder {self.root!r} (config.data.source='folder:{root}') does "
          f"not exist or is not a directory; point it at a folder of {media}s.")
    extensions, examples = _EXTENSIONS[media]
    extensions = extensions()
    paths = []
    for dirpath, dirnames, filenames in os.walk(self.root):
      dirnames.sort()
      for name in filenames:
        if os.path.splitext(name)[1].lower() in extensions:
          paths.append(os.path.relpath(os.path.join(dirpath, name), self.root))
    if not paths:
      raise DataError(
          f"No {media} files below {self.root!r} (extensions {examples}); "
          "check config.data.source (and config.codec.name: it picks images "
          "or videos).")
    paths.sort()
    order = np.random.default_rng(0xF01DE5).permutation(len(paths))
    self.paths = [paths[i] for i in order]
    self.label_names = None
    self._labels = None
    if labels:
      tops = [p.split(os.sep)[0] if os.sep in p else None for p in self.paths]
      if None in tops:
        loose = self.paths[tops.index(None)]
        raise DataError(
            f"labels_from_folders=True but {loose!r} lies directly in "
            f"{self.root!r}; put every {media} in a class sub-folder or set "
            "config.data.labels_from_folders=False.")
      self.label_names = sorted(set(tops))
      ids = {name: i for i, name in enumerate(self.label_names)}
      self._labels = [ids[t] for t in tops]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> Item:
    return Item(key=self.paths[index],
                data=os.path.join(self.root, self.paths[index]),
                label=None if self._labels is None else self._labels[index])


# -- tfds ----------------------------------------------------------------------


class TfdsSource:
  """A TFDS split; images handed to the codec still encoded (SkipDecoding).

  Random access through `tfds.data_source` when the dataset was prepared as
  ArrayRecord; otherwise sequential reads of `split[i:]`, restarted only when
  an index is not the next one, so contiguous chunks read at full speed.
  `random_access=None` picks by the prepared file format.

  With media="video" the item is the first top-level Video feature as a
  [T, H, W, 3] frame array. TFDS stores a video as separately encoded frames
  (no container the codec could open) and no frame rate: `fps` gives it, or
  TFDS_VIDEO_FPS for datasets known here. Only the frames within the first
  `max_seconds` (what the codec keeps) are decoded, with Pillow, when reading
  sequentially (TFRecord); random access (ArrayRecord) has TFDS decode every
  frame, as its reader cannot skip decoding a Video.
  """

  def __init__(self, name: str, split: str = "train",
               data_dir: str | None = None,
               random_access: bool | None = None, media: str = "image",
               fps: float | None = None, max_seconds: float | None = None):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.random_access = random_access
    self.media = media
    self.fps = fps
    self.max_frames = None
    if media == "video":
      self.fps = fps or TFDS_VIDEO_FPS.get(name.split("/")[0].split(":")[0])
      if not self.fps:
        raise DataError(
            f"TFDS dataset {name!r}: TFDS keeps video frames but not their "
            "rate, and it is not in sources.TFDS_VIDEO_FPS; set "
            "config.data.tfds_fps to the dataset's frames per second.")
      if max_seconds:  # One frame of slack for the codec's rounding.
        self.max_frames = int(np.ceil(max_seconds * self.fps)) + 1
    builder = self._builder()
    self.feature_key = _media_feature(builder, name, media)
    features = builder.info.features
    label = features["label"] if "label" in features.keys() else None
    self.label_names = list(label.names) if hasattr(label, "names") else None
    self._has_label = self.label_names is not None
    if self.random_access is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self.random_access = (builder.info.file_format ==
                            tfds.core.FileFormat.ARRAY_RECORD)
    splits = builder.info.splits
    if splits and split not in splits:
      raise DataError(
          f"TFDS dataset {name!r} has no split {split!r} (splits: "
          f"{list(splits)}); fix config.data.source='tfds:{name}:SPLIT'.")
    self._builder_cache = builder
    self._reset()
    if split in splits:
      self._len = splits[split].num_examples
    else:  # Split sizes unrecorded (e.g. mocked metadata): count once.
      self._len = (len(self._open()) if self.random_access else
                   sum(1 for _ in self._iterate(0)))
    self._reset()

  def _reset(self):
    self._reader = None    # Opened on first use in each process.
    self._next = None      # (next index, iterator) for sequential reads.

  def __getstate__(self):
    state = dict(self.__dict__)
    state.update(_reader=None, _next=None, _builder_cache=None)
    return state

  def _builder(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      builder = tfds.builder(self.name, data_dir=self.data_dir)
    except Exception as e:  # DatasetNotFoundError and friends.
      raise DataError(f"Cannot open TFDS dataset {self.name!r}: {e}") from e
    if not builder.is_prepared():
      where = builder.data_dir
      manual = os.path.join(
          self.data_dir or os.path.dirname(os.path.dirname(os.path.dirname(
              where))), "downloads", "manual")
      if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        raise DataError(
            f"TFDS dataset {self.name!r} needs a manual download: put its "
            f"files (e.g. the tar archives) in {manual} and run `tfds build "
            f"{self.name} "
            f"--data_dir={self.data_dir or '~/tensorflow_datasets'}`"
            " first. Instructions:\n"
            f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      try:
        builder.download_and_prepare()
      except Exception as e:  # Offline, manual_dir asserts, DownloadError...
        raise DataError(
            f"TFDS dataset {self.name!r} is not prepared in {where} and "
            f"download_and_prepare failed ({type(e).__name__}: {e}). Run "
            f"`tfds build {self.name} --data_dir=...` where it can download "
            f"(manual files go in {manual}) and set config.data.tfds_data_dir."
        ) from e
    return builder

  def _decoders(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if self.media == "video" and self.random_access:
      return None  # Its numpy reader cannot skip decoding a Video: TFDS does.
    return {self.feature_key: tfds.decode.SkipDecoding()}

  def _open(self):
    """The random-access data source, or the builder to iterate."""
    if self._reader is None:
      builder = self._builder_cache or self._builder()
      self._builder_cache = builder
      self._reader = (builder.as_data_source(split=self.split,
                                             decoders=self._decoders())
                      if self.random_access else builder)
    return self._reader

  def _iterate(self, start: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    ds = self._open().as_dataset(split=f"{self.split}[{start}:]",
                                 decoders=self._decoders(),
                                 shuffle_files=False,
                                 read_config=tfds.ReadConfig(
                                     try_autocache=False))
    return iter(tfds.as_numpy(ds))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Item:
    if not 0 <= index < self._len:
      raise IndexError(f"Index {index} out of range [0, {self._len}).")
    if self.random_access:
      example = self._open()[index]
    else:
      if self._next is None or self._next[0] != index:
        self._next = (index, self._iterate(index))
      example = next(self._next[1])
      self._next = (index + 1, self._next[1])
    label = example.get("label") if self._has_label else None
    data = example[self.feature_key]
    if self.media == "video":
      data = _frames_array(data[:self.max_frames])
    return Item(key=f"{self.name}/{self.split}/{index}", data=data,
                label=None if label is None else int(label), fps=self.fps)


# Frames per second of TFDS video datasets whose rate is documented (UCF101:
# "a fixed frame rate of 25 FPS"; TFDS extracts every frame with ffmpeg).
TFDS_VIDEO_FPS = {"ucf101": 25.0}


def _frames_array(frames) -> np.ndarray:
  """Frames, encoded (PNG or JPEG bytes) or decoded (HxWxC) -> [T, H, W, 3]."""
  out = []
  for frame in frames:
    if isinstance(frame, bytes):
      frame = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB"))
    elif frame.shape[-1] == 1:  # Greyscale, e.g. moving_mnist.
      frame = np.repeat(frame, 3, axis=-1)
    out.append(frame)
  if not out:
    raise DataError("The video has no frames.")
  return np.stack(out)


def _media_feature(builder, name: str, media: str) -> str:
  """The key of the first top-level Image (or Video) feature of a dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kind = tfds.features.Video if media == "video" else tfds.features.Image
  for key, feature in builder.info.features.items():
    if isinstance(feature, kind):
      return key
  codec = {m: c for c, m in MEDIA.items()}
  other = "image" if media == "video" else "video"
  raise DataError(
      f"TFDS dataset {name!r} has no top-level {kind.__name__} feature "
      f"(features: {list(builder.info.features)}), and config.codec.name="
      f"{codec[media]!r} encodes {media}s: pick a dataset of {media}s, or set "
      f"config.codec.name={codec[other]!r} to encode {other}s.")
