"""The folder source: every image (or video) file below a folder.

`config.data.source='folder:PATH'`; the codec's media picks which file
extensions count, and sub-folder names can serve as class labels.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from codeclm.data.sources.base import DataError
from codeclm.data.sources.base import Item


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
