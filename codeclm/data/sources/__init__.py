"""Sources: where examples come from, chosen by `config.data.source`.

A source is an indexable sequence of `Item`s (`len`, `source[i]`): prepare
splits work by index across processes and cores, so item i must be the same
wherever and whenever it is read. Items carry what the codec's `encode()`
accepts (a path, file bytes, a PIL image, an HxWx3 or TxHxWx3 uint8 array),
never decoded data the codec could have decoded itself, so a damaged input
fails inside the codec with an error that names it.

  synthetic          built-in pictures or clips, item i seeded by i
                     (synthetic_images.py, synthetic_videos.py)
  synthetic_classes  built-in labelled pictures: data.num_classes classes,
                     each in its own hue (synthetic_classes.py; images only)
  folder:PATH        every image (or video) file below PATH (label =
                     sub-folder name; folder.py)
  tfds:NAME[:SPLIT]  a TensorFlow Datasets dataset (default split "train";
                     tfds_source.py)

Images or videos: the codec decides (`config.codec.name`, see base.MEDIA),
and the same three kinds of source serve both, so prepare and the loader have
one code path for Jpeg-LM and Avc-LM. The shared types (`Item`, `DataError`,
the `Source` protocol) live in base.py, below the kinds; this module only
picks one.

Sources are picklable (TFDS re-opens lazily), so worker processes receive
them as they are.

Signature: `open_source(data, codec)`, the config's `data` and `codec`
sections (never the whole config).
"""

from __future__ import annotations

from codeclm.data.sources import base
from codeclm.data.sources import folder
from codeclm.data.sources import synthetic_classes
from codeclm.data.sources import synthetic_images
from codeclm.data.sources import synthetic_videos
from codeclm.data.sources import tfds_source


def open_source(data, codec) -> base.Source:
  """The source data.source names, capped at data.num_examples.

  `data` and `codec` are the config's sections of those names; the codec's
  name picks images or videos, its size and length make synthetic items.
  """
  spec = data.source
  cap = data.num_examples
  if cap is not None and cap <= 0:
    raise base.DataError(
        f"config.data.num_examples={cap} must be positive or None.")
  if codec.name not in base.MEDIA:
    raise base.DataError(f"config.codec.name={codec.name!r} has no source "
                         f"media; use one of {sorted(base.MEDIA)}.")
  media = base.MEDIA[codec.name]
  if spec in ("synthetic", "synthetic_classes"):
    if not cap:
      raise base.DataError(
          f"The synthetic source needs config.data.num_examples > 0 (how many "
          f"{media}s to make), e.g. --config.data.num_examples=1000.")
    if media == "video":
      if spec == "synthetic_classes":
        raise base.DataError("data.source='synthetic_classes' makes images; "
                             "use a JPEG codec (or 'synthetic' for videos).")
      return synthetic_videos.SyntheticVideoSource(
          cap, codec.width, codec.height, codec.frames, codec.fps)
    if spec == "synthetic_classes":
      return synthetic_classes.SyntheticClassSource(
          cap, data.num_classes, codec.width, codec.height)
    return synthetic_images.SyntheticSource(cap, codec.width, codec.height)
  kind, _, arg = spec.partition(":")
  if kind == "folder" and arg:
    source = folder.FolderSource(arg, labels=data.labels_from_folders,
                                 media=media)
  elif kind == "tfds" and arg:
    name, _, split = arg.partition(":")
    source = tfds_source.TfdsSource(
        name, split or "train", data.tfds_data_dir, media=media,
        fps=data.tfds_fps if media == "video" else None,
        max_seconds=codec.frames / codec.fps if media == "video" else None)
  else:
    raise base.DataError(
        f"Unknown config.data.source {spec!r}; use 'synthetic', "
        "'synthetic_classes', 'folder:PATH' or 'tfds:NAME[:SPLIT]'.")
  return base.Capped(source, cap) if cap and cap < len(source) else source
