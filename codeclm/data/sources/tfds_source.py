"""The TFDS source: a TensorFlow Datasets split, images or videos.

`config.data.source='tfds:NAME[:SPLIT]'`. TensorFlow Datasets is imported
only when a TFDS source is opened, so the other sources work without it.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from codeclm.data.sources.base import check_index
from codeclm.data.sources.base import DataError
from codeclm.data.sources.base import Item
from codeclm.data.sources.base import MEDIA


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
            "rate, and it is not in tfds_source.TFDS_VIDEO_FPS; set "
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
    check_index(index, self._len)
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
