"""Sources: where examples come from, chosen by `config.data.source`.

A source is an indexable sequence of `Item`s (`len`, `source[i]`): prepare
splits work by index across processes and cores, so item i must be the same
wherever and whenever it is read. Items carry what the codec's `encode()`
accepts (a path, file bytes, a PIL image or an HxWx3 uint8 array), never
decoded data the codec could have decoded itself, so a damaged input fails
inside the codec with an error that names it.

  synthetic          built-in pictures, item i from a generator seeded by i
  folder:PATH        every image file below PATH (label = sub-folder name)
  tfds:NAME[:SPLIT]  a TensorFlow Datasets dataset (default split "train")

Sources are picklable (TFDS re-opens lazily), so worker processes receive
them as they are.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import numpy as np
from PIL import Image
from PIL import ImageDraw


class DataError(ValueError):
  """Missing or unusable data: the message names the input and the fix."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One source example: `data` goes to the codec, the rest to the manifest."""
  key: str
  data: Any
  label: int | None = None


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
  if spec == "synthetic":
    if not cap:
      raise DataError(
          "The synthetic source needs config.data.num_examples > 0 "
          "(how many pictures to make), e.g. --config.data.num_examples=1000.")
    return SyntheticSource(cap, config.codec.width, config.codec.height)
  kind, _, arg = spec.partition(":")
  if kind == "folder" and arg:
    source = FolderSource(arg, labels=config.data.labels_from_folders)
  elif kind == "tfds" and arg:
    name, _, split = arg.partition(":")
    source = TfdsSource(name, split or "train", config.data.tfds_data_dir)
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


# -- folder --------------------------------------------------------------------


def image_extensions() -> frozenset[str]:
  """Lower-case extensions of formats Pillow can open (not save-only ones)."""
  return frozenset(ext.lower() for ext, fmt in
                   Image.registered_extensions().items() if fmt in Image.OPEN)


class FolderSource:
  """Every image file below a folder, in a fixed shuffled order.

  Paths are sorted, then permuted with a fixed seed: the order depends only
  on the set of files, and the eval split (the first indices) mixes all
  sub-folders rather than holding the alphabetically first class only.
  The item is the path itself: the codec opens it, so a damaged file fails
  there with its name. With `labels`, the label is the index of the file's
  top-level sub-folder in the sorted list of sub-folder names.
  """

  def __init__(self, root: str, labels: bool = False):
    self.root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(self.root):
      raise DataError(
          f"Folder {self.root!r} (config.data.source='folder:{root}') does "
          "not exist or is not a directory; point it at a folder of images.")
    extensions = image_extensions()
    paths = []
    for dirpath, dirnames, filenames in os.walk(self.root):
      dirnames.sort()
      for name in filenames:
        if os.path.splitext(name)[1].lower() in extensions:
          paths.append(os.path.relpath(os.path.join(dirpath, name), self.root))
    if not paths:
      raise DataError(
          f"No image files below {self.root!r} (extensions Pillow opens, e.g. "
          ".jpg .png .webp); check config.data.source.")
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
            f"{self.root!r}; put every image in a class sub-folder or set "
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
  """

  def __init__(self, name: str, split: str = "train",
               data_dir: str | None = None,
               random_access: bool | None = None):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.random_access = random_access
    builder = self._builder()
    self.image_key = _image_feature(builder, name)
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
    return {self.image_key: tfds.decode.SkipDecoding()}

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
    return Item(key=f"{self.name}/{self.split}/{index}",
                data=example[self.image_key],
                label=None if label is None else int(label))


def _image_feature(builder, name: str) -> str:
  """The first top-level Image feature of a TFDS dataset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  for key, feature in builder.info.features.items():
    if isinstance(feature, tfds.features.Image):
      return key
  raise DataError(
      f"TFDS dataset {name!r} has no top-level Image feature "
      f"(features: {list(builder.info.features)}); pick an image dataset.")
